"""Weights on disk: our folder format (``save_pretrained``/``from_pretrained``) and official checkpoints.

Our format is a folder with ``config.json`` (the :class:`~unetrpp.network.UNETRPPConfig`) and
``model.safetensors`` (the state_dict); reading it runs no pickle.

The official code (``Amshaker/unetr_plus_plus``, nnU-Net v1 based) saves
``model_final_checkpoint.model``: a ``torch.save``d dict whose ``state_dict`` entry holds keys such
as ``unetr_pp_encoder.stages.0.0.epa_block.qkvv.weight`` (possibly prefixed ``module.``).
:func:`convert_official_state_dict` maps those keys onto :class:`~unetrpp.network.UNETRPP`:

* Synapse stores one shared ``Linear(N, p)`` twice (``E`` and ``F``): both keys must be equal and
  become one ``proj_kv``;
* BraTS stores a bias-free ``EF`` parameter of shape ``(N, p)``: it becomes ``proj_kv.weight``
  (``(p, N)``, transposed);
* 1x1 ``conv8`` weights become linear weights; temperatures ``(h, 1, 1)`` become ``(h,)``;
* BatchNorm buffers (``running_*``, ``num_batches_tracked``) are kept; InstanceNorm has none.

Official files are read with ``torch.load(weights_only=True)``: no pickled code runs. The only
non-tensor globals allowed are numpy scalars/dtypes, which official checkpoints carry in their
training logs.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .presets import get_preset
from .unetrpp import UNETRPP, UNETRPPConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------- our format
def save_pretrained(model: UNETRPP, path: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into the folder ``path`` (atomically per file)."""
    from safetensors.torch import save_file

    from ..io.atomic import atomic_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    meta = {"model": "UNETRPP", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    with atomic_path(path / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    cls: type[UNETRPP] = UNETRPP) -> UNETRPP:
    """Rebuild a model saved by :func:`save_pretrained` (no pickle is read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (a saved UNETR++ model is a folder with "
                                    f"{CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(cfg_file.read_text())
        cfg = meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: not a UNETR++ config ({e})") from None
    model = cls(**cfg)
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable safetensors file ({e})") from None
    load_state_dict_checked(model, state, source=str(weights))
    return model


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first bad key and shape."""
    own = model.state_dict()
    for key, value in own.items():
        if key not in state:
            raise UserError(f"{source}: missing key {key!r} (expected shape {tuple(value.shape)})")
        if tuple(state[key].shape) != tuple(value.shape):
            raise UserError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, "
                             f"the model expects {tuple(value.shape)}")
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"{source}: unexpected key {extra[0]!r} (shape {tuple(state[extra[0]].shape)})"
                         + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- official
_DECODERS = {"decoder5": 0, "decoder4": 1, "decoder3": 2}


class CheckpointError(UserError):
    """An official checkpoint that cannot be read or does not fit the model."""


