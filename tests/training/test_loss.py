"""Loss values on hand-computed cases; deep-supervision targets for every preset."""

import math

import pytest
import torch

from unetrpp.network.presets import PRESETS
from unetrpp.training.loss import DeepSupervisionLoss, DiceCELoss, downsample_target, soft_dice_loss

SMOOTH = 1e-5


def _two_voxels():
    # one sample, two classes, two voxels: softmax gives p1 = (0.5, 0.75); the labels are (0, 1)
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3.0)]]]).reshape(1, 2, 1, 1, 2)
    target = torch.tensor([0, 1]).reshape(1, 1, 1, 2)
    return logits, target


def test_dice_ce_by_hand():
    logits, target = _two_voxels()
    ce = (-math.log(0.5) - math.log(0.75)) / 2
    tp, size_p, size_g = 0.75, 0.5 + 0.75, 1.0
    dice_fg = (2 * tp + SMOOTH) / (size_p + size_g + SMOOTH + 1e-8)
    assert soft_dice_loss(logits, target).item() == pytest.approx(-dice_fg, abs=1e-6)
    assert DiceCELoss()(logits, target).item() == pytest.approx(ce - dice_fg, abs=1e-6)
    # with background: class 0 has tp 0.5, |P| 0.75, |G| 1
    dice_bg = (2 * 0.5 + SMOOTH) / (0.75 + 1 + SMOOTH + 1e-8)
    got = soft_dice_loss(logits, target, include_background=True).item()
    assert got == pytest.approx(-(dice_bg + dice_fg) / 2, abs=1e-6)


def test_batch_dice_differs_from_per_sample_dice_by_hand():
    # sample 0: perfect foreground prediction of 1 voxel; sample 1: no foreground, predicted 1 voxel
    big = 20.0
    logits = torch.full((2, 2, 1, 1, 2), -big)
    logits[:, 0] = big  # background everywhere ...
    logits[0, :, 0, 0, 1] = torch.tensor([-big, big])  # ... except sample 0 voxel 1: foreground
    logits[1, :, 0, 0, 0] = torch.tensor([-big, big])  # ... and sample 1 voxel 0: foreground (wrong)
    target = torch.tensor([[0, 1], [0, 0]]).reshape(2, 1, 1, 2)
    per_sample = soft_dice_loss(logits, target, batch_dice=False).item()
    batch = soft_dice_loss(logits, target, batch_dice=True).item()
    # per sample: Dice 1 and (0 + s) / (1 + s); batch: 2 tp = 2, |P| + |G| = 2 + 1
    assert per_sample == pytest.approx(-(1 + SMOOTH / (1 + SMOOTH)) / 2, abs=1e-5)
    assert batch == pytest.approx(-(2 + SMOOTH) / (3 + SMOOTH), abs=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_deep_supervision_targets_for_each_preset(name):
    cfg = PRESETS[name].config()
    shapes = [tuple(cfg.img_size), *cfg.stage_shapes[:2]]
    torch.manual_seed(0)
    target = torch.randint(0, cfg.out_channels, (1, *cfg.img_size))
    for shape in shapes:
        down = downsample_target(target, shape)
        assert tuple(down.shape[1:]) == shape
        k = [a // b for a, b in zip(cfg.img_size, shape, strict=True)]
        assert torch.equal(down, target[:, :: k[0], :: k[1], :: k[2]])  # nearest = every k-th voxel
    outputs = [torch.randn(1, cfg.out_channels, *s) for s in shapes]
    inner = DiceCELoss()
    expected = sum(w * inner(o, downsample_target(target, o.shape[2:]))
                   for w, o in zip((4 / 7, 2 / 7, 1 / 7), outputs, strict=True))
    assert DeepSupervisionLoss(inner)(outputs, target).item() == pytest.approx(expected.item(), rel=1e-6)
