"""One training step for the trainer and the benchmarks: the same model, batch and random state
give the same loss and the same parameters through both."""

import copy

import pytest
import torch

import unetrpp.training.trainer as trainer_module
from unetrpp.bench import recipe_step
from unetrpp.data.phantom import make_phantom_dataset
from unetrpp.data.plan import plan_dataset
from unetrpp.data.preprocess import preprocess_dataset
from unetrpp.network import create_model
from unetrpp.training import TrainConfig, Trainer
from unetrpp.training.step import build_optimizer, grad_scaler, recipe_loss, train_step

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16}  # fmt: skip


def test_trainer_and_bench_take_the_same_step(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    make_phantom_dataset(root, cases=2, seed=5)
    plan_dataset(root, patch_size=(16, 32, 32), preset="synapse")
    preprocess_dataset(root, workers=1)

    seen = {}

    def spy(model, optimizer, loss_fn, x, y, *args, **kwargs):  # the trainer's step, recorded around
        seen.setdefault("calls", 0)
        seen["calls"] += 1
        seen["before"] = copy.deepcopy(model)
        seen["batch"] = (x.clone(), y.clone())
        seen["rng"] = torch.get_rng_state()  # dropout draws from it
        loss = train_step(model, optimizer, loss_fn, x, y, *args, **kwargs)
        seen["loss"] = loss.detach().clone()
        seen["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return loss

    monkeypatch.setattr(trainer_module, "train_step", spy)
    cfg = TrainConfig(preset="synapse", fold=0, epochs=1, iters_per_epoch=1, val_iters=0, workers=0, device="cpu",
                      batch_dice=True, model_overrides=TINY, final_validation=False)
    Trainer(root, cfg, out_dir=tmp_path / "run", progress=False, echo=False).run()
    assert seen["calls"] == 1

    model = seen["before"]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = seen["batch"]
    torch.set_rng_state(seen["rng"])
    loss = recipe_step(model, x, y)()  # what `unetrpp bench --what train` times
    assert torch.equal(loss.detach(), seen["loss"])
    after = {n: p.detach() for n, p in model.named_parameters()}
    assert after.keys() == seen["after"].keys()
    assert [n for n in after if not torch.equal(after[n], seen["after"][n])] == []
    assert sum(not torch.equal(after[n], start[n]) for n in after) > len(after) // 2  # the step did move them


def test_step_without_scaler_is_the_plain_step():
    """No scaler and a disabled one are the same step: plain backward, clip, optimizer step."""
    results = []
    for scaler in (None, grad_scaler("off")):
        torch.manual_seed(0)
        model = create_model("synapse", img_size=(16, 32, 32), out_channels=3, **TINY).train()
        x, y = torch.randn(2, 1, 16, 32, 32), torch.randint(0, 3, (2, 16, 32, 32))
        opt = build_optimizer(model.parameters(), TrainConfig(), x.device)
        loss = train_step(model, opt, recipe_loss(True), x, y, scaler)
        results.append((loss.detach(), [p.detach().clone() for p in model.parameters()]))
    (l0, p0), (l1, p1) = results
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))


def test_non_finite_loss_stops_before_backward():
    model = torch.nn.Conv3d(1, 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(out, y):
        return out.sum() * float("nan")

    x, y = torch.randn(1, 1, 2, 2, 2), torch.zeros(1, 2, 2, 2, dtype=torch.long)
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        train_step(model, opt, nan_loss, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
