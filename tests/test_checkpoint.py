"""The Checkpoint dataclass: its payload on disk, files of earlier versions, hostile values."""

from __future__ import annotations

import pytest
import torch

from tests.volumes import plans_for
from unetrpp.checkpoint import Checkpoint, TrainingState, load_checkpoint, save_checkpoint
from unetrpp.errors import UserError
from unetrpp.network import create_model

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16, "out_channels": 3, "img_size": [16, 32, 32]}  # fmt: skip
LABELS = {"background": 0, "a": 1, "b": 2}


def _parts():
    torch.manual_seed(0)
    net = create_model("synapse", **TINY)
    config = net.config.to_dict()
    plans = plans_for([{"scheme": "zscore"}]).to_dict()
    plans.update(network=config, patch_size=list(config["img_size"]))
    return net, config, plans


def _old_payload(full: bool = True) -> dict:
    """A payload as the trainer wrote it before Checkpoint existed (the patch in model_config and in the plans)."""
    net, config, plans = _parts()
    payload = {"model_config": config, "plans": plans, "labels": LABELS, "channel_names": ["ch0"],
               "file_ending": ".nii.gz", "train_config": {"fold": 0, "recipe": "paper"}, "epoch": 2,
               "state_dict": net.state_dict(), "ema": 0.5, "best_ema": 0.6, "history": [{"epoch": 0}, {"epoch": 1}],
               "elapsed": 12.5, "iteration": 3, "epoch_loss": 1.25}  # fmt: skip
    if full:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        payload.update(optimizer=opt.state_dict(), scaler={}, rng={"torch": torch.get_rng_state(), "cuda": []})
    return payload


def test_a_checkpoint_round_trips_through_its_file(tmp_path):
    net, config, plans = _parts()
    training = TrainingState(train_config={"fold": 0}, epoch=1, iteration=2, epoch_loss=0.5, ema=0.25, best_ema=0.3,
                             history=[{"epoch": 0, "train_loss": 1.0}], elapsed=3.0, optimizer={"state": {}},
                             scaler={}, rng={"torch": torch.get_rng_state(), "cuda": []},
                             weight_grad_choices={(2, 8, 8, 16, 64, 64): "slabs", (1, 16, 16, 8, 32, 32): "onednn"})
    ckpt = Checkpoint(config, net.state_dict(), plans, LABELS, ["ch0"], ".nii.gz", training)
    path = save_checkpoint(ckpt, tmp_path / "c.pt")
    back = Checkpoint.load(path)
    assert back.source == str(path) and back.patch_size == (16, 32, 32)
    assert (back.network, back.plans, back.labels, back.channel_names, back.file_ending) == \
        (config, plans, LABELS, ["ch0"], ".nii.gz")
    assert all(torch.equal(v, back.state_dict[k]) for k, v in ckpt.state_dict.items())
    t = back.training
    assert t.weight_grad_choices == training.weight_grad_choices and t.resumable and not back.resume_lacks()
    assert (t.epoch, t.iteration, t.ema, t.history, t.elapsed) == (1, 2, 0.25, [{"epoch": 0, "train_loss": 1.0}], 3.0)
    assert back.read_plans().patch_size == [16, 32, 32]
    # on disk: the flat dict of plain data every earlier reader knows
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "unetrpp-checkpoint" and raw["plans"]["patch_size"] == raw["model_config"]["img_size"]
    assert raw["weight_grad_choices"] == [[[2, 8, 8, 16, 64, 64], "slabs"], [[1, 16, 16, 8, 32, 32], "onednn"]]


def test_the_plans_patch_follows_the_network(tmp_path):
    net, config, plans = _parts()
    payload = Checkpoint(config, net.state_dict(), {**plans, "patch_size": [8, 8, 8]}).to_payload()
    assert payload["plans"]["patch_size"] == [16, 32, 32] and payload["plans"]["network"] == config
    assert "train_config" not in payload and "optimizer" not in payload


