"""Exact resume: the kernels chosen by timing travel in the checkpoint and are restored before the first step."""

from __future__ import annotations

import importlib

import pytest
import torch

from tests.volumes import planned_phantom
from unetrpp.checkpoint import Checkpoint
from unetrpp.network import kernels
from unetrpp.training.config import TrainConfig
from unetrpp.training.trainer import Trainer

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16}  # fmt: skip
#: a shape the tiny network never convolves, so its choice stays as set here (no timing happens)
SHAPE = (2, 8, 8, 16, 64, 64)


def _choices(monkeypatch, value: dict) -> dict:
    """Give the package and the convolution kernel one fresh choices dict."""
    monkeypatch.setattr(kernels, "WEIGHT_GRAD_CHOICES", value)
    monkeypatch.setattr(importlib.import_module("unetrpp.network.kernels.conv"), "WEIGHT_GRAD_CHOICES", value)
    return value


class _Spy(Trainer):
    """Records the kernel choices as the first training epoch starts."""

    def _train_epoch(self, model, optimizer, scaler, epoch, state):
        if not hasattr(self, "choices_at_start"):
            self.choices_at_start = dict(kernels.WEIGHT_GRAD_CHOICES)
        return super()._train_epoch(model, optimizer, scaler, epoch, state)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return planned_phantom(tmp_path_factory.mktemp("phantom") / "ds", cases=3)


def _config(epochs: int) -> TrainConfig:
    return TrainConfig(preset="synapse", fold=0, epochs=epochs, iters_per_epoch=1, val_iters=1, workers=0,
                       device="cpu", model_overrides=TINY, final_validation=False)


def test_the_checkpoint_carries_the_kernel_choices_and_resuming_restores_them(dataset, tmp_path, monkeypatch):
    _choices(monkeypatch, {SHAPE: "slabs"})
    out = tmp_path / "run"
    Trainer(dataset, _config(1), out_dir=out, progress=False, echo=False).run()
    latest = Checkpoint.load(out / "checkpoint_latest.pt")
    assert latest.training.weight_grad_choices == {SHAPE: "slabs"}
    assert torch.load(out / "checkpoint_latest.pt", weights_only=True)["weight_grad_choices"] == [[list(SHAPE),
                                                                                                   "slabs"]]
    assert "weight_grad_choices" not in torch.load(out / "checkpoint_final.pt", weights_only=True)

    # a new process: no choices yet; the resumed run starts with the interrupted one's
    fresh = _choices(monkeypatch, {})
    spy = _Spy(dataset, _config(2), out_dir=out, progress=False, echo=False)
    spy.run(resume=True)
    assert spy.choices_at_start == {SHAPE: "slabs"} and fresh[SHAPE] == "slabs"
    assert Checkpoint.load(out / "checkpoint_latest.pt").training.weight_grad_choices[SHAPE] == "slabs"


def test_a_checkpoint_of_an_earlier_version_resumes_with_the_choices_it_finds(dataset, tmp_path, monkeypatch):
    _choices(monkeypatch, {})
    out = tmp_path / "run"
    Trainer(dataset, _config(1), out_dir=out, progress=False, echo=False).run()
    raw = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    raw.pop("weight_grad_choices")  # as written before the choices were recorded
    torch.save(raw, out / "checkpoint_latest.pt")
    chosen = _choices(monkeypatch, {SHAPE: "onednn"})
    spy = _Spy(dataset, _config(2), out_dir=out, progress=False, echo=False)
    spy.run(resume=True)
    assert spy.choices_at_start == {SHAPE: "onednn"} == chosen