def _safe_numpy_globals() -> list:
    """numpy arrays, dtypes and scalars as torch's restricted unpickler meets them, under numpy 1 and 2 names.

    Official checkpoints were written under numpy 1, whose scalars pickle as
    ``numpy.core.multiarray.scalar``; numpy 2 calls the module ``numpy._core``: both names are
    admitted, nothing else beyond torch's own tensors and containers.
    """
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    out: list = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    for prefix in ("numpy.core", "numpy._core"):
        out += [(multiarray._reconstruct, f"{prefix}.multiarray._reconstruct"),
                (multiarray.scalar, f"{prefix}.multiarray.scalar")]
    out += [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "int16", "int8",
                                        "uint8", "bool")]
    return out


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a ``torch.save``d file without executing pickled code.

    Raises:
        CheckpointError: with a one-line reason (file missing, truncated, or carrying code).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    from ..checkpoint import check_archive

    try:
        check_archive(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message advises weights_only=False, which would run the file's code: never repeat it
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if not found and "global" not in str(e).lower():  # random or damaged bytes, not a pickled object
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (damaged or another kind of file)") from None
        what = f"the global {found.group(1)}" if found else "objects other than tensors and containers"
        raise CheckpointError(f"{path}: refused to load: it contains {what}, which could run code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except Exception as e:  # whatever else torch's reader raises on arbitrary bytes (IndexError, KeyError, ...)
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (damaged or another kind of file: "
                              f"{type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a checkpoint or a state_dict), got {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of an official checkpoint (or the dict itself), ``module.`` stripped."""
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        raise CheckpointError(f"{source}: the state_dict is empty")
    return out


def _block_key(rest: str, kv_proj: str) -> str | None:
    """Official TransformerBlock sub-key -> ours (None: drop, used for the tied ``F``)."""
    simple = {"gamma": "gamma", "pos_embed": "pos_embed", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
              "epa_block.temperature": "attn.temperature_channel",
              "epa_block.temperature2": "attn.temperature_spatial",
              "epa_block.qkvv.weight": "attn.qkvv.weight", "epa_block.EF": "attn.proj_kv.weight",
              "conv8.1.weight": "proj.weight", "conv8.1.bias": "proj.bias"}
    if rest in simple:
        return simple[rest]
    m = re.fullmatch(r"epa_block\.(E|F|out_proj|out_proj2)\.(weight|bias)", rest)
    if m:
        name, leaf = m.groups()
        if name in ("E", "F"):
            if kv_proj == "separate":
                return f"attn.proj_{'k' if name == 'E' else 'v'}.{leaf}"
            return f"attn.proj_kv.{leaf}" if name == "E" else None
        return f"attn.{'out_spatial' if name == 'out_proj' else 'out_channel'}.{leaf}"
    m = re.fullmatch(r"conv5([12])\.(conv[12])\.conv\.weight", rest)
    if m:
        return f"convs.{int(m.group(1)) - 1}.{m.group(2)}.weight"
    m = re.fullmatch(r"conv5([12])\.(norm[12]\.\w+)", rest)
    if m:
        return f"convs.{int(m.group(1)) - 1}.{m.group(2)}"
    raise KeyError(rest)


def official_key_to_ours(key: str, kv_proj: str) -> str | None:
    """Map one official state_dict key to ours; ``None`` for keys that are dropped (tied ``F``)."""
    patterns = [
        (r"unetr_pp_encoder\.downsample_layers\.(\d)\.0\.conv\.weight", lambda m: f"downsample.{m[1]}.conv.weight"),
        (r"unetr_pp_encoder\.downsample_layers\.(\d)\.1\.(weight|bias)", lambda m: f"downsample.{m[1]}.norm.{m[2]}"),
        (r"decoder([543])\.transp_conv\.conv\.weight", lambda m: f"decoder.{_DECODERS['decoder' + m[1]]}.up.weight"),
        (r"encoder1\.conv([12])\.conv\.weight", lambda m: f"stem_block.conv{m[1]}.weight"),
        (r"encoder1\.conv3\.conv\.weight", lambda m: "stem_block.skip.weight"),
        (r"decoder2\.transp_conv\.conv\.weight", lambda m: "final.up.weight"),
        (r"decoder2\.decoder_block\.0\.conv([12])\.conv\.weight", lambda m: f"final.block.conv{m[1]}.weight"),
        (r"out([123])\.conv\.conv\.(weight|bias)", lambda m: f"heads.{int(m[1]) - 1}.{m[2]}"),
    ]
    for pattern, build in patterns:
        m = re.fullmatch(pattern, key)
        if m:
            return build(m)
    m = re.fullmatch(r"unetr_pp_encoder\.stages\.(\d)\.(\d+)\.(.+)", key)
    if m:
        sub = _block_key(m[3], kv_proj)
        return None if sub is None else f"stages.{m[1]}.{m[2]}.{sub}"
    m = re.fullmatch(r"decoder([543])\.decoder_block\.0\.(\d+)\.(.+)", key)
    if m:
        sub = _block_key(m[3], kv_proj)
        return None if sub is None else f"decoder.{_DECODERS['decoder' + m[1]]}.blocks.{m[2]}.{sub}"
    raise KeyError(key)


def convert_official_state_dict(state: dict[str, torch.Tensor], model: UNETRPP,
                                source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Official keys and layouts -> a state_dict for ``model``; checks every key and shape.

    Raises:
        CheckpointError: naming the first official key that is unknown, missing, tied wrongly or
            of the wrong shape.
    """
    kv = model.config.kv_proj
    expected = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        try:
            ours = official_key_to_ours(key, kv)
        except KeyError:
            raise CheckpointError(f"{source}: unexpected key {key!r} (shape {tuple(value.shape)}) for a "
                                  f"kv_proj={kv!r} model; is this the right preset?") from None
        if ours is None:  # tied F: must equal E
            tied = key.replace(".F.", ".E.")
            if tied not in state:
                raise CheckpointError(f"{source}: key {key!r} is tied to {tied!r}, which is missing")
            if state[tied].shape != value.shape or not torch.equal(state[tied], value):
                raise CheckpointError(f"{source}: key {key!r} differs from {tied!r}, but this preset shares one "
                                      "projection for K and V (kv_proj='shared'); use a kv_proj='separate' preset")
            continue
        if key.endswith("epa_block.EF"):
            value = value.t()  # (N, p) parameter -> (p, N) Linear weight
        elif key.endswith(("temperature", "temperature2")):
            value = value.reshape(-1)  # (h, 1, 1) -> (h,)
        elif key.endswith("conv8.1.weight"):
            value = value.flatten(1)  # 1x1x1 conv -> linear
        if ours not in expected:
            raise CheckpointError(f"{source}: key {key!r} (shape {tuple(value.shape)}) has no place in this "
                                  "model (deep supervision off, or another variant?)")
        if tuple(value.shape) != tuple(expected[ours].shape):
            want = tuple(expected[ours].shape)
            if key.endswith("epa_block.EF"):
                want = want[::-1]
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(state[key].shape)}, the model expects "
                                  f"{want}; the patch size or preset differs (see --patch-size / --preset)")
        out[ours] = value.to(expected[ours].dtype).contiguous()
        origin[ours] = key
    missing = [k for k in expected if k not in out]
    if missing:
        raise CheckpointError(f"{source}: the checkpoint has no weights for {missing[0]!r} (shape "
                              f"{tuple(expected[missing[0]].shape)})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return out


def infer_config(state: dict[str, torch.Tensor], preset: str, img_size=None) -> UNETRPPConfig:
    """The preset's config with in/out channels read off the weights (and an optional patch size)."""
    overrides: dict = {}
    stem = state.get("unetr_pp_encoder.downsample_layers.0.0.conv.weight")
    if stem is not None:
        overrides["in_channels"] = int(stem.shape[1])
    head = state.get("out1.conv.conv.weight")
    if head is not None:
        overrides["out_channels"] = int(head.shape[0])
    overrides["deep_supervision"] = "out2.conv.conv.weight" in state
    if img_size is not None:
        overrides["img_size"] = tuple(img_size)
    return get_preset(preset).config(**overrides)


def load_official(path_or_state: str | os.PathLike | dict, preset: str, img_size=None) -> UNETRPP:
    """Build the preset and load official weights into it (a checkpoint file or a state_dict)."""
    if isinstance(path_or_state, dict):
        source, obj = "state_dict", path_or_state
    else:
        source, obj = str(path_or_state), read_checkpoint(path_or_state)
    state = extract_state_dict(obj, source)
    try:
        cfg = infer_config(state, preset, img_size)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    model = UNETRPP.from_config(cfg)
    model.load_state_dict(convert_official_state_dict(state, model, source), strict=True)
    return model
