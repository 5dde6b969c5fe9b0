"""An official-structured UNETR++ baseline for benchmarks (not part of the package).

Written from ``shared/spec/unetrpp.md`` sections 1.3-1.5: plain NCDHW modules in the official op
order, with the official module names, so an official ``state_dict`` loads into it unchanged. It
reproduces the official-parity digests (``python benchmarks/official_style.py --check``), which is
what makes timing it a fair stand-in for the official code on a machine where that code is not
installed. No code of the official repository is used.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ConvWrap(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


class UnetResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__()
        self.conv1 = ConvWrap(nn.Conv3d(cin, cout, 3, padding=1, bias=False))
        self.conv2 = ConvWrap(nn.Conv3d(cout, cout, 3, padding=1, bias=False))
        make = (lambda c: nn.BatchNorm3d(c)) if norm == "batch" else (lambda c: nn.InstanceNorm3d(c))
        self.norm1, self.norm2 = make(cout), make(cout)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.downsample = cin != cout
        if self.downsample:
            self.conv3 = ConvWrap(nn.Conv3d(cin, cout, 1, bias=False))
            self.norm3 = make(cout)

    def forward(self, x):
        res = x
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if self.downsample:
            res = self.norm3(self.conv3(res))
        return self.act(h + res)


class EPABlock(nn.Module):
    def __init__(self, c: int, n: int, p: int, h: int, kv: str, fusion: str, drop: float) -> None:
        super().__init__()
        self.h, self.kv, self.fusion = h, kv, fusion
        self.temperature = nn.Parameter(torch.ones(h, 1, 1))
        self.temperature2 = nn.Parameter(torch.ones(h, 1, 1))
        self.qkvv = nn.Linear(c, 4 * c, bias=False)
        if kv == "shared_nobias":
            self.EF = nn.Parameter(torch.empty(n, p).uniform_(-1 / math.sqrt(p), 1 / math.sqrt(p)))
        else:
            self.E = nn.Linear(n, p)
            self.F = self.E if kv == "shared" else nn.Linear(n, p)
        self.attn_drop = nn.Dropout(drop)
        self.attn_drop_2 = nn.Dropout(drop)
        if fusion == "concat":
            self.out_proj = nn.Linear(c, c // 2)
            self.out_proj2 = nn.Linear(c, c // 2)

    def forward(self, x):
        b, n, c = x.shape
        qkvv = self.qkvv(x).reshape(b, n, 4, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v_ca, v_sa = (t.transpose(-2, -1) for t in qkvv)
        if self.kv == "shared_nobias":
            k_p = torch.einsum("bhdn,nk->bhdk", k, self.EF)
            v_p = torch.einsum("bhdn,nk->bhdk", v_sa, self.EF)
        else:
            k_p, v_p = self.E(k), self.F(v_sa)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        a_ca = self.attn_drop((q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1))
        x_ca = (a_ca @ v_ca).permute(0, 3, 1, 2).reshape(b, n, c)
        a_sa = self.attn_drop_2((q.permute(0, 1, 3, 2) @ k_p * self.temperature2).softmax(dim=-1))
        x_sa = (a_sa @ v_p.transpose(-2, -1)).permute(0, 3, 1, 2).reshape(b, n, c)
        if self.fusion == "sum":
            return x_sa + x_ca
        return torch.cat((self.out_proj(x_sa), self.out_proj2(x_ca)), dim=-1)


class TransformerBlock(nn.Module):
    def __init__(self, c, n, p, h, kv, fusion, drop, conv_blocks) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.gamma = nn.Parameter(1e-6 * torch.ones(c))
        self.epa_block = EPABlock(c, n, p, h, kv, fusion, drop)
        self.conv51 = UnetResBlock(c, c, "batch")
        if conv_blocks == 2:
            self.conv52 = UnetResBlock(c, c, "batch")
        self.conv8 = nn.Sequential(nn.Dropout3d(0.1), nn.Conv3d(c, c, 1))
        self.pos_embed = nn.Parameter(torch.zeros(1, n, c))

    def forward(self, x):
        b, c, z, y, w = x.shape
        t = x.reshape(b, c, -1).permute(0, 2, 1) + self.pos_embed
        a = t + self.gamma * self.epa_block(self.norm(t))
        s = a.reshape(b, z, y, w, c).permute(0, 4, 1, 2, 3)
        h = self.conv51(s)
        if hasattr(self, "conv52"):
            h = self.conv52(h)
        return s + self.conv8(h)


class Encoder(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        dims, shapes = cfg.dims, cfg.stage_shapes
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(nn.Sequential(
            ConvWrap(nn.Conv3d(cfg.in_channels, dims[0], cfg.stem_stride, cfg.stem_stride, bias=False)),
            nn.GroupNorm(cfg.in_channels, dims[0])))
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                ConvWrap(nn.Conv3d(dims[i], dims[i + 1], 2, 2, bias=False)), nn.GroupNorm(dims[i], dims[i + 1])))
        self.stages = nn.ModuleList(
            nn.Sequential(*[TransformerBlock(dims[i], math.prod(shapes[i]), cfg.proj_size[i], cfg.num_heads,
                                             cfg.kv_proj, cfg.fusion, cfg.attn_dropout, cfg.conv_blocks)
                            for _ in range(cfg.depths[i])])
            for i in range(4))

    def forward(self, x):
        feats = []
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
            feats.append(x)
        return feats


class UpBlock(nn.Module):
    def __init__(self, cin, cout, kernel, n, cfg, epa: bool) -> None:
        super().__init__()
        self.transp_conv = ConvWrap(nn.ConvTranspose3d(cin, cout, kernel, kernel, bias=False))
        if epa:
            self.decoder_block = nn.ModuleList([nn.Sequential(*[
                TransformerBlock(cout, n, cfg.decoder_proj_size, cfg.num_heads, cfg.kv_proj, cfg.fusion,
                                 cfg.attn_dropout, cfg.conv_blocks) for _ in range(3)])])
        else:
            self.decoder_block = nn.ModuleList([UnetResBlock(cout, cout, "instance")])

    def forward(self, x, skip):
        return self.decoder_block[0](self.transp_conv(x) + skip)


class OutBlock(nn.Module):
    def __init__(self, cin, cout) -> None:
        super().__init__()
        self.conv = ConvWrap(nn.Conv3d(cin, cout, 1))

    def forward(self, x):
        return self.conv(x)


class OfficialStyleUNETRPP(nn.Module):
    """Official-structured network for a :class:`unetrpp.UNETRPPConfig` (official key names)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d, shapes, f = cfg.dims, cfg.stage_shapes, cfg.feature_size
        self.unetr_pp_encoder = Encoder(cfg)
        self.encoder1 = UnetResBlock(cfg.in_channels, f, "instance")
        self.decoder5 = UpBlock(d[3], d[2], 2, math.prod(shapes[2]), cfg, True)
        self.decoder4 = UpBlock(d[2], d[1], 2, math.prod(shapes[1]), cfg, True)
        self.decoder3 = UpBlock(d[1], d[0], 2, math.prod(shapes[0]), cfg, True)
        self.decoder2 = UpBlock(d[0], f, cfg.stem_stride, 0, cfg, False)
        self.out1 = OutBlock(f, cfg.out_channels)
        self.out2 = OutBlock(d[0], cfg.out_channels)
        self.out3 = OutBlock(d[1], cfg.out_channels)

    def forward(self, x):
        e1, e2, e3, e4 = self.unetr_pp_encoder(x)
        skip = self.encoder1(x)
        dec3 = self.decoder5(e4, e3)
        dec2 = self.decoder4(dec3, e2)
        dec1 = self.decoder3(dec2, e1)
        out = self.decoder2(dec1, skip)
        return [self.out1(out), self.out2(dec1), self.out3(dec2)]


def _check() -> int:
    """Load each fixture's official weights into the baseline and compare with the digests."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from official_fixture import CONFIGS, draw_official_state_dict, fixture_input, load_fixture
    from unetrpp.network import get_preset

    worst = 0.0
    for name in CONFIGS:
        fx = load_fixture(name)
        net = OfficialStyleUNETRPP(get_preset(name).config()).eval()
        net.load_state_dict(draw_official_state_dict(fx), strict=True)
        with torch.no_grad():
            outs = net(fixture_input(fx))
        for out, ref in zip(outs, fx["outputs"], strict=True):
            sv = np.asarray(ref["sample_value"])
            err = np.abs(out.reshape(-1).numpy()[ref["sample_index"]] - sv).max() / np.abs(sv).max()
            worst = max(worst, err)
            print(f"{name} {list(out.shape)}: max sample error {err:.2e} of the head's range")
    print(f"worst {worst:.2e} (tolerance 1e-4)")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify against the official-parity fixture")
    args = parser.parse_args()
    if args.check:
        raise SystemExit(_check())
    parser.print_help()
