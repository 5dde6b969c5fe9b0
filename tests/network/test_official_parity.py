"""Acceptance: official weights, converted by our converter, reproduce the official network's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.official_fixture import CONFIGS, draw_official_state_dict, fixture_input, load_fixture
from unetrpp.network.weights import load_official


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_match_official_digests(name):
    fx = load_fixture(name)
    model = load_official(draw_official_state_dict(fx), name).eval()
    assert sum(p.numel() for p in model.parameters()) == fx["unique_parameters"]
    with torch.no_grad():
        outputs = model(fixture_input(fx))
    assert len(outputs) == len(fx["outputs"]) == 3
    for out, ref in zip(outputs, fx["outputs"], strict=True):
        assert list(out.shape) == ref["shape"]
        samples = np.asarray(ref["sample_value"])
        tol = 1e-4 * np.abs(samples).max()
        got = out.reshape(-1).numpy()[ref["sample_index"]]
        np.testing.assert_allclose(got, samples, rtol=0, atol=tol)
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1).double()
        np.testing.assert_allclose(per_channel.mean(1).numpy(), ref["channel_mean"], rtol=0, atol=tol)
        np.testing.assert_allclose(per_channel.std(1).numpy(), ref["channel_std"], rtol=0, atol=tol)


def test_standard_head_merge_is_detected_by_the_digests():
    """The fixture must be able to fail: the textbook head merge moves the outputs far off."""
    fx = load_fixture("synapse")
    model = load_official(draw_official_state_dict(fx), "synapse").eval()
    for blk in model.modules():
        if hasattr(blk, "head_merge"):
            blk.head_merge = "standard"
    with torch.no_grad():
        out = model(fixture_input(fx))[0]
    ref = fx["outputs"][0]
    samples = np.asarray(ref["sample_value"])
    err = np.abs(out.reshape(-1).numpy()[ref["sample_index"]] - samples).max()
    assert err > 100 * 1e-4 * np.abs(samples).max()
