"""Official UNETR++ checkpoints (nnU-Net v1) -> a model package that ``unetrpp predict`` runs.

The official code saves two files per fold:

* ``model_final_checkpoint.model``: a ``torch.save``d dict with ``epoch``, ``state_dict``, the
  optimizer state and the training curves;
* ``model_final_checkpoint.model.pkl``: a plain pickle written by nnU-Net v1's
  ``nnUNetTrainer.save_checkpoint``: ``{"init": trainer arguments (plans_file, fold,
  output_folder, dataset_directory, batch_dice, stage, ...), "name": trainer class name,
  "class": its repr, "plans": the v1 plans}``.

The v1 plans fix the preprocessing the network was trained with: per stage the target spacing
(``current_spacing``) and patch size, both in the axis order *after* ``transpose_forward``; per
channel a normalisation scheme (``CT``: clip to the dataset's foreground 0.5/99.5 percentiles and
z-score with its foreground mean/sd, from ``dataset_properties.intensityproperties``; ``nonCT``:
per-image z-score, inside the nonzero mask where ``use_mask_for_norm``; ``noNorm``); the
preprocessor (``GenericPreprocessor``: third-order images, the low-resolution axis separately).
:func:`convert_plans` turns them into our :class:`~unetrpp.data.plans.Plans`.

Neither file is read with the standard unpickler, which runs whatever the file names: the
checkpoint goes through ``torch.load(weights_only=True)`` (numpy scalars and arrays allowed, under
their numpy-1 and numpy-2 names), the ``.pkl`` through :class:`SafeUnpickler`, which admits plain
containers and numpy arrays/scalars and refuses every other global before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import time
from pathlib import Path

import numpy as np
import torch

from ..data.plans import Plans
from ..errors import UserError

#: a plans pickle is kilobytes to a few megabytes; anything far larger is not one
MAX_PICKLE_BYTES = 256 << 20
#: nnU-Net v1 preprocessors we reproduce: name -> our ``Plans.resampling``
_PREPROCESSORS = {
    "GenericPreprocessor": {"image_order": 3, "label_order": 1, "anisotropy_threshold": 3.0,
                            "low_resolution_axis_order": 0},
    "GenericPreprocessor_linearResampling": {"image_order": 1, "label_order": 1, "anisotropy_threshold": 3.0,
                                             "low_resolution_axis_order": 0},
}
#: label names of the official datasets (used when no --labels is given and the network matches)
_BRATS_LABELS = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
_LUNG_LABELS = {"background": 0, "cancer": 1}


# ---------------------------------------------------------------------- reading the .pkl safely
def _latin1_encode(text, encoding="latin1"):
    """What protocol-2 pickles call to rebuild ``bytes`` (``_codecs.encode(str, 'latin1')``); nothing else."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode called with something other than (str, 'latin1')")
    return text.encode("latin1")


#: the most elements an array made by a pickle's call may have before its data arrives (numpy's own
#: pickles make arrays of 0 elements and fill them from bytes the file holds)
_MAX_EMPTY_ELEMENTS = 1 << 16


def _plain_dtype(*args):
    """``numpy.dtype(...)``, refusing object dtypes (whose elements could be any object)."""
    return _checked(np.dtype(*args))


class _NdarrayType:
    """Stands for ``numpy.ndarray`` in a pickle: a direct call makes only small empty arrays."""

    def __call__(self, shape, dtype=float, *args, **kwargs):
        return _reconstruct_array(np.ndarray, shape, dtype)


_NDARRAY = _NdarrayType()


def _reconstruct_array(subtype, shape, dtype):
    """``multiarray._reconstruct`` for plain ``ndarray``s of a bounded size and a non-object dtype."""
    if subtype is not np.ndarray and subtype is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy arrays are data")
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims) or int(np.prod(dims, dtype=object)) > _MAX_EMPTY_ELEMENTS:
        raise pickle.UnpicklingError(f"an array of shape {dims} made before its data")
    return np.ndarray(dims, dtype=_plain_dtype(dtype))


