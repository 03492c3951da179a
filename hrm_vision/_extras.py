"""Optional dependencies: import them where they are used, with an error naming the extra.

The core install (``pip install hrm-vision``) holds what loading a model, a checkpoint and the
IRP plugin need: torch, numpy, pydantic, pluggy, jsonschema. Everything else comes with an extra
(see ``[project.optional-dependencies]`` in ``pyproject.toml``), and code that needs it imports
it through :func:`require`, at the point of use:

>>> skimage_data = require("skimage.data", extra="photos")   # doctest: +SKIP

When the module is missing the user gets one line saying what to install, for example
``the 'photos' dataset needs scikit-image (module 'skimage'), which is not installed:
pip install 'hrm-vision[photos]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Distribution name (what pip installs) of each optional top-level module.
DISTRIBUTIONS: dict[str, str] = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "matplotlib": "matplotlib",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxscript": "onnxscript",
    "skimage": "scikit-image",
    "tensorboard": "tensorboard",
    "torchmetrics": "torchmetrics",
    "torchvision": "torchvision",
    "tqdm": "tqdm",
}

#: The extra that brings each optional top-level module (the first one that has it).
EXTRAS: dict[str, str] = {
    "PIL": "train",
    "cv2": "video",
    "matplotlib": "train",
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "skimage": "photos",
    "tensorboard": "tensorboard",
    "torchmetrics": "train",
    "torchvision": "train",
    "tqdm": "train",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, message: str, *, module: str, extra: str) -> None:
        super().__init__(message, name=module)
        self.extra = extra


def missing_extra(module: str, extra: str | None = None,
                  purpose: str | None = None) -> MissingExtraError:
    """The error for optional ``module`` (dotted name allowed) that could not be imported.

    Args:
        module: the module that failed to import, e.g. ``"skimage.data"``.
        extra: the extra that provides it (default: looked up in :data:`EXTRAS`, else ``all``).
        purpose: what needs it, for the message (default: ``"this feature"``).
    """
    top = module.split(".")[0]
    extra = extra or EXTRAS.get(top, "all")
    dist = DISTRIBUTIONS.get(top, top)
    return MissingExtraError(
        f"{purpose or 'this feature'} needs {dist} (module {top!r}), which is not installed: "
        f"pip install 'hrm-vision[{extra}]'", module=top, extra=extra)


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import and return ``module``; if it (or its top-level package) is missing, raise
    :class:`MissingExtraError` (an ``ImportError``) whose one-line message names the extra.

    An ``ImportError`` raised from inside an installed module (a broken install) is left as it is,
    so its real cause is not hidden behind an install hint.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and not (module == missing or module.startswith(missing + ".")):
            raise  # a dependency of the module is missing, not the module itself
        raise missing_extra(module, extra, purpose) from exc
