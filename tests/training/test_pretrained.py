"""Fine-tuning (``train --pretrained``): weight transfer, the budget keeping the width, a run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.volumes import make_v2_dataset
from unetrpp.checkpoint import load_checkpoint, save_checkpoint
from unetrpp.cli.main import main
from unetrpp.data.plan import load_plans, plan_dataset
from unetrpp.data.preprocess import preprocess_dataset
from unetrpp.network.unetrpp import UNETRPP
from unetrpp.training import budget
from unetrpp.training.config import TrainConfig
from unetrpp.training.pretrained import (
    describe,
    resize_pos_embed,
    resize_token_projection,
    token_grids,
    transfer_weights,
)
from unetrpp.training.trainer import Trainer

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16, "stem_stride": [2, 4, 4]}  # fmt: skip
HEADS = ["heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias", "heads.2.weight", "heads.2.bias"]


def _net(out_channels=14, img_size=(16, 32, 32), seed=0, in_channels=1) -> UNETRPP:
    """A tiny UNETR++ with every tensor random (zero-initialised ones too: copies must be visible)."""
    torch.manual_seed(seed)
    net = UNETRPP(in_channels=in_channels, out_channels=out_channels, img_size=img_size, **TINY)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point() and "norm" not in name:
                t.add_(0.05 * torch.randn_like(t))
    return net.eval()


def _clone(net) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------- transfer_weights
def test_the_same_config_loads_everything_and_predicts_the_same():
    src, dst = _net(seed=0), _net(seed=1)
    report = transfer_weights(dst, src.state_dict(), "src.pt", src.config)
    assert report["loaded"] == len(src.state_dict())
    assert report["resized"] == [] and report["reinitialised"] == [] and report["unused"] == []
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        for a, b in zip(src(x), dst.eval()(x), strict=True):
            assert torch.equal(a, b)
    assert describe(report) == f"pretrained src.pt: loaded {report['loaded']} tensors, resized 0, re-initialised 0"


def test_another_class_count_reinitialises_exactly_the_heads():
    src, dst = _net(out_channels=14, seed=0), _net(out_channels=3, seed=1)
    before = _clone(dst)
    report = transfer_weights(dst, src.state_dict(), "src.pt", src.config)
    assert sorted(report["reinitialised"]) == sorted(HEADS) and report["resized"] == []
    assert report["loaded"] == len(before) - len(HEADS)
    after, theirs = dst.state_dict(), src.state_dict()
    for name, t in after.items():
        if name in HEADS:
            assert torch.equal(t, before[name]), name  # the model's own init, untouched
        else:
            assert torch.equal(t, theirs[name]), name  # bit for bit
    line = describe(report)
    assert line.startswith(f"pretrained src.pt: loaded {report['loaded']} tensors, resized 0, re-initialised 6 (")
    assert all(h in line for h in HEADS)


def test_another_patch_interpolates_the_positional_embeddings_and_token_projections():
    src, dst = _net(img_size=(16, 32, 32), seed=0), _net(img_size=(32, 64, 64), seed=1)
    report = transfer_weights(dst, src.state_dict(), "src.pt", src.config)
    grids, old = token_grids(dst.config), token_grids(src.config)
    assert len(grids) == 4 + 3  # every EPA block has a positional embedding and a token projection
    projections = [n.replace(".pos_embed", ".attn.proj_kv.weight") for n in grids]
    assert sorted(report["resized"]) == sorted([*grids, *projections]) and report["reinitialised"] == []
    after, theirs = dst.state_dict(), src.state_dict()
    for name, t in after.items():
        if name in grids:
            assert t.shape == (1, math.prod(grids[name]), theirs[name].shape[2])
            assert torch.equal(t, resize_pos_embed(theirs[name], old[name], grids[name]))
        elif name in projections:
            block = name.replace(".attn.proj_kv.weight", ".pos_embed")
            assert t.shape == (theirs[name].shape[0], math.prod(grids[block]))
            # each row is the old weighting resampled: its sum over the tokens is kept
            torch.testing.assert_close(t.sum(1), theirs[name].sum(1), rtol=0.05, atol=1e-3)
        else:
            assert torch.equal(t, theirs[name]), name
    with torch.no_grad():
        assert all(torch.isfinite(o).all() for o in dst(torch.randn(1, 1, 32, 64, 64)))


def test_token_grids_and_resizing():
    net = _net(img_size=(16, 64, 32))
    grids = token_grids(net.config)
    blocks = {f"{n}.pos_embed": m.spatial for n, m in net.named_modules() if hasattr(m, "pos_embed")}
    assert grids == blocks
    pos = torch.randn(1, 4 * 8 * 2, 5)
    assert torch.equal(resize_pos_embed(pos, (4, 8, 2), (4, 8, 2)), pos)  # the same grid: the identity
    w = torch.randn(3, 4 * 8 * 2)
    assert torch.equal(resize_token_projection(w, (4, 8, 2), (4, 8, 2)), w)
    flat = torch.ones(3, 4 * 8 * 2) / 64  # a uniform weighting stays uniform, with its sum
    torch.testing.assert_close(resize_token_projection(flat, (4, 8, 2), (8, 16, 4)), torch.ones(3, 512) / 512)
    # raster order (x fastest): a ramp along z stays a ramp along z, flat along y and x
    ramp = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(1, 4, 8, 2, 1).reshape(1, 64, 1)
    up = resize_pos_embed(ramp, (4, 8, 2), (8, 4, 4)).view(8, 4, 4)
    assert torch.all(up[1:] >= up[:-1]) and up[-1, 0, 0] > up[0, 0, 0]
    assert torch.equal(up, up[:, :1, :1].expand(8, 4, 4))
    assert resize_pos_embed(torch.full((1, 64, 3), 2.5), (4, 8, 2), (2, 2, 2)).eq(2.5).all()


def test_the_budget_keeps_a_fixed_width_and_chooses_the_patch(monkeypatch, small_dataset):
    plans = load_plans(small_dataset / "plans.json")
    measured = []

    def fake_step(config, batch, device, amp="off", steps=4):
        measured.append((config["feature_size"], list(config["img_size"])))
        return 1e-4 * math.prod(config["img_size"]), 1e-3

    monkeypatch.setattr(budget, "measure_step", fake_step)
    cfg = {**plans.network, **TINY}
    tuned = budget.plan_run(plans, 60.0, torch.device("cpu"), 2, "off", cfg, patch=[64, 128, 128], width=32,
                            fixed_width=True, log=lambda s: None)
    assert measured and {w for w, _ in measured} == {32} and tuned.feature_size == 32
    assert math.prod(tuned.patch) < 64 * 128 * 128  # the full patch does not make enough steps: a smaller one
    measured.clear()
    free = budget.plan_run(plans, 60.0, torch.device("cpu"), 2, "off", cfg, patch=[64, 128, 128], width=32,
                           log=lambda s: None)
    assert measured[0][0] == 8 and free.feature_size == 8  # without it, the ladder starts narrower


# ---------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Three classes, one channel; planned with a (1, 4, 4) stem stride and a (16, 32, 32) patch."""
    root = tmp_path_factory.mktemp("ft") / "ds"
    make_v2_dataset(root, cases=3, shape=(16, 32, 32))
    plan_dataset(root, patch_size=(16, 32, 32))
    preprocess_dataset(root, workers=1)
    return root


