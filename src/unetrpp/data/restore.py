"""``CaseProperties``: what preprocessing did to one case, and the way back to its original grid.

:func:`~unetrpp.data.preprocess.preprocess_array` returns a :class:`CaseProperties`;
``unetrpp preprocess`` writes it beside each preprocessed case as ``CASE.json``
(:meth:`CaseProperties.to_dict`, read back with :meth:`CaseProperties.from_dict`). Its restore
methods take a result on the preprocessed grid (labels or probabilities) back to the original
grid: resample to the crop's shape, put the crop back in place, undo the axis order.

All shapes, spacings and boxes are in the network's axis order (``transpose_forward`` of the
plans applied; ``(z, y, x)`` when there is none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..io import Geometry
from .plans import _floats, _ints
from .resample import anisotropic_axis, resample_label, resample_probabilities, resample_volume

#: The most voxels one case's grid may hold (2^31: a 1290^3 volume; the largest CTs are a quarter of it).
MAX_VOXELS = 1 << 31
_CLASS = re.compile(r"[0-9]{1,5}")


def resampling_axis(spacing: Sequence[float], target: Sequence[float]) -> int | None:
    """The axis resampled on its own (nearest neighbour): the source's anisotropic axis, else the target's."""
    axis = anisotropic_axis(spacing)
    return axis if axis is not None else anisotropic_axis(target)


@dataclass(frozen=True)
class CaseProperties:
    """One case's original grid and what preprocessing did to it (crop, resampling, axis order)."""

    shape: tuple[int, ...]  # the original shape
    bbox: tuple[tuple[int, int], ...]  # the nonzero crop: (start, stop) per axis
    spacing: tuple[float, ...]  # the original spacing (mm)
    target_spacing: tuple[float, ...]  # the plans' spacing (mm)
    shape_after_resampling: tuple[int, ...]  # the preprocessed (network's) grid
    geometry: Geometry | None = None  # the original grid in patient space (None: restoring only)
    plans_id: str | None = None  # the plans that made it (:attr:`Plans.id`)
    transpose_forward: tuple[int, ...] | None = None  # nnU-Net v1 plans: the axis order the network sees
    name: str | None = None  # training cases: the case name
    class_voxels: Mapping[int, int] | None = None  # training cases: voxels per class after resampling

    # ------------------------------------------------------------------ derived
    @property
    def shape_after_crop(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.bbox)

    @property
    def crop(self) -> tuple[slice, ...]:
        """Where the crop lies in the original grid."""
        return tuple(slice(a, b) for a, b in self.bbox)

    @property
    def separate_axis(self) -> int | None:
        """The axis resampled on its own (:func:`resampling_axis`)."""
        return resampling_axis(self.spacing, self.target_spacing)

    # ------------------------------------------------------------------ restore
    def original_geometry(self) -> Geometry:
        if self.geometry is None:
            raise UserError("case properties without a geometry: the original grid's place is unknown")
        return self.geometry

    def untranspose(self, arr: np.ndarray, channels: bool = False) -> np.ndarray:
        """An array on the original grid in the network's axis order -> ``(z, y, x)`` (``channels``: a leading axis)."""
        order = self.transpose_forward
        if not order:
            return arr
        back = [int(a) for a in np.argsort(order)]
        return np.ascontiguousarray(arr.transpose(0, *(b + 1 for b in back)) if channels else arr.transpose(back))

    def _check_grid(self, shape: Sequence[int], what: str) -> None:
        if tuple(shape) != tuple(self.shape_after_resampling):
            raise UserError(f"{what} shape {tuple(shape)} is not the preprocessed shape "
                             f"{list(self.shape_after_resampling)}")

    def restore_label(self, seg: np.ndarray) -> np.ndarray:
        """A label map on the preprocessed grid -> the original grid (background outside the crop)."""
        self._check_grid(seg.shape, "label")
        out = np.zeros(self.shape, dtype=seg.dtype)
        out[self.crop] = resample_label(np.asarray(seg), self.shape_after_crop, self.separate_axis)
        return self.untranspose(out)

    def restore_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """``(k, z, y, x)`` probabilities on the preprocessed grid -> the original grid (background 1 outside)."""
        self._check_grid(probs.shape[1:], "probability")
        out = np.zeros((probs.shape[0], *self.shape), dtype=np.float32)
        out[0] = 1.0
        out[(slice(None), *self.crop)] = resample_probabilities(np.asarray(probs, np.float32), self.shape_after_crop,
                                                                self.separate_axis)
        return self.untranspose(out, channels=True)

    def restore_label_from_probabilities(self, probs) -> np.ndarray:
        """Arg-max of the probabilities after resampling them to the original grid, one class at a time.

        Equivalent to resampling all ``k`` channels (linear, the low-resolution axis nearest) then taking
        the arg-max, but holds only two crop-sized float32 volumes, not ``k``.
        """
        probs = probs if isinstance(probs, np.ndarray) else probs.detach().cpu().numpy()
        self._check_grid(probs.shape[1:], "probability")
        crop_shape, axis = self.shape_after_crop, self.separate_axis
        k = probs.shape[0]
        dtype = np.uint8 if k <= 256 else np.int16
        best = np.full(crop_shape, -1.0, dtype=np.float32)
        arg = np.zeros(crop_shape, dtype=dtype)
        for c in range(k):
            p = probs[c]
            m = resample_volume(np.ascontiguousarray(p, dtype=np.float32), crop_shape, 1, axis) \
                if p.shape != tuple(crop_shape) else p
            better = m > best
            best[better] = m[better]
            arg[better] = c
        out = np.zeros(self.shape, dtype=dtype)
        out[self.crop] = arg
        return self.untranspose(out)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """The JSON form (``CASE.json``)."""
        d: dict = {}
        if self.plans_id is not None:
            d["plans_id"] = self.plans_id
        if self.geometry is not None:
            d["geometry"] = self.geometry.to_json()
        d.update(shape=list(self.shape), bbox=[list(b) for b in self.bbox],
                 shape_after_crop=list(self.shape_after_crop), spacing=list(self.spacing),
                 target_spacing=list(self.target_spacing), shape_after_resampling=list(self.shape_after_resampling))
        if self.transpose_forward:
            d["transpose_forward"] = list(self.transpose_forward)
        if self.name is not None:
            d["name"] = self.name
        if self.class_voxels is not None:
            d["class_voxels"] = {str(c): int(n) for c, n in self.class_voxels.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "case properties") -> CaseProperties:
        """Validate and build from the JSON form; any problem is a one-line error naming ``source``."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: case properties must be a JSON object, got {type(d).__name__}")
        missing = [k for k in ("shape", "bbox", "spacing", "target_spacing", "shape_after_resampling") if k not in d]
        if missing:
            raise UserError(f"{source}: case properties lack {', '.join(missing)}")
        shape = tuple(_ints(d["shape"], "shape", source))
        after = tuple(_ints(d["shape_after_resampling"], "shape_after_resampling", source))
        for key, s in (("shape", shape), ("shape_after_resampling", after)):
            if math.prod(s) > MAX_VOXELS:
                raise UserError(f"{source}: {key} {list(s)} holds over {MAX_VOXELS:,} voxels; not a volume this "
                                "package made")
        box = d["bbox"]
        if not (isinstance(box, list) and len(box) == 3 and all(
                isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in b)
                and 0 <= b[0] < b[1] <= n for b, n in zip(box, shape, strict=False))):
            raise UserError(f"{source}: bbox must be 3 [start, stop) pairs inside the shape {list(shape)}, got {box!r}")
        bbox = tuple((int(a), int(b)) for a, b in box)
        props = dict(shape=shape, bbox=bbox, spacing=tuple(_floats(d["spacing"], "spacing", source)),
                     target_spacing=tuple(_floats(d["target_spacing"], "target_spacing", source)),
                     shape_after_resampling=after)
        crop = d.get("shape_after_crop")
        if crop is not None and crop != [b - a for a, b in bbox]:
            raise UserError(f"{source}: shape_after_crop {crop!r} is not the size of the bbox {box!r}")
        if d.get("geometry") is not None:
            props["geometry"] = _geometry(d["geometry"], source)
        for key in ("plans_id", "name"):
            if d.get(key) is not None:
                if not isinstance(d[key], str):
                    raise UserError(f"{source}: {key} must be a string, got {d[key]!r}")
                props[key] = d[key]
        order = d.get("transpose_forward")
        if order is not None:
            if not (isinstance(order, list) and all(isinstance(a, int) and not isinstance(a, bool) for a in order)
                    and sorted(order) == [0, 1, 2]):
                raise UserError(f"{source}: transpose_forward must be a permutation of [0, 1, 2], got {order!r}")
            props["transpose_forward"] = tuple(order) if order != [0, 1, 2] else None
        voxels = d.get("class_voxels")
        if voxels is not None:
            if not (isinstance(voxels, dict) and all(
                    isinstance(c, str) and _CLASS.fullmatch(c) and isinstance(n, int) and not isinstance(n, bool)
                    and 0 <= n <= MAX_VOXELS for c, n in voxels.items())):
                raise UserError(f"{source}: class_voxels must map class numbers to voxel counts")
            props["class_voxels"] = {int(c): n for c, n in voxels.items()}
        return cls(**props)

    @classmethod
    def coerce(cls, props: CaseProperties | dict, source: str = "case properties") -> CaseProperties:
        return props if isinstance(props, CaseProperties) else cls.from_dict(props, source)


def _geometry(g, source: str) -> Geometry:
    if not (isinstance(g, dict) and all(isinstance(g.get(k), list) for k in ("spacing", "origin", "direction"))):
        raise UserError(f"{source}: geometry must hold spacing, origin and direction lists")
    values = [*g["spacing"], *g["origin"], *g["direction"]]
    try:
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    except OverflowError:  # an integer beyond any float
        finite = False
    if not finite:
        raise UserError(f"{source}: geometry must hold finite numbers")
    try:
        return Geometry.from_json(g)
    except ValueError as e:
        raise UserError(f"{source}: geometry: {str(e).splitlines()[0]}") from None


# the same, for properties held as their JSON form
def restore_label(seg: np.ndarray, props: CaseProperties | dict) -> np.ndarray:
    """:meth:`CaseProperties.restore_label` of ``props`` (a :class:`CaseProperties` or its JSON form)."""
    return CaseProperties.coerce(props).restore_label(seg)


def restore_probabilities(probs: np.ndarray, props: CaseProperties | dict) -> np.ndarray:
    """:meth:`CaseProperties.restore_probabilities` of ``props`` (a :class:`CaseProperties` or its JSON form)."""
    return CaseProperties.coerce(props).restore_probabilities(probs)


def restore_label_from_probabilities(probs, props: CaseProperties | dict) -> np.ndarray:
    """:meth:`CaseProperties.restore_label_from_probabilities` of ``props`` (a :class:`CaseProperties` or its
    JSON form)."""
    return CaseProperties.coerce(props).restore_label_from_probabilities(probs)
