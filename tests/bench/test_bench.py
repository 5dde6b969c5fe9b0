"""The benchmark suite: exponent fit, timing helper, the MHSA baseline, worker processes, skipping,
and activation checkpointing (gradients unchanged)."""

import math
import subprocess
import sys

import pytest
import torch

from unetrpp import UNETRPP
from unetrpp.bench import MultiHeadSelfAttention, fit_exponent, median_time, run_suite, run_worker
from unetrpp.training.loss import DeepSupervisionLoss, DiceCELoss


def test_fit_exponent_recovers_power_laws():
    xs = [4096, 8192, 16384, 32768, 65536]
    assert fit_exponent(xs, [3e-4 * x**1.7 for x in xs]) == pytest.approx(1.7, abs=1e-12)
    assert fit_exponent(xs, [5.0 * x for x in xs]) == pytest.approx(1.0, abs=1e-12)
    # noise that alternates around a line keeps the slope near it
    noisy = [2e-6 * x**2 * (1.05 if i % 2 else 0.95) for i, x in enumerate(xs)]
    assert abs(fit_exponent(xs, noisy) - 2.0) < 0.05
    with pytest.raises(ValueError, match="two"):
        fit_exponent([1.0], [1.0])


def test_median_time_runs_warmup_then_repeats():
    calls = []
    med, times = median_time(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and len(times) == 5
    assert med == sorted(times)[2]


def test_mhsa_baseline_is_textbook_attention():
    torch.manual_seed(0)
    m = MultiHeadSelfAttention(32, 4).eval()
    x = torch.randn(2, 50, 32)
    q, k, v = m.qkv(x).view(2, 50, 3, 4, 8).permute(2, 0, 3, 1, 4)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    ref = m.proj((attn @ v).transpose(1, 2).reshape(2, 50, 32))
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_worker_measures_attention_in_its_own_process():
    r = run_worker({"kind": "attention", "device": "cpu", "threads": 1,
                    "kwargs": {"kind": "epa", "dim": 32, "tokens": 512, "repeats": 2}})
    assert r["kind"] == "epa" and r["tokens"] == 512 and len(r["times_s"]) == 2
    assert 0 < r["median_s"] < 5 and r["peak_memory_mb"] > 50  # a python + torch process
    with pytest.raises(RuntimeError, match="attention kind"):
        run_worker({"kind": "attention", "device": "cpu", "threads": 1,
                    "kwargs": {"kind": "nope", "dim": 32, "tokens": 512, "repeats": 1}})


def test_epa_scaling_fits_exponents_and_skips_points_over_budget():
    lines = []
    rec = run_suite(["epa"], dims=[32], tokens=[512, 1024, 2048], repeats=2, epa_max_seconds=60, echo=lines.append)
    epa = rec["results"]["epa"]
    assert {(r["kind"], r["tokens"]) for r in epa["rows"]} == {(k, n) for k in ("epa", "mhsa")
                                                                for n in (512, 1024, 2048)}
    assert set(epa["exponents"]) == {"epa_C32", "mhsa_C32"} and not epa["skipped"]
    assert rec["machine"]["torch"] == torch.__version__ and rec["machine"]["threads"] == 2
    # a budget no point can meet: only the first N of each (kind, C) is measured, the rest recorded as skipped
    # two rounds: each point keeps its fastest round, and skipped points stay skipped
    rec = run_suite(["epa"], dims=[32], tokens=[512, 1024], repeats=1, epa_max_seconds=0.0, epa_rounds=2,
                    echo=lines.append)
    epa = rec["results"]["epa"]
    assert [(r["kind"], r["tokens"]) for r in epa["rows"]] == [("epa", 512), ("mhsa", 512)]
    assert [(s["kind"], s["tokens"]) for s in epa["skipped"]] == [("epa", 1024), ("mhsa", 1024)]
    assert epa["exponents"] == {} and epa["rounds"] == 2
    for r in epa["rows"]:
        assert len(r["round_medians_s"]) == 2 and r["median_s"] == min(r["round_medians_s"])


def test_unknown_measurement_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "unetrpp", "bench", "--what", "forward,speed"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "unknown --what ['speed']" in proc.stderr and "Traceback" not in proc.stderr


def test_activation_checkpointing_keeps_outputs_and_gradients():
    """Recomputed EPA stages give the same loss and gradients, dropout included (RNG replayed)."""
    cfg = dict(in_channels=1, out_channels=3, img_size=(16, 32, 32), feature_size=8, depths=[1, 1, 1, 1],
               decoder_depths=[1, 1, 1], proj_size=[16, 16, 16, 8], decoder_proj_size=16, attn_dropout=0.15)
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 16, 32, 32), torch.randint(0, 3, (2, 16, 32, 32))
    loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=True))
    results = []
    for recompute in (False, True):
        torch.manual_seed(1)
        model = UNETRPP(**cfg).train()
        model.activation_checkpointing = recompute
        torch.manual_seed(2)
        loss = loss_fn(model(x), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys()
    worst = max(((g0[n] - g1[n]).abs().max() / g0[n].abs().max().clamp_min(1e-12)).item() for n in g0)
    assert worst < 1e-5


def test_forward_figure_is_the_multiply_add_count_over_the_median():
    from unetrpp.network import create_model
    from unetrpp.network.analysis import count_macs

    rec = run_suite(["forward"], patch=(32, 64, 64), repeats=2, echo=lambda _: None)
    r = rec["results"]["forward"]
    assert r["patch"] == [32, 64, 64] and len(r["times_s"]) == 2
    assert r["macs"] == count_macs(create_model("synapse", img_size=(32, 64, 64)))[0]
    assert r["gmacs_per_s"] == pytest.approx(r["macs"] / r["median_s"] / 1e9, rel=1e-12)