@pytest.mark.parametrize("full", [True, False])
def test_a_payload_of_the_earlier_format_loads_and_is_written_back_alike(tmp_path, full):
    old = _old_payload(full)
    path = save_checkpoint(old, tmp_path / "old.pt")
    ckpt = Checkpoint.load(path)
    assert ckpt.patch_size == (16, 32, 32) and ckpt.labels == LABELS
    t = ckpt.training
    assert (t.epoch, t.iteration, t.epoch_loss, t.best_ema, t.train_config) == (2, 3, 1.25, 0.6, old["train_config"])
    assert t.resumable == full and t.weight_grad_choices == {}
    assert ckpt.resume_lacks() == ([] if full else ["optimizer", "rng"])
    again = ckpt.to_payload()
    assert set(again) == set(load_checkpoint(path)) | ({"weight_grad_choices"} if full else set())
    assert {k: v for k, v in again.items() if k not in ("state_dict", "optimizer", "rng", "weight_grad_choices")} == \
        {k: v for k, v in load_checkpoint(path).items() if k not in ("state_dict", "optimizer", "rng")}


def test_payloads_without_training_state_or_with_a_part_of_it_load(tmp_path):
    net, config, plans = _parts()
    bare = Checkpoint.load(save_checkpoint({"model_config": config, "plans": {}, "state_dict": net.state_dict()},
                                           tmp_path / "bare.pt"))
    assert bare.training is None and bare.labels is None and "train_config" in bare.resume_lacks()
    part = Checkpoint.load(save_checkpoint({"model_config": config, "plans": plans, "state_dict": net.state_dict(),
                                            "history": [], "elapsed": 1.0}, tmp_path / "part.pt"))
    assert part.training.elapsed == 1.0 and part.resume_lacks() == ["train_config", "optimizer", "rng", "epoch"]


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("epoch", "2", "checkpoint epoch must be an integer >= 0"),
    ("epoch", -1, "checkpoint epoch must be an integer >= 0"),
    ("history", {"epoch": 0}, "checkpoint history must be rows of numbers"),
    ("history", [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "pseudo_dice": 0.5, "ema_dice": 0.5,
                  "iterations": "abc"}], "checkpoint history must be rows of numbers"),
    ("rng", {"torch": torch.zeros(5056)}, "checkpoint rng must be"),  # float, not bytes
    ("rng", {"torch": torch.zeros(5056, dtype=torch.uint8), "cuda": ["x"]}, "checkpoint rng must be"),
    ("weight_grad_choices", [[[], "slabs"]], "checkpoint weight_grad_choices must be"),
    ("weight_grad_choices", [[[2, 1, 16, 10**30, 64, 64], "slabs"]], "checkpoint weight_grad_choices must be"),
    ("labels", {"background": 0, "liver": -1}, "checkpoint labels must map names to integers >= 0"),
    ("ema", float("nan"), "checkpoint ema must be a number or None"),
    ("train_config", [1], "checkpoint train_config must be a dict"),
    ("rng", {"torch": [1, 2]}, "checkpoint rng must be"),
    ("weight_grad_choices", [[[2, 8], "fastest"]], "checkpoint weight_grad_choices must be"),
    ("weight_grad_choices", {(2, 8): "slabs"}, "checkpoint weight_grad_choices must be"),
    ("channel_names", "CT", "checkpoint channel_names must be a list of names"),
    ("labels", ["background"], "checkpoint labels must map names to integers"),
])
def test_hostile_values_are_refused_in_one_line_naming_the_file(tmp_path, key, value, needle):
    path = save_checkpoint({**_old_payload(), key: value}, tmp_path / "evil.pt")
    for read in (Checkpoint.load, load_checkpoint):
        with pytest.raises(UserError) as e:
            read(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and needle in msg and "\n" not in msg


def test_format_and_weights_are_checked_as_before(tmp_path):
    old = _old_payload(full=False)
    with pytest.raises(UserError, match="not a unetrpp checkpoint"):
        Checkpoint.from_payload({**old, "format": "other"}, "x.pt")
    with pytest.raises(UserError, match=r"x\.pt: checkpoint format 9 is newer"):
        Checkpoint.from_payload({**old, "format": "unetrpp-checkpoint", "version": 9}, "x.pt")
    with pytest.raises(UserError, match=r"x\.pt: checkpoint lacks model_config"):
        Checkpoint.from_payload({"format": "unetrpp-checkpoint", "version": 1, "plans": {}, "state_dict": {}}, "x.pt")
    path = save_checkpoint(old, tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    next(iter(raw["state_dict"].values())).view(-1)[0] += 1
    torch.save(raw, path)
    with pytest.raises(UserError, match="do not match their checksum"):
        Checkpoint.load(path)