def _pretrained_checkpoint(path: Path, dataset: Path, in_channels: int = 1) -> tuple[Path, UNETRPP]:
    """A 14-class checkpoint at patch (32, 64, 64) with stem stride (2, 4, 4), as the trainer writes one."""
    net = _net(out_channels=14, img_size=(32, 64, 64), seed=3, in_channels=in_channels)
    plans = load_plans(dataset / "plans.json").to_dict()
    plans.pop("num_classes", None)
    plans.pop("patch_divisor", None)
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, 14)}}
    channels = [f"CT{c}" for c in range(in_channels)]
    plans.update(labels=labels, channel_names=channels, patch_size=[32, 64, 64], network=net.config.to_dict(),
                 normalization=plans["normalization"] * in_channels)
    save_checkpoint({"model_config": net.config.to_dict(), "plans": plans, "labels": labels,
                     "channel_names": channels, "file_ending": ".nii.gz", "train_config": TrainConfig().to_json(),
                     "epoch": 1, "state_dict": _clone(net), "ema": None, "best_ema": None, "history": [],
                     "elapsed": 1.0}, path)
    return path, net


class _Spy(Trainer):
    """Keeps the network's weights as they are when training starts."""

    def _train_epoch(self, model, optimizer, scaler, epoch, state):
        if not hasattr(self, "at_start"):
            self.at_start = _clone(model)
        return super()._train_epoch(model, optimizer, scaler, epoch, state)


