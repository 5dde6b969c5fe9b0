"""Helpers for the official-parity fixture in ``../shared/fixtures/official_parity`` (README there)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures" / "official_parity"
CONFIGS = ("synapse", "acdc", "tumor", "lung")


def require_shared(path: Path) -> Path:
    """Skip when ``../shared`` is absent (a user's clone); fail under CI, where it must be there."""
    if not path.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{path} is missing under CI=true: the shared fixtures must be beside the checkout")
        pytest.skip(f"{path} not found: shared fixtures/data only exist beside the project checkout")
    return path


def load_fixture(name: str) -> dict:
    return json.loads(require_shared(FIXTURES / f"{name}.json").read_text())


def draw_official_state_dict(fixture: dict) -> dict[str, torch.Tensor]:
    """The official weights, drawn by the fixture README's rule, in official key layout."""
    rng = np.random.default_rng(fixture["weight_seed"])
    tied = fixture["tied"]
    out: dict[str, torch.Tensor] = {}
    for key, shape, dtype in fixture["state_dict"]:
        if key in tied:
            out[key] = out[tied[key]]
            continue
        z = rng.standard_normal(shape).astype(np.float32)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            value = np.zeros(shape, dtype=np.int64)
        elif leaf == "running_mean":
            value = 0.1 * z
        elif leaf == "running_var":
            value = 1 + 0.1 * np.abs(z)
        elif leaf == "gamma":
            value = 0.5 + 0.1 * z
        elif leaf in ("temperature", "temperature2"):
            value = 1 + 0.1 * z
        elif leaf == "pos_embed":
            value = 0.1 * z
        elif len(shape) == 1:
            value = 1 + 0.1 * z if leaf == "weight" else 0.1 * z
        elif leaf == "EF":
            value = z / np.sqrt(shape[0])
        else:
            value = z / np.sqrt(math.prod(shape[1:]))
        out[key] = torch.from_numpy(np.asarray(value, dtype=np.int64 if dtype == "int64" else np.float32))
    return out


def fixture_input(fixture: dict) -> torch.Tensor:
    rng = np.random.default_rng(fixture["input_seed"])
    return torch.from_numpy(rng.standard_normal(fixture["input_shape"]).astype(np.float32))