def _checked(dt: np.dtype) -> np.dtype:
    if dt.hasobject:
        raise pickle.UnpicklingError("numpy object arrays are not plain data")
    return dt


def _allowed_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]

    def scalar(dtype, *args):
        return multiarray.scalar(_checked(dtype), *args)

    def frombuffer(buf, dtype, shape, order):
        return numeric._frombuffer(buf, _checked(np.dtype(dtype)), shape, order)

    allowed: dict[tuple[str, str], object] = {
        # a plain dict: an OrderedDict instance could be given attributes that shadow its methods
        ("collections", "OrderedDict"): dict,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _plain_dtype,
    }
    for builtins_name in ("builtins", "__builtin__"):  # the latter in Python 2 pickles
        for name, obj in (("set", set), ("frozenset", frozenset), ("complex", complex), ("slice", slice)):
            allowed[(builtins_name, name)] = obj
    for prefix in ("numpy.core", "numpy._core"):  # written by numpy 1 / numpy 2
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = _reconstruct_array
        allowed[(f"{prefix}.multiarray", "scalar")] = scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that is not plain data."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays/scalars; refuses any other global.

    A pickle can only run code through the callables it names (``GLOBAL``/``STACK_GLOBAL``, also
    behind ``INST``, ``OBJ``, ``NEWOBJ`` and ``EXT*``), and every one of them comes from
    :meth:`find_class`: a name outside the allow-list raises :class:`RefusedGlobal` before
    anything is called.
    """

    _ALLOWED: dict | None = None

    def __init__(self, file):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays in Python 2 pickles
        if SafeUnpickler._ALLOWED is None:
            SafeUnpickler._ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._ALLOWED.get((module, name))
        if obj is None:
            raise RefusedGlobal(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not plain data")


def safe_unpickle(path: str | os.PathLike):
    """Read a pickle file with :class:`SafeUnpickler`; every problem is a one-line ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise UserError(f"{path}: {size} bytes, far more than an nnU-Net plans pickle ({MAX_PICKLE_BYTES} at most)")
    data = path.read_bytes()
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as e:
        raise UserError(f"{path}: refused to unpickle: it references the global {e.name}, which could run code "
                         "(only plain containers and numpy arrays are read; nothing was executed)") from None
    except RecursionError:
        raise UserError(f"{path}: pickle nested too deeply to read") from None
    except MemoryError:
        raise UserError(f"{path}: not a readable pickle (it asks for more memory than there is)") from None
    except Exception as e:  # random bytes raise UnpicklingError, EOFError, ValueError, KeyError, IndexError, ...
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable pickle (damaged or another kind of file: {why})") from None


# ---------------------------------------------------------------------- reading the .model safely
def read_official_checkpoint(path: str | os.PathLike) -> dict:
    """The official ``.model`` file as a dict, read with ``torch.load(weights_only=True)``.

    Official checkpoints were written under numpy 1, whose scalars pickle as
    ``numpy.core.multiarray.scalar``; numpy 2 calls it ``numpy._core.multiarray.scalar``, so both
    names are allowed (and numpy arrays), nothing else beyond torch's own tensors and containers.
    """
    from ..network.weights import read_checkpoint

    return read_checkpoint(path)