def test_a_fine_tuning_run_trains_from_the_pretrained_weights_and_resumes_without_them(
        small_dataset, tmp_path, monkeypatch):
    ckpt, src = _pretrained_checkpoint(tmp_path / "pre.pt", small_dataset)
    calls = []

    def fake_plan(plans, budget_s, device, batch, amp, model_config, patch=None, width=None,
                  fixed_network=False, fixed_width=False, log=print):
        calls.append(dict(stem=list(plans.network["stem_stride"]), width=width, fixed_network=fixed_network,
                          fixed_width=fixed_width, config=dict(model_config)))
        return budget.RunPlan(True, width, list(patch), 0.05, 0.01, iters_per_epoch=2, val_iters=1,
                              notes=["measured: ...", "short run (...)"])

    monkeypatch.setattr(budget, "plan_run", fake_plan)
    cfg = TrainConfig(fold=0, epochs=1, iters_per_epoch=1, val_iters=1, workers=0, device="cpu",
                      final_validation=False, time_budget_min=10, pretrained=str(ckpt))
    out = tmp_path / "run"
    trainer = _Spy(small_dataset, cfg, out_dir=out, progress=False, echo=False)
    trainer.run()

    # the budget measured the pretrained architecture, width fixed, patch free
    (call,) = calls
    assert call["fixed_width"] and not call["fixed_network"] and call["width"] == 8 and call["stem"] == [2, 4, 4]
    assert call["config"]["depths"] == [1, 1, 1, 1] and call["config"]["out_channels"] == 3
    # the network: the pretrained architecture with 3 classes at the run's patch
    final = load_checkpoint(out / "checkpoint_final.pt")
    mc = final["model_config"]
    assert {k: mc[k] for k in TINY} == TINY and mc["out_channels"] == 3 and mc["img_size"] == [16, 32, 32]
    assert all(math.isfinite(h["train_loss"]) for h in final["history"])
    # at step 0: loaded tensors bit for bit, positional embeddings interpolated, heads the model's own
    start, theirs = trainer.at_start, src.state_dict()
    assert torch.equal(start["stages.2.0.attn.qkvv.weight"], theirs["stages.2.0.attn.qkvv.weight"])
    assert torch.equal(start["decoder.0.up.weight"], theirs["decoder.0.up.weight"])
    old, new = token_grids(src.config), token_grids(UNETRPP(**mc).config)
    name = "stages.0.0.pos_embed"
    assert torch.equal(start[name], resize_pos_embed(theirs[name], old[name], new[name]))
    assert start["heads.0.weight"].shape == (3, 8, 1, 1, 1)
    # the report: in the log, train_config.json and the checkpoint
    saved = json.loads((out / "train_config.json").read_text())
    report = saved["pretrained_report"]
    assert final["train_config"]["pretrained_report"] == report and report["source"] == str(ckpt)
    assert set(HEADS) <= set(report["reinitialised"])
    assert sorted(report["resized"]) == sorted([*new, *(n.replace(".pos_embed", ".attn.proj_kv.weight") for n in new)])
    assert report["loaded"] > 0 and report["loaded"] + len(report["reinitialised"]) + len(report["resized"]) == \
        len(start)
    log = (out / "log.txt").read_text()
    assert f"pretrained {ckpt}: loaded {report['loaded']} tensors, resized 14 (" in log
    assert "re-initialised" in log and "heads.0.weight" in log

    # resume: from the run's own checkpoint, the pretrained file not even needed
    ckpt.unlink()
    more = TrainConfig(fold=0, epochs=2, iters_per_epoch=1, val_iters=1, workers=0, device="cpu",
                       final_validation=False, time_budget_min=10)
    summary = Trainer(small_dataset, more, out_dir=out, progress=False, echo=False).run(resume=True)
    assert summary["epochs"] == 2 and len(calls) == 1
    assert "its weights are not reloaded" in (out / "log.txt").read_text()
    again = json.loads((out / "train_config.json").read_text())
    assert again["pretrained"] == str(ckpt) and again["pretrained_report"] == report


def test_a_pretrained_network_for_other_channels_is_a_one_line_error(small_dataset, tmp_path, capsys):
    ckpt, _ = _pretrained_checkpoint(tmp_path / "two.pt", small_dataset, in_channels=2)
    code = main(["train", str(small_dataset), "--pretrained", str(ckpt), "-o", str(tmp_path / "run"),
                 "--device", "cpu", "--epochs", "1", "--iters", "1", "--workers", "0", "--no-val"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{ckpt} takes 2 channel(s), dataset {small_dataset} has 1" in err
