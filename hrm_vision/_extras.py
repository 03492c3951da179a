"""Optional dependencies, imported where they are used through :func:`require`, which names
the extra to install (``[project.optional-dependencies]`` in ``pyproject.toml``) when one is
missing. The core install holds torch, numpy, pydantic, pluggy and jsonschema.

>>> skimage_data = require("skimage.data", extra="photos")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Distribution name (what pip installs) of the optional top-level modules not named like it.
DISTRIBUTIONS: dict[str, str] = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "skimage": "scikit-image",
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
    """The error for optional ``module`` (e.g. ``"skimage.data"``) that could not be imported:
    ``"{purpose} needs {distribution} (module ...), which is not installed: pip install ..."``,
    ``extra`` defaulting to :data:`EXTRAS`' entry (else ``all``)."""
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
