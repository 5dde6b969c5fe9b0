"""The sliding window's shortcuts: ``EXACT`` is the official protocol bit for bit; each shortcut
changes no voxel where its condition holds, and visibly changes the answer where it does not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from unetrpp.inference import sliding_window as sw
from unetrpp.inference.sliding_window import EXACT, Shortcuts, gaussian_importance, sliding_window_probabilities

PATCH = (8, 12, 10)


class ConvNet(torch.nn.Module):
    """A fixed 3-class conv net; ``symmetric`` kernels make it equal under flips, ``scale`` sets its confidence."""

    def __init__(self, seed=0, symmetric=False, scale=1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv3d(1, 3, 5, padding=2)
        self.mix = torch.nn.Conv3d(3, 3, 1)
        with torch.no_grad():
            if symmetric:
                w = self.conv.weight
                w.copy_(sum(torch.flip(w, d) for r in range(4) for d in itertools.combinations((2, 3, 4), r)) / 8)
            self.conv.weight.mul_(scale)
            self.mix.weight.mul_(scale)

    def forward(self, x):
        return self.mix(torch.tanh(self.conv(x)))


def _reference(net, image, patch, k, step=0.5, mirror=True):
    """The official protocol written out plainly: every window, every flip, one at a time."""
    image = torch.as_tensor(image).float()
    shape = image.shape[1:]
    acc = torch.zeros((k, *shape))
    weight = torch.zeros(shape)
    g = gaussian_importance(patch)
    flips = [list(a) for r in range(4) for a in itertools.combinations((0, 1, 2), r)] if mirror else [[]]
    for st in sw.window_grid(shape, patch, step):
        box = tuple(slice(s, s + p) for s, p in zip(st, patch, strict=True))
        x = image[(slice(None), *box)][None]
        probs = None
        for axes in flips:
            dims = [a + 2 for a in axes]
            p = torch.softmax(net(torch.flip(x, dims) if dims else x).float(), dim=1)
            p = torch.flip(p, dims) if dims else p
            probs = p if probs is None else probs.add_(p)
        probs.mul_(g / len(flips))
        acc[(slice(None), *box)] += probs[0]
        weight[box] += g
    return acc / weight


def _blob_image(shape=(20, 30, 26), seed=0):
    """Zero background (constant windows) around a textured block."""
    rng = np.random.default_rng(seed)
    img = np.zeros((1, *shape), np.float32)
    img[0, 4:12, 6:18, 5:15] = rng.normal(0, 1, (8, 12, 10))
    return torch.from_numpy(img)


@torch.no_grad()
@pytest.mark.parametrize("mirror", [True, False])
def test_exact_is_the_official_protocol_bit_for_bit(mirror):
    net = ConvNet().eval()
    image = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    axes = sw.MIRROR_AXES if mirror else ()
    stats: dict = {}
    ours = sliding_window_probabilities(net, image, PATCH, 3, mirror_axes=axes, batch=1, shortcuts=EXACT, stats=stats)
    ref = _reference(net, image, PATCH, 3, mirror=mirror)
    assert torch.equal(ours, ref)
    assert stats["passes"] == stats["windows"] * (8 if mirror else 1) and stats["constant"] == 0


@torch.no_grad()
def test_constant_windows_are_computed_once_and_change_no_voxel():
    net = ConvNet().eval()
    image = _blob_image()
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    stats: dict = {}
    fast = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(True, None, None), stats=stats)
    assert stats["constant"] >= 10
    assert stats["passes"] == 8 * (stats["windows"] - stats["constant"] + 1)  # one value: one window computed
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    assert torch.equal(fast.argmax(0), exact.argmax(0))


@torch.no_grad()
def test_treating_windows_that_differ_as_constant_would_change_the_answer(monkeypatch):
    net = ConvNet().eval()
    image = _blob_image()
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    monkeypatch.setattr(sw, "_constant_key", lambda window: b"all the same")
    wrong = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(True, None, None))
    assert (wrong.argmax(0) != exact.argmax(0)).sum() > 50


@torch.no_grad()
def test_two_phases_over_every_window_are_the_exact_arithmetic():
    net = ConvNet(seed=3, scale=0.7).eval()
    image = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    stats: dict = {}
    # constant_windows on (there are none here) takes the two-phase driver
    fast = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(True, None, None), stats=stats)
    assert stats["passes"] == 8 * stats["windows"] and stats["mirrored_windows"] == stats["windows"]
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
def test_mirrorings_side_by_side_are_the_exact_arithmetic(batch):
    # batch 3 and 13 split a window's 7 mirrored passes over two calls, and put several windows in one
    net = ConvNet(seed=5, scale=0.8).eval()
    image = torch.from_numpy(np.random.default_rng(6).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return net(x)

    stats: dict = {}
    fast = sliding_window_probabilities(counted, image, PATCH, 3, batch=batch, shortcuts=Shortcuts(False, None, None),
                                        stats=stats)
    n = stats["windows"]
    assert stats["passes"] == 8 * n and sum(calls) == 8 * n and max(calls) == batch  # n = 36 windows
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    assert torch.equal(fast.argmax(0), exact.argmax(0))


class MixesTheBatch(torch.nn.Module):
    """A network whose answer for one window depends on the others in its call (as BatchNorm in training mode)."""

    def __init__(self):
        super().__init__()
        self.net = ConvNet(seed=5, scale=0.8)

    def forward(self, x):
        out = self.net(x)
        return out - 3 * out.mean(0, keepdim=True)


@torch.no_grad()
def test_side_by_side_passes_change_the_answer_of_a_network_that_mixes_the_batch():
    net = MixesTheBatch().eval()
    image = torch.from_numpy(np.random.default_rng(6).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, batch=1, shortcuts=EXACT)
    one = sliding_window_probabilities(net, image, PATCH, 3, batch=1, shortcuts=Shortcuts(False, None, None))
    torch.testing.assert_close(one, exact, rtol=0, atol=1e-6)  # one pass per call: the condition holds
    eight = sliding_window_probabilities(net, image, PATCH, 3, batch=8, shortcuts=Shortcuts(False, None, None))
    assert (eight - exact).abs().max() > 0.05 and (eight.argmax(0) != exact.argmax(0)).sum() > 5


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_autocast_runs_both_drivers(device):
    # the GPU path: logits in the autocast dtype, softmax and accumulation in float32 (bf16 on a CPU)
    net = ConvNet(seed=5, scale=0.8).eval().to(device)
    image = torch.from_numpy(np.random.default_rng(6).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT, device=device).cpu()
    amp = "fp16" if device == "cuda" else "bf16"
    for shortcuts in (EXACT, Shortcuts(False, None, None), sw.DEFAULT_SHORTCUTS):
        low = sliding_window_probabilities(net, image, PATCH, 3, amp=amp, shortcuts=shortcuts, batch=8,
                                           device=device).cpu()
        assert low.dtype == torch.float32 and not torch.equal(low, exact)  # it did run in the lower precision
        assert (low - exact).abs().max() < 0.05
        assert (low.argmax(0) == exact.argmax(0)).float().mean() > 0.95


@torch.no_grad()
def test_the_progress_bar_counts_every_pass(monkeypatch):
    import tqdm

    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n, self.kwargs = total, 0, kwargs
            bars.append(self)

        def update(self, k):
            self.n += k

        def refresh(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.normal(0, 1, (1, 17, 60, 19)).astype(np.float32))
    image[0, :, 30:] = torch.from_numpy(3 + rng.uniform(-0.1, 0.1, (17, 30, 19)).astype(np.float32))
    stats: dict = {}
    sliding_window_probabilities(SureWhereBright().eval(), image, PATCH, 3, shortcuts=sw.DEFAULT_SHORTCUTS,
                                 progress=True, stats=stats)
    # phase 1 (one pass per window), then the 7 mirrored passes of the windows that needed them
    assert 0 < stats["mirrored_windows"] < stats["windows"]
    assert bars[-1].n == bars[-1].total == stats["passes"] == stats["windows"] + 7 * stats["mirrored_windows"]
    sliding_window_probabilities(SureWhereBright().eval(), image, PATCH, 3, shortcuts=EXACT, progress=True,
                                 stats=stats)
    assert bars[-1].n == bars[-1].total == stats["windows"] and bars[-1].kwargs["unit"] == "win"


def test_passes_per_call_follow_the_patch():
    assert sw.passes_per_call((32, 64, 32)) == 8  # hippocampus: 1.5x faster per pass than 2 per call
    assert sw.passes_per_call((32, 96, 96)) == 7  # the CT network: 1.2x
    assert sw.passes_per_call((64, 128, 128)) == 2  # synapse: no faster in larger calls; memory stays bounded
    assert sw.passes_per_call((128, 128, 128)) == 1
    assert sw.passes_per_call((64, 128, 128), "cuda") == 4
    assert sw.passes_per_call((128, 128, 128), "cuda") == 4  # never fewer than the exact driver's 4 windows
    assert sw.passes_per_call((32, 64, 32), "cuda") == 8
    assert sw.passes_per_call((8, 8, 8)) == 8
    with pytest.raises(sw.UserError, match="batch must be at least 1"):
        sliding_window_probabilities(ConvNet(), torch.zeros(1, 8, 12, 10), PATCH, 3, batch=0)


@torch.no_grad()
def test_mirrors_only_where_unsure_change_no_voxel_where_mirrors_and_windows_agree():
    # a voxel-wise network: the same answer under every flip and in every window; unsure in places
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 1)).eval()
    image = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    stats: dict = {}
    fast = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(False, 0.5, 1.0), stats=stats)
    assert stats["mirrored_windows"] > 0 and stats["passes"] < 8 * stats["windows"]
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-6)
    assert torch.equal(fast.argmax(0), exact.argmax(0))


@torch.no_grad()
def test_skipping_the_mirrors_of_an_unsure_network_changes_the_answer():
    net = ConvNet(seed=3, scale=0.7).eval()  # unsure, and not flip-consistent
    image = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 17, 23, 19)).astype(np.float32))
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    stats: dict = {}
    forced = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(False, 0.0, 1.0), stats=stats)
    assert stats["mirrored_windows"] == 0 and stats["passes"] == stats["windows"]
    assert (forced.argmax(0) != exact.argmax(0)).sum() > 20
    # everything unsure (margin 1): every voxel gets its mirrors back, on the coarse grid
    stats = {}
    sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(False, 1.0, 1.0), stats=stats)
    assert stats["mirrored_windows"] == len(sw.window_grid((17, 23, 19), PATCH, 1.0))


class SureWhereBright(torch.nn.Module):
    """Class 1 with certainty where the input is near 3; elsewhere an unsure, flip-inconsistent ConvNet."""

    def __init__(self):
        super().__init__()
        self.unsure = ConvNet(seed=3, scale=0.7)

    def forward(self, x):
        bright = (x - 3).abs() < 0.5
        sure = torch.stack([torch.zeros_like(x[:, 0]), torch.full_like(x[:, 0], 40.0), torch.zeros_like(x[:, 0])], 1)
        return torch.where(bright, sure, self.unsure(x))


@torch.no_grad()
def test_the_default_gives_every_unsure_voxel_the_exact_answer_and_skips_only_sure_windows():
    rng = np.random.default_rng(4)
    image = torch.from_numpy(rng.normal(0, 1, (1, 17, 60, 19)).astype(np.float32))
    image[0, :, 30:] = torch.from_numpy(3 + rng.uniform(-0.1, 0.1, (17, 30, 19)).astype(np.float32))  # sure
    net = SureWhereBright().eval()
    exact = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=EXACT)
    stats: dict = {}
    fast = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=sw.DEFAULT_SHORTCUTS, stats=stats)
    # the windows wholly in the bright half skip their mirrors ...
    assert 0 < stats["mirrored_windows"] < stats["windows"] and stats["passes"] < 8 * stats["windows"]
    # ... and every voxel that any unsure window reaches gets the exact value; the labels are the exact ones
    torch.testing.assert_close(fast[:, :, :36], exact[:, :, :36], rtol=0, atol=1e-6)
    assert torch.equal(fast.argmax(0), exact.argmax(0))
    # the coarser mirror grid (--mirror-step 1) blends other windows: it changes unsure voxels' answers
    coarse = sliding_window_probabilities(net, image, PATCH, 3, shortcuts=Shortcuts(True, 0.3, 1.0, 0.05))
    assert (coarse[:, :, :30] - exact[:, :, :30]).abs().max() > 1e-3


def test_the_mirror_grid_tiles_the_unsure_box():
    unsure = torch.zeros((40, 50, 30), dtype=torch.bool)
    assert sw._mirror_grid(unsure, unsure.shape, PATCH, 1.0) == []
    unsure[20, 25, 15] = True  # one voxel: one window centred on it
    assert sw._mirror_grid(unsure, unsure.shape, PATCH, 1.0) == [(16, 19, 10)]
    unsure[0, 0, 0] = True  # the box now spans from the corner: tiled at step 1 within it
    assert sw._mirror_grid(unsure, unsure.shape, PATCH, 1.0) == [
        (z, y, x) for z in (0, 6, 13) for y in (0, 7, 14) for x in (0, 6)]


def test_predict_flags(tmp_path, capsys):
    from tests.cli.test_hostile import _one_line_error
    from unetrpp.cli.main import main

    _one_line_error(capsys, ["predict", "-i", tmp_path, "-o", tmp_path / "o", "-m", tmp_path / "m.pt", "--exact",
                             "--mirror-margin", "0.2"], "--exact computes everything")
    with pytest.raises(SystemExit):
        main(["predict", "-i", str(tmp_path), "-o", "o", "-m", "m.pt", "--mirror-margin", "1.5"])
    assert "a probability margin between 0 and 1" in capsys.readouterr().err
