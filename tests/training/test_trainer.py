"""The trainer: exact resume after SIGKILL, atomic checkpoints, two-process gloo, run-folder outputs."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.volumes import planned_phantom
from unetrpp.checkpoint import load_checkpoint, save_checkpoint
from unetrpp.cli.main import main
from unetrpp.data.plan import load_plans
from unetrpp.training.config import TrainConfig
from unetrpp.training.trainer import Trainer, TrainingInterrupted, poly_lr, split_batch

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16}  # fmt: skip
RUN = textwrap.dedent("""
    import json, sys
    from unetrpp.training.config import TrainConfig
    from unetrpp.training.trainer import Trainer
    cfg = TrainConfig.from_json(json.loads(sys.argv[1]))
    Trainer(sys.argv[2], cfg, out_dir=sys.argv[3], progress=False).run(resume=sys.argv[4] == "1")
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return planned_phantom(tmp_path_factory.mktemp("phantom") / "ds", cases=4)


def _config(**kw) -> TrainConfig:
    base = dict(preset="synapse", fold=0, epochs=3, iters_per_epoch=4, val_iters=1, workers=1, device="cpu",
                model_overrides=TINY, final_validation=False)
    return TrainConfig(**{**base, **kw})


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _launch(cfg, dataset, out, resume=False):
    return subprocess.Popen([sys.executable, "-c", RUN, json.dumps(cfg.to_json()), str(dataset), str(out),
                             "1" if resume else "0"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_poly_lr_and_batch_split():
    assert poly_lr(1e-2, 0.0, 0.9) == 1e-2
    assert poly_lr(1e-2, 0.5, 0.9) == pytest.approx(1e-2 * 0.5**0.9)
    assert poly_lr(1e-2, 1.5, 0.9) == 0.0
    assert split_batch(5, 2) == [3, 2]
    with pytest.raises(ValueError, match="smaller than the number of processes"):
        split_batch(1, 2)


def test_sigkill_mid_epoch_then_resume_is_exact(dataset, tmp_path):
    cfg = _config(iters_per_epoch=6)
    straight = _launch(cfg, dataset, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stdout.read().decode()[-2000:]

    out = tmp_path / "killed"
    proc = _launch(cfg, dataset, out)
    latest = out / "checkpoint_latest.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # wait for the end of epoch 0 ...
        if latest.exists() and load_checkpoint(latest)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.3)  # ... and into epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(latest)["epoch"]
    assert 1 <= killed_at < 3 and not (out / "checkpoint_final.pt").exists()

    resumed = _launch(cfg, dataset, out, resume=True)
    log = resumed.communicate(timeout=600)[0].decode()
    assert resumed.returncode == 0, log[-2000:]
    assert f"resumed from {latest} at epoch {killed_at}" in log
    a = load_checkpoint(tmp_path / "straight" / "checkpoint_final.pt")
    b = load_checkpoint(out / "checkpoint_final.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit-identical weights
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    rows = list(csv.DictReader((out / "progress.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    payload = {"model_config": {}, "plans": {}, "state_dict": {"w": torch.ones(3)}, "epoch": 1}
    save_checkpoint(payload, path)

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({**payload, "epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]  # no temporary file left
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a loadable unetrpp checkpoint"):
        load_checkpoint(path)


def test_checkpoint_holds_no_code_and_loads_with_weights_only(dataset, tmp_path):
    summary = Trainer(dataset, _config(epochs=1, iters_per_epoch=1, final_validation=True,
                                       final_validation_tta=False), out_dir=tmp_path, progress=False,
                      echo=False).run()
    ckpt = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    assert ckpt["model_config"]["feature_size"] == 8 and ckpt["plans"]["patch_size"] == [16, 32, 32]
    assert ckpt["plans"]["network"] == ckpt["model_config"]
    # the final checkpoint holds what prediction needs, no optimizer state; latest can resume
    assert set(ckpt) >= {"train_config", "labels", "history"} and not set(ckpt) & {"optimizer", "rng", "scaler"}
    assert set(torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)) >= {"optimizer", "rng"}
    assert "checkpoint_final.pt (" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "train_config.json").read_text())["model_overrides"] == TINY
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"
    val = json.loads((tmp_path / "validation" / "summary.json").read_text())
    assert len(val["cases"]) == 1 and set(val["mean"]) == {"spleen", "right kidney", "left kidney", "gallbladder",
                                                           "liver", "stomach", "aorta", "pancreas"}
    assert summary["validation"]["mean_dice"] == pytest.approx(val["mean_dice"])
    with pytest.raises(ValueError, match="already there; pass --resume"):
        Trainer(dataset, _config(epochs=1), out_dir=tmp_path, progress=False, echo=False).run()


def test_two_process_gloo_run_trains_and_only_rank0_writes(dataset, tmp_path):
    # one sample per process: the patch must leave more than one voxel at the deepest stage (batch norm there)
    # with a time budget: rank 0 measures and decides the recipe, and its clock sets every process's lr
    cfg = _config(epochs=2, iters_per_epoch=2, batch_size=2, workers=0, final_validation=True,
                  final_validation_tta=False, patch_size=[32, 64, 64], time_budget_min=10)
    script = tmp_path / "run.py"
    script.write_text(RUN)
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", str(script),
                           json.dumps(cfg.to_json()), str(dataset), str(out), "0"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    log = (out / "log.txt").read_text()
    assert log.count("training synapse fold 0 on cpu x2") == 1
    assert log.count("epoch 1:") == 1
    ckpt = load_checkpoint(out / "checkpoint_final.pt")
    assert ckpt["epoch"] == 2 and log.count("measured: width") == 1 and "short recipe" in log
    assert len(list(csv.DictReader((out / "progress.csv").open()))) == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no stray temporary files
    assert (out / "validation" / "summary.json").exists()


# ---------------------------------------------------------------------- plans, budget, progress, checkpoints
def test_train_refuses_a_preset_that_contradicts_the_plans(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"--preset acdc contradicts .*plans.json \(preset synapse\)"):
        Trainer(dataset, _config(preset="acdc"), out_dir=tmp_path, progress=False, echo=False)
    assert main(["train", str(dataset), "--preset", "acdc", "-o", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_the_plans_network_is_what_trains(dataset, tmp_path):
    t = Trainer(dataset, _config(preset=None, model_overrides={}), out_dir=tmp_path, progress=False, echo=False)
    plans = load_plans(dataset)
    assert t.model_config == plans.network and t.patch == plans.patch_size == [16, 32, 32]


class _StopAfter(Trainer):
    """Asks for a stop (as SIGTERM does) after ``n`` training forwards."""

    stop_after = 3

    def build_model(self):
        model = super().build_model()
        count = [0]

        def hook(module, args, out):
            if module.training:
                count[0] += 1
                if count[0] == self.stop_after:
                    self.request_stop("SIGTERM")

        model.register_forward_hook(hook)
        return model


def test_stop_mid_epoch_saves_a_checkpoint_and_resume_is_exact(dataset, tmp_path):
    cfg = _config(epochs=2, iters_per_epoch=5)
    Trainer(dataset, cfg, out_dir=tmp_path / "a", progress=False, echo=False).run()
    with pytest.raises(TrainingInterrupted, match="at epoch 0 iteration 3; continue with --resume"):
        _StopAfter(dataset, cfg, out_dir=tmp_path / "b", progress=False, echo=False).run()
    saved = load_checkpoint(tmp_path / "b" / "checkpoint_latest.pt")
    assert (saved["epoch"], saved["iteration"]) == (0, 3) and "optimizer" in saved
    Trainer(dataset, cfg, out_dir=tmp_path / "b", progress=False, echo=False).run(resume=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoint_final.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint_final.pt")
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()


def test_progress_lines_and_mid_epoch_checkpoints_in_a_plain_log(dataset, tmp_path):
    cfg = _config(epochs=1, iters_per_epoch=6, log_every_s=1e-3, checkpoint_every_min=1e-5)
    Trainer(dataset, cfg, out_dir=tmp_path, progress=False, echo=False).run()
    log = (tmp_path / "log.txt").read_text()
    lines = [line for line in log.splitlines() if "it/s" in line]
    assert len(lines) >= 5 and "epoch 0 iteration 6/6: loss" in log and "epoch ETA" in lines[0]
    assert log.count("checkpoint_latest.pt written at epoch 0 iteration") == 5  # iterations 1..5, not the last


def test_a_time_budget_covers_the_whole_job(dataset, tmp_path):
    budget_min = 1.0
    t0 = time.perf_counter()
    cfg = _config(epochs=1000, iters_per_epoch=250, val_iters=50, time_budget_min=budget_min,
                  final_validation=True, patch_size=[32, 64, 64])  # the tiny network: validation fits
    summary = Trainer(dataset, cfg, out_dir=tmp_path, progress=False, echo=False).run()
    wall = time.perf_counter() - t0
    assert wall <= 60 * budget_min * 1.05, wall
    saved = TrainConfig.from_json(json.loads((tmp_path / "train_config.json").read_text()))
    # short: the short-run recipe, with what it measured and chose said in the log and the config
    assert saved.recipe == "short" and saved.optimizer == "adamw" and saved.lr == pytest.approx(3e-3)
    assert any(n.startswith("measured: width") for n in saved.recipe_notes)
    # epochs of about a minute of steps, a tenth as many validation batches (not the paper's 250 + 50)
    assert 10 <= saved.iters_per_epoch <= 250 and saved.val_iters == max(2, saved.iters_per_epoch // 10)
    assert summary["iterations"] >= 1
    log = (tmp_path / "log.txt").read_text()
    assert "final validation planned: all 1 case(s)" in log
    assert "short run (" in log and "validation of 1 case(s)" in log
    assert summary["validation"]["cases_validated"] == 1


def test_sigterm_saves_checkpoint_latest_inside_an_epoch(dataset, tmp_path):
    out = tmp_path / "run"
    proc = _launch(_config(epochs=2, iters_per_epoch=400), dataset, out)
    deadline = time.time() + 300
    while time.time() < deadline and "iteration" not in ((out / "log.txt").read_text()
                                                         if (out / "log.txt").exists() else ""):
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    ckpt = load_checkpoint(out / "checkpoint_latest.pt")
    assert ckpt["epoch"] == 0 and 0 < ckpt["iteration"] < 400 and "optimizer" in ckpt
    assert "checkpoint_latest.pt written at epoch 0 iteration" in (out / "log.txt").read_text()
    assert not (out / "checkpoint_final.pt").exists()


def test_coarser_spacing_rule(dataset):
    import numpy as np

    from unetrpp.data.preprocess import load_case
    from unetrpp.training.budget import coarser_spacing, foreground_extent

    # the patch covers under half the anatomy: coarser, until it covers the extent or the planned patch
    assert coarser_spacing([64, 128, 128], [48, 64, 64], [84, 116, 180]) == pytest.approx([1.3333, 1.8125, 2.0],
                                                                                       abs=1e-4)
    assert coarser_spacing([64, 128, 128], [32, 64, 64], [84, 116, 180]) == pytest.approx([2.0, 1.8125, 2.0])
    assert coarser_spacing([48, 128, 160], [32, 64, 96], [42, 64, 101]) is None  # covers 0.9: enough
    assert coarser_spacing([32, 64, 32], [32, 64, 32], [25, 39, 22]) is None  # the planned patch itself
    assert coarser_spacing([64, 128, 128], [32, 64, 64], None) is None
    # the extent comes from the stored class locations: close to the labels' bounding box
    names = sorted(p.name[:-5] for p in (dataset / "preprocessed").glob("*.json") if p.name != "plans.json")
    extent = foreground_extent(dataset / "preprocessed", names)
    boxes = []
    for n in names:
        seg = np.asarray(load_case(dataset / "preprocessed", n)[1])
        idx = np.argwhere(seg > 0)
        boxes.append(idx.max(0) - idx.min(0) + 1)
    truth = np.median(np.array(boxes), axis=0)
    assert np.all(np.array(extent) <= truth) and np.all(np.array(extent) >= 0.8 * truth), (extent, truth)


def test_a_short_run_that_affords_only_a_small_patch_trains_at_a_coarser_spacing(tmp_path, monkeypatch):
    from unetrpp.training import budget

    root = planned_phantom(tmp_path / "ds", cases=4, patch=(32, 64, 64))
    planned = load_plans(root / "plans.json")

    def only_the_cheapest(plans, budget_s, device, batch, amp, model_config, patch=None, width=None,
                          fixed_network=False, log=print):
        assert list(patch) == [32, 64, 64] and not fixed_network
        return budget.RunPlan(True, 8, [16, 32, 32], 0.05, 0.01, iters_per_epoch=2, val_iters=1,
                              notes=["measured: width 8 ...", "short run (...)"])

    monkeypatch.setattr(budget, "plan_run", only_the_cheapest)
    monkeypatch.setattr(budget, "foreground_extent", lambda folder, names: [64.0, 128.0, 128.0])
    overrides = {k: v for k, v in TINY.items() if k != "feature_size"}
    cfg = _config(epochs=1, time_budget_min=2, model_overrides=overrides)
    Trainer(root, cfg, out_dir=tmp_path / "run", progress=False, echo=False).run()
    saved = TrainConfig.from_json(json.loads((tmp_path / "run" / "train_config.json").read_text()))
    assert saved.spacing_scale == [2.0, 2.0, 2.0] and saved.patch_size == [16, 32, 32]
    assert saved.recipe_notes[-1] == "short run (...)" and "covers under half of the labelled anatomy" in \
        saved.recipe_notes[-2]
    coarse = [2 * t for t in planned.target_spacing]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint_final.pt")
    assert ckpt["plans"]["target_spacing"] == pytest.approx(coarse)
    assert ckpt["model_config"]["img_size"] == [16, 32, 32]
    folders = sorted(p.name for p in root.iterdir() if p.name.startswith("preprocessed_"))
    assert len(folders) == 1
    stored = load_plans(root / folders[0] / "plans.json")
    assert stored.target_spacing == pytest.approx(coarse)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert re.search(r"preprocessed 4 case\(s\) at \[[0-9., ]+\] mm into preprocessed_", log)
