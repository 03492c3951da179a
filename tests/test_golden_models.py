"""Golden values for both models at their defaults: state-dict keys and shapes, parameter
count, and a checksum of a seeded forward pass. A change to any of them changes every
checkpoint, so it must be deliberate: regenerate with

    python tests/test_golden_models.py --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hrm_vision.vae import MinimalVAE, TeacherVAE, VAEBase

GOLDEN = Path(__file__).parent / "golden" / "models.json"
MODELS = {"teacher": TeacherVAE, "tinyvae": MinimalVAE}


def describe(name: str) -> dict[str, object]:
    """What is pinned for model ``name``: built under seed 0, fed a seed-1 batch of 2 images."""
    torch.manual_seed(0)
    model: VAEBase = MODELS[name]().eval()
    with torch.no_grad():  # move the zero-initialised branch ends so the checksum sees them
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        rec = model.decode(mu)
    return {
        "parameters": model.num_parameters(),
        "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        "checksum": {"mu_sum": float(mu.double().sum()), "mu_abs": float(mu.double().abs().sum()),
                     "logvar_sum": float(logvar.double().sum()),
                     "reconstruction_sum": float(rec.double().sum())},
    }


@pytest.fixture(scope="module")
def golden() -> dict[str, dict[str, object]]:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_golden(name: str, golden) -> None:
    now, then = describe(name), golden[name]
    assert now["parameters"] == then["parameters"]
    assert now["state_dict"] == then["state_dict"]
    for key, value in then["checksum"].items():
        assert now["checksum"][key] == pytest.approx(value, rel=1e-4, abs=1e-3), key


if __name__ == "__main__":
    if "--update" in sys.argv:
        torch.set_num_threads(1)
        GOLDEN.write_text(json.dumps({n: describe(n) for n in sorted(MODELS)}, indent=1) + "\n")
        print(f"wrote {GOLDEN}")