# ---------------------------------------------------------------------- the network from the weights
def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _need(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{source}: not an official UNETR++ state_dict (no {key!r})")
    return state[key]


def infer_official_config(state: dict[str, torch.Tensor], patch_size, source: str = "checkpoint"):
    """Our :class:`UNETRPPConfig` for an official state_dict (``module.`` stripped) at ``patch_size``.

    Widths, depths, heads, projection sizes, stem stride, K/V projection, fusion and conv blocks
    are read off the keys and shapes; the patch size must give the token counts the weights hold.
    """
    from ..network.presets import PRESETS
    from ..network.unetrpp import UNETRPPConfig

    stem = _need(state, "unetr_pp_encoder.downsample_layers.0.0.conv.weight", source)
    enc1 = _need(state, "encoder1.conv1.conv.weight", source)
    head = _need(state, "out1.conv.conv.weight", source)
    if stem.ndim != 5 or enc1.ndim != 5 or head.ndim != 5:
        raise UserError(f"{source}: not a 3D official UNETR++ state_dict (stem weight {tuple(stem.shape)})")
    depths = [_count(state, rf"unetr_pp_encoder\.stages\.{s}\.(\d+)\.gamma") for s in range(4)]
    decoder_depths = [_count(state, rf"decoder{d}\.decoder_block\.0\.(\d+)\.gamma") for d in (5, 4, 3)]
    if not all(depths) or not all(decoder_depths):
        raise UserError(f"{source}: not an official UNETR++ state_dict (encoder depths {depths}, decoder depths "
                         f"{decoder_depths})")
    block0 = "unetr_pp_encoder.stages.0.0.epa_block."
    if f"{block0}EF" in state:
        kv_proj = "shared_nobias"
        proj = [int(_need(state, f"unetr_pp_encoder.stages.{s}.0.epa_block.EF", source).shape[1]) for s in range(4)]
        dec_proj = int(_need(state, "decoder5.decoder_block.0.0.epa_block.EF", source).shape[1])
    else:
        proj = [int(_need(state, f"unetr_pp_encoder.stages.{s}.0.epa_block.E.weight", source).shape[0])
                for s in range(4)]
        dec_proj = int(_need(state, "decoder5.decoder_block.0.0.epa_block.E.weight", source).shape[0])
        pairs = [(k, k.replace(".E.", ".F.")) for k in state if re.search(r"\.epa_block\.E\.(weight|bias)$", k)]
        tied = all(f in state and state[f].shape == state[e].shape and torch.equal(state[e], state[f])
                   for e, f in pairs)
        kv_proj = "shared" if tied else "separate"
    fusion = "concat" if f"{block0}out_proj.weight" in state else "sum"
    conv_blocks = 2 if any(".conv52." in k for k in state) else 1
    num_heads = int(_need(state, f"{block0}temperature", source).shape[0])
    kw = dict(in_channels=int(stem.shape[1]), out_channels=int(head.shape[0]), feature_size=int(enc1.shape[0]),
              depths=tuple(depths), decoder_depths=tuple(decoder_depths), num_heads=num_heads,
              proj_size=tuple(proj), decoder_proj_size=dec_proj, stem_stride=tuple(int(k) for k in stem.shape[2:]),
              kv_proj=kv_proj, fusion=fusion, conv_blocks=conv_blocks, head_merge="official",
              deep_supervision="out2.conv.conv.weight" in state)
    def plain(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    structural = ("feature_size", "num_heads", "stem_stride", "kv_proj", "fusion", "conv_blocks")
    preset = next((p for p in PRESETS.values()
                   if all(plain(p.config().to_dict()[k]) == plain(kw[k]) for k in structural)), None)
    kw["attn_dropout"] = preset.kwargs["attn_dropout"] if preset else 0.1  # training only
    tokens = int(_need(state, "unetr_pp_encoder.stages.0.0.pos_embed", source).shape[1])
    patch = tuple(int(p) for p in patch_size)
    grid = [p // s for p, s in zip(patch, kw["stem_stride"], strict=True)]
    if int(np.prod(grid)) != tokens or any(p % s for p, s in zip(patch, kw["stem_stride"], strict=True)):
        raise UserError(f"{source}: the weights hold {tokens} first-stage tokens (stem stride "
                         f"{kw['stem_stride']}), which patch size {patch} does not give; pass the training patch "
                         "with --patch-size Z Y X")
    try:
        cfg = UNETRPPConfig(img_size=patch, **kw)
    except ValueError as e:
        raise UserError(f"{source}: {str(e).splitlines()[0]}") from None
    return cfg, (preset.name if preset else None)


# ---------------------------------------------------------------------- the plans
def _item(d, key, source: str, what: str = "plans"):
    """``d[key]`` for a dict keyed by ints, numpy ints or strings (nnU-Net keys channels by int)."""
    if isinstance(d, dict):
        for k in (key, str(key)):
            if k in d:
                return d[k]
        for k in d:
            if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and int(k) == key:
                return d[k]
    elif isinstance(d, (list, tuple)) and isinstance(key, int) and 0 <= key < len(d):
        return d[key]
    raise UserError(f"{source}: {what} lack an entry {key!r}")


def _number(v, name: str, source: str) -> float:
    try:
        out = float(np.asarray(v).item())
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a number, got {v!r}") from None
    if not np.isfinite(out):
        raise UserError(f"{source}: {name} must be finite, got {out}")
    return out


def _triple(v, name: str, source: str, cast=float) -> list:
    try:
        arr = np.asarray(v, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be 3 numbers, got {v!r}") from None
    if arr.size != 3 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise UserError(f"{source}: {name} must be 3 positive numbers (a 3D plan), got {v!r}")
    if cast is int and np.any(arr != np.round(arr)):
        raise UserError(f"{source}: {name} must be 3 integers, got {v!r}")
    return [cast(x) for x in arr]


def _permutation(v, name: str, source: str) -> list[int] | None:
    if v is None:
        return None
    try:
        order = [int(x) for x in np.asarray(v).reshape(-1)]
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a permutation of 0, 1, 2, got {v!r}") from None
    if sorted(order) != [0, 1, 2]:
        raise UserError(f"{source}: {name} must be a permutation of 0, 1, 2, got {v!r}")
    return order


def _labels_from_json(path: str | os.PathLike, num_classes: int) -> dict[str, int]:
    """Names from a ``dataset.json``: nnU-Net v1 ``{"0": "background", ...}`` or v2 ``{"background": 0, ...}``."""
    from ..io import read_json

    meta = read_json(path)
    raw = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: no 'labels' object (names of the classes) in it")
    labels: dict[str, int] = {}
    for k, v in raw.items():
        if isinstance(v, int) and not isinstance(v, bool):
            name, value = str(k), v  # v2: name -> value
        elif isinstance(v, str) and re.fullmatch(r"\d+", str(k)):
            name, value = v, int(k)  # v1: "value" -> name
        else:
            raise UserError(f"{path}: labels entry {k!r}: {v!r} is neither 'name': value nor 'value': 'name'")
        if name in labels:
            raise UserError(f"{path}: the label name {name!r} is used twice")
        labels[name] = value
    if sorted(labels.values()) != list(range(num_classes)):
        raise UserError(f"{path}: labels {sorted(labels.values())} are not the network's classes "
                         f"0..{num_classes - 1}")
    return labels


def _default_labels(preset: str | None, num_classes: int) -> dict[str, int]:
    from ..data.convert import ACDC_LABELS, BTCV_LABELS

    known = {"synapse": BTCV_LABELS, "btcv": BTCV_LABELS, "acdc": ACDC_LABELS, "tumor": _BRATS_LABELS,
             "lung": _LUNG_LABELS}.get(preset or "")
    if known is not None and len(known) == num_classes:
        return dict(known)
    return {"background": 0, **{f"class_{c}": c for c in range(1, num_classes)}}


def _stage_of(plans: dict, info: dict, stage: int | None, source: str) -> tuple[int, dict]:
    stages = plans.get("plans_per_stage")
    if isinstance(stages, (list, tuple)):
        stages = dict(enumerate(stages))
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{source}: plans lack 'plans_per_stage'")
    keys = sorted(int(k) for k in stages if isinstance(k, (int, np.integer, str)) and str(k).isdigit())
    if stage is None:
        init = info.get("init")
        if isinstance(init, (list, tuple)) and len(init) > 5 and isinstance(init[5], (int, np.integer)) \
                and not isinstance(init[5], bool):
            stage = int(init[5])  # nnUNetTrainer.init_args: (plans_file, fold, ..., batch_dice, stage, ...)
        else:
            stage = keys[-1] if keys else 0  # the full-resolution stage is the last
    if stage not in keys:
        raise UserError(f"{source}: the plans have no stage {stage} (stages: {keys}); choose one with --stage")
    entry = _item(stages, stage, source, "plans_per_stage")
    if not isinstance(entry, dict):
        raise UserError(f"{source}: plans_per_stage[{stage}] is not a dict")
    return stage, entry


def convert_plans(info: dict, state: dict[str, torch.Tensor], source: str, *, stage: int | None = None,
                  patch_size=None, labels_json: str | os.PathLike | None = None,
                  weights_source: str | None = None) -> tuple[Plans, dict]:
    """Our :class:`Plans` for nnU-Net v1 checkpoint info (or a bare v1 plans dict) and its weights.

    ``labels_json``: a ``dataset.json`` naming the classes (default: the official dataset's names
    when the network has an official layout and as many classes, else ``class_N``).

    Returns ``(plans, notes)``; ``notes`` holds the stage, fold, trainer and preset it found.
    """
    plans = info.get("plans") if "plans" in info else info
    if not isinstance(plans, dict):
        raise UserError(f"{source}: 'plans' is a {type(plans).__name__}, not nnU-Net v1 plans")
    stage, sp = _stage_of(plans, info, stage, source)
    where = f"{source}: plans_per_stage[{stage}]"
    for key in ("current_spacing", "patch_size"):
        if key not in sp:
            raise UserError(f"{where} lacks {key!r}")
    spacing = _triple(sp["current_spacing"], "current_spacing", where)
    patch_from_plans = _triple(sp["patch_size"], "patch_size", where, int)
    patch = _triple(patch_size, "--patch-size", "import-official", int) if patch_size is not None \
        else patch_from_plans
    cfg, preset = infer_official_config(state, patch, weights_source or source)

    forward = _permutation(plans.get("transpose_forward"), "transpose_forward", source)
    backward = _permutation(plans.get("transpose_backward"), "transpose_backward", source)
    if forward is not None and backward is not None and list(np.argsort(forward)) != backward:
        raise UserError(f"{source}: transpose_backward {backward} does not undo transpose_forward {forward}")
    if forward == [0, 1, 2]:
        forward = None

    modalities = plans.get("modalities")
    n = cfg.in_channels
    if isinstance(modalities, dict) and len(modalities) != n:
        raise UserError(f"{source}: the plans name {len(modalities)} modalities, the weights take {n} channel(s)")
    channels = [str(_item(modalities, c, source, "modalities")) if isinstance(modalities, dict) else f"channel_{c}"
                for c in range(n)]
    schemes = plans.get("normalization_schemes")
    if not isinstance(schemes, dict):
        raise UserError(f"{source}: plans lack 'normalization_schemes'")
    masks = plans.get("use_mask_for_norm") or {}
    if isinstance(masks, (bool, np.bool_)):  # one flag for every channel
        masks = dict.fromkeys(range(n), bool(masks))
    props = plans.get("dataset_properties") if isinstance(plans.get("dataset_properties"), dict) else {}
    intensity = props.get("intensityproperties") or {}
    normalization = []
    for c, name in enumerate(channels):
        scheme = str(_item(schemes, c, source, "normalization_schemes"))
        use_mask = bool(_item(masks, c, source, "use_mask_for_norm")) if masks else False
        if scheme == "CT":
            if use_mask:
                raise UserError(f"{source}: channel {c} is CT-normalised inside the nonzero mask "
                                 "(use_mask_for_norm), which unetrpp does not reproduce")
            st = _item(intensity, c, source, "dataset_properties['intensityproperties']")
            if not isinstance(st, dict):
                raise UserError(f"{source}: intensityproperties of channel {c} is not a dict")
            here = f"{source}: intensityproperties[{c}]"
            lo, hi = (_number(_item(st, k, here, "intensity properties"), k, here)
                      for k in ("percentile_00_5", "percentile_99_5"))
            mean = _number(_item(st, "mean", here, "intensity properties"), "mean", here)
            sd = _number(_item(st, "sd", here, "intensity properties"), "sd", here)
            if lo > hi or sd <= 0:
                raise UserError(f"{here}: percentiles {lo}..{hi} and sd {sd} are not a usable CT normalisation")
            normalization.append({"channel": name, "scheme": "ct", "clip": [lo, hi], "mean": mean, "std": sd})
        elif scheme == "CT2":
            raise UserError(f"{source}: channel {c} uses nnU-Net's CT2 normalisation (per-image statistics inside "
                             "the clip range), which unetrpp does not reproduce")
        elif scheme == "noNorm":
            normalization.append({"channel": name, "scheme": "none"})
        else:  # nnU-Net v1: every other scheme name is the per-image z-score ("nonCT")
            normalization.append({"channel": name, "scheme": "zscore", "use_nonzero_mask": use_mask})
    preprocessor = plans.get("preprocessor_name") or "GenericPreprocessor"
    if not isinstance(preprocessor, str) or preprocessor not in _PREPROCESSORS:
        raise UserError(f"{source}: preprocessor {preprocessor!r} is not reproduced by unetrpp "
                         f"(supported: {', '.join(_PREPROCESSORS)})")

    k = cfg.out_channels
    if plans.get("num_classes") is not None and int(plans["num_classes"]) + 1 != k:
        raise UserError(f"{source}: the plans have {int(plans['num_classes'])} foreground classes, the weights "
                         f"predict {k} channels (background included)")
    all_classes = plans.get("all_classes")
    if all_classes is not None:
        try:
            listed = sorted(int(v) for v in np.asarray(all_classes).reshape(-1))
        except (TypeError, ValueError):
            raise UserError(f"{source}: all_classes must be integers, got {all_classes!r}") from None
        if listed != list(range(1, k)):
            raise UserError(f"{source}: all_classes {listed} are not the network's foreground classes 1..{k - 1}")
    labels = _labels_from_json(labels_json, k) if labels_json is not None else _default_labels(preset, k)

    init = info.get("init") if isinstance(info.get("init"), (list, tuple)) else ()
    fold = init[1] if len(init) > 1 and isinstance(init[1], (int, np.integer, str)) else None
    fold = int(fold) if isinstance(fold, (int, np.integer)) and not isinstance(fold, bool) else fold
    batch_dice = bool(init[4]) if len(init) > 4 and isinstance(init[4], (bool, np.bool_)) else False
    folder = plans.get("preprocessed_data_folder")
    dataset = Path(str(folder)).name if isinstance(folder, str) and folder else "official"
    batch = sp.get("batch_size")
    batch = int(batch) if isinstance(batch, (int, np.integer)) and int(batch) > 0 else 2
    median = sp.get("median_patient_size_in_voxels")
    median = [float(v) for v in np.asarray(median, dtype=np.float64).reshape(-1)] if median is not None else []
    from ..data.plan import eval_classes_for

    eval_classes = eval_classes_for(preset, k)
    frame = "(z, y, x)" if forward is None else f"(axes {tuple(forward)} of z, y, x)"
    decisions = [
        f"imported from the official nnU-Net v1 plans, stage {stage}",
        f"target spacing {tuple(round(s, 6) for s in spacing)} mm {frame}: the stage's current_spacing",
        f"patch {tuple(patch)}: " + ("given" if patch_size is not None else "the stage's patch_size"),
        "normalisation: " + "; ".join(_describe(s) for s in normalization),
        f"resampling: {preprocessor} (images order {_PREPROCESSORS[preprocessor]['image_order']}, "
        "the low-resolution axis separately with order 0)",
        "network: read off the checkpoint's weights" + (f" (the official {preset} layout)" if preset else ""),
    ]
    if forward is not None:
        decisions.append(f"axes transposed by {forward} before the network (nnU-Net v1 transpose_forward), "
                         "back afterwards")
    d = Plans(dataset=dataset, channel_names=channels, labels=labels, target_spacing=spacing,
              normalization=normalization, patch_size=list(cfg.img_size), network=cfg.to_dict(), batch_size=batch,
              batch_dice=batch_dice, preset=preset, median_shape_after_resampling=median,
              resampling=dict(_PREPROCESSORS[preprocessor]), eval_classes=eval_classes,
              decisions=decisions).to_dict()
    if forward is not None:
        d["transpose_forward"] = forward
    out = Plans.from_dict(d, f"{source}: converted plans")
    if forward is not None and getattr(out, "transpose_forward", None) != forward:
        raise UserError(f"{source}: the plans transpose the axes by {forward} (nnU-Net v1 transpose_forward), "
                         "which this unetrpp cannot reproduce")
    notes = {"stage": stage, "fold": fold, "trainer": info.get("name"), "trainer_class": info.get("class"),
             "preset": preset, "patch_from_plans": patch_from_plans}
    return out, notes


def _describe(s: dict) -> str:
    if s["scheme"] == "ct":
        return (f"{s['channel']}: CT, clip to [{s['clip'][0]:.6g}, {s['clip'][1]:.6g}], mean {s['mean']:.6g}, "
                f"sd {s['std']:.6g}")
    if s["scheme"] == "zscore":
        return f"{s['channel']}: per-image z-score" + (" inside the nonzero mask" if s["use_nonzero_mask"] else "")
    return f"{s['channel']}: none"


# ---------------------------------------------------------------------- the whole import
def _plain(v):
    """JSON-safe copy of a pickled value (numpy scalars -> numbers; other objects -> their str)."""
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def import_official(model_file: str | os.PathLike, pkl_file: str | os.PathLike | None, out: str | os.PathLike, *,
                    labels_json: str | os.PathLike | None = None, stage: int | None = None,
                    patch_size=None) -> tuple[Path, dict]:
    """Read an official checkpoint and its ``.pkl``; write a model package at ``out``.

    Returns ``(package path, summary)``. Errors are one-line ``ValueError``/``FileNotFoundError``
    naming the file.
    """
    from ..network.unetrpp import UNETRPP
    from ..network.weights import convert_official_state_dict, extract_state_dict
    from .model import sha256_file, write_package

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: no such file")
    if pkl_file is None:
        pkl_file = model_file.with_name(model_file.name + ".pkl")
        if not pkl_file.is_file():
            raise FileNotFoundError(f"{pkl_file}: no such file; the official checkpoint's plans are stored beside "
                                    "it as CHECKPOINT.pkl (give its path as the second argument)")
    pkl_file = Path(pkl_file)
    info = safe_unpickle(pkl_file)
    if not isinstance(info, dict) or not (isinstance(info.get("plans"), dict) or "plans_per_stage" in info):
        kind = type(info).__name__ if not isinstance(info, dict) else "a dict without 'plans'"
        raise UserError(f"{pkl_file}: not nnU-Net v1 checkpoint info (a dict with 'plans'), got {kind}")
    ckpt = read_official_checkpoint(model_file)
    state = extract_state_dict(ckpt, str(model_file))
    try:
        plans, notes = convert_plans(info, state, str(pkl_file), stage=stage, patch_size=patch_size,
                                     labels_json=labels_json, weights_source=str(model_file))
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # a value of an unexpected type somewhere
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise UserError(f"{pkl_file}: not laid out like nnU-Net v1 plans ({type(e).__name__}: {why})") from None
    cfg = plans.network_config()
    network = UNETRPP(**cfg.to_dict())
    network.load_state_dict(convert_official_state_dict(state, network, str(model_file)), strict=True)
    epoch = ckpt.get("epoch")
    training = {
        "imported": "official UNETR++ checkpoint (nnU-Net v1)",
        "checkpoint": {"name": model_file.name, "sha256": sha256_file(model_file)},
        "plans_pickle": {"name": pkl_file.name, "sha256": sha256_file(pkl_file)},
        "trainer": _plain(notes["trainer"]), "trainer_class": _plain(notes["trainer_class"]),
        "fold": _plain(notes["fold"]), "stage": notes["stage"],
        "epoch": int(epoch) if isinstance(epoch, (int, np.integer)) and not isinstance(epoch, bool) else None,
        "imported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    fold = notes["fold"]
    name = f"fold{fold}" if isinstance(fold, int) else "official"
    state_ours = {k: v.detach().clone() for k, v in network.state_dict().items()}
    path = write_package(out, [(name, cfg.to_dict(), plans.to_dict(), state_ours, training)], plans.labels,
                         plans.channel_names)
    summary = {"plans": plans, "config": cfg, "labels": plans.labels, **notes,
               "parameters": sum(p.numel() for p in network.parameters())}
    return path, summary
