"""Fine-tuning: a new run starts from the weights of a trained network (``train --pretrained``).

The new network has the pretrained one's architecture (width, blocks, heads, stem stride), with the
run's own class count and patch. :func:`transfer_weights` then copies every tensor whose name and
shape match; when the patch differs it interpolates, trilinearly over each stage's 3D token grid,
the positional embeddings and the attention's token projections (``Linear(N, p)``: each of the p
rows is a weighting of the N tokens, resampled to the new grid and scaled by N_old / N_new so it
sums alike); every other tensor stays as the new network initialised it (the output heads when
the class count differs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..network.unetrpp import UNETRPPConfig

#: Fields a fine-tuning run does not take from the pretrained network: its classes, its patch, and
#: deep supervision (a training choice: extra heads the source lacks start from their own init).
NOT_INHERITED = ("out_channels", "img_size", "deep_supervision")


def architecture(config) -> dict:
    """The pretrained network's constructor arguments that the new run's network takes over (a
    baseline's with its ``arch``, strides and kernels)."""
    from ..network.baselines import BaselineConfig

    d = config.to_dict() if isinstance(config, BaselineConfig) else _config(config).to_dict()
    return {k: v for k, v in d.items() if k not in NOT_INHERITED}


def token_grids(config: UNETRPPConfig | dict) -> dict[str, tuple[int, int, int]]:
    """The 3D token grid (z, y, x) of every positional embedding of a UNETR++ of ``config``, by name.

    Encoder stage ``i`` works on ``stage_shapes[i]``; decoder stage ``j`` (coarse to fine) on the
    grid of encoder stage ``2 - j``. Tokens are in raster order (x fastest), as ``volume_to_tokens``.
    """
    cfg = _config(config)
    shapes = cfg.stage_shapes
    grids: dict[str, tuple[int, int, int]] = {}
    for i, depth in enumerate(cfg.depths):
        for k in range(depth):
            grids[f"stages.{i}.{k}.pos_embed"] = tuple(shapes[i])
    for j, depth in enumerate(cfg.decoder_depths):
        for k in range(depth):
            grids[f"decoder.{j}.blocks.{k}.pos_embed"] = tuple(shapes[2 - j])
    return grids


def resize_pos_embed(pos: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """``(1, prod(old_grid), C)`` positional embeddings trilinearly interpolated to ``(1, prod(new_grid), C)``."""
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    if pos.dim() != 3 or pos.shape[1] != math.prod(old_grid):
        raise UserError(f"positional embedding of shape {tuple(pos.shape)} does not hold a {old_grid} grid")
    c = pos.shape[2]
    vol = pos.detach().float().reshape(pos.shape[0], *old_grid, c).permute(0, 4, 1, 2, 3)
    out = F.interpolate(vol, size=new_grid, mode="trilinear", align_corners=False)
    return out.permute(0, 2, 3, 4, 1).reshape(pos.shape[0], math.prod(new_grid), c).to(pos.dtype)


_TOKEN_PROJECTIONS = (".attn.proj_kv.weight", ".attn.proj_k.weight", ".attn.proj_v.weight")


def _grid_of(name: str, grids: dict[str, tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The token grid a positional embedding or a token projection of a block works on."""
    if name in grids:
        return grids[name]
    for end in _TOKEN_PROJECTIONS:
        if name.endswith(end):
            return grids.get(name[: -len(end)] + ".pos_embed")
    return None


def resize_token_projection(weight: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """``(p, prod(old_grid))`` token-projection weights resampled to ``(p, prod(new_grid))`` (trilinear),
    scaled by ``N_old / N_new`` so a projection of the same content keeps its magnitude."""
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    if weight.dim() != 2 or weight.shape[1] != math.prod(old_grid):
        raise UserError(f"token projection of shape {tuple(weight.shape)} does not hold a {old_grid} grid")
    vol = weight.detach().float().reshape(1, weight.shape[0], *old_grid)
    out = F.interpolate(vol, size=new_grid, mode="trilinear", align_corners=False)
    scale = math.prod(old_grid) / math.prod(new_grid)
    return (out.reshape(weight.shape[0], math.prod(new_grid)) * scale).to(weight.dtype)


def transfer_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     source_config: UNETRPPConfig | dict | None = None) -> dict:
    """Load what fits of ``state`` (the pretrained weights) into ``model``; returns what was done.

    ``source_config``: the pretrained network's config, to know its token grids (without it,
    positional embeddings of another size are re-initialised instead of interpolated). The report:
    ``{"source", "loaded": count, "resized": [names], "reinitialised": [names], "unused": [names]}``
    (``unused``: pretrained tensors the model has no place for).
    """
    own = model.state_dict()
    new_grids = token_grids(model.config) if isinstance(getattr(model, "config", None), UNETRPPConfig) else {}
    old_grids = token_grids(source_config) if source_config is not None else {}
    take: dict[str, torch.Tensor] = {}
    loaded, resized, reinitialised = 0, [], []
    for name, mine in own.items():
        theirs = state.get(name)
        if theirs is None:
            reinitialised.append(name)
        elif tuple(theirs.shape) == tuple(mine.shape):
            take[name] = theirs
            loaded += 1
        elif (old := _grid_of(name, old_grids)) and (new := _grid_of(name, new_grids)) and \
                theirs.shape[1] == math.prod(old) and mine.shape[1] == math.prod(new):
            if theirs.dim() == 3 and theirs.shape[2] == mine.shape[2]:
                take[name] = resize_pos_embed(theirs, old, new)
            elif theirs.dim() == 2 and theirs.shape[0] == mine.shape[0]:
                take[name] = resize_token_projection(theirs, old, new)
            else:
                reinitialised.append(name)
                continue
            resized.append(name)
        else:
            reinitialised.append(name)
    model.load_state_dict(take, strict=False)
    unused = [k for k in state if k not in own]
    return {"source": str(source), "loaded": loaded, "resized": resized, "reinitialised": reinitialised,
            "unused": unused}


def describe(report: dict) -> str:
    """The report in one line: ``pretrained PATH: loaded N tensors, resized K (...), re-initialised M (...)``."""
    def names(v: list[str]) -> str:
        return f" ({', '.join(v)})" if v else ""

    line = (f"pretrained {report['source']}: loaded {report['loaded']} tensors, resized {len(report['resized'])}"
            f"{names(report['resized'])}, re-initialised {len(report['reinitialised'])}"
            f"{names(report['reinitialised'])}")
    if report.get("unused"):
        line += f", not used {len(report['unused'])}{names(report['unused'])}"
    return line


def _config(config: UNETRPPConfig | dict) -> UNETRPPConfig:
    if isinstance(config, UNETRPPConfig):
        return config
    names = {f.name for f in dataclasses.fields(UNETRPPConfig)}
    return UNETRPPConfig(**{k: v for k, v in config.items() if k in names})


def load_pretrained(path) -> tuple[object, int]:
    """The first member network of a checkpoint, run folder or model package, and how many it has."""
    from ..inference.model import load_model

    model = load_model(path, postprocessing="none")
    return model.members[0], len(model.members)
