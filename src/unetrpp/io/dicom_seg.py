"""A label map as a DICOM Segmentation object (highdicom) that references its source CT/MR series.

``predict --dicom-seg`` writes one beside the NIfTI label map of each DICOM series case. The SEG
holds the same voxels as the NIfTI: frame ``n`` of segment ``s`` is the mask ``label == value(s)``
on the source instance whose position lies on slice ``k`` of the label map, with ``k`` and the
in-plane axes worked out from the label map's geometry (each instance's ImagePositionPatient,
ImageOrientationPatient and PixelSpacing expressed as voxel indices of that grid), not from file
names or file order.

Segments: one per foreground label *present* in the map, numbered 1, 2, ... in order of label
value, labelled with the model's label name. Labels the model declares but did not predict are
left out by default: highdicom allows a segment without frames, but several viewers (older
OHIF/dcmjs among them) fail on one, and an empty segment carries no information. A map without
any foreground cannot omit every frame; its SEG then declares every foreground label of the model
with one empty frame each, on the first source slice, so that the file stays small and says
"nothing found". ``include_empty=True`` declares every label in all cases.

Needs the optional extra ``unetrpp[dicom]`` (highdicom and pydicom).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError
from .image import FILE_ENDINGS, Geometry, ImageReadError, ImageWriteError, split_ending
from .jsonio import atomic_write

#: Segment labels (LO) hold at most 64 characters.
_MAX_LABEL = 64
_KINDS = {".nii.gz": "a NIfTI file", ".nii": "a NIfTI file", ".nrrd": "an NRRD file", ".nhdr": "an NRRD file",
          ".mha": "a MetaImage file", ".mhd": "a MetaImage file"}


def require_highdicom():
    """``(highdicom, pydicom)``, or a one-line ``ValueError`` naming the extra to install."""
    try:
        import highdicom
        import pydicom
    except ImportError as e:
        raise UserError(f"--dicom-seg needs highdicom and pydicom ({e.name} is missing): "
                         "pip install 'unetrpp[dicom]'") from None
    return highdicom, pydicom


def check_dicom_input(path: str | os.PathLike) -> None:
    """Refuse, before any work, an input that is not a DICOM series folder or a folder of them.

    A folder that directly holds image files (``.nii.gz``, ``.nrrd``, ...) is a folder of cases in
    those formats; the first such file is named. Also checks that highdicom can be imported.
    """
    path = Path(path)
    if path.is_file():
        ending = split_ending(path)[1]
        kind = _KINDS.get(ending.lower(), "a file, not a DICOM series folder")
        raise UserError(f"--dicom-seg needs DICOM input; {path} is {kind}")
    if path.is_dir():
        for f in sorted(path.iterdir()):
            ending = split_ending(f.name)[1]
            if not f.name.startswith(".") and f.is_file() and ending in FILE_ENDINGS:
                raise UserError(f"--dicom-seg needs DICOM input; {f} is {_KINDS[ending]}")
    require_highdicom()


def seg_path(target: str | os.PathLike) -> Path:
    """Where the SEG of the label map ``target`` goes: ``OUT/case.nii.gz`` -> ``OUT/case.dcm``."""
    target = Path(target)
    return target.with_name(split_ending(target.name)[0] + ".dcm")


def read_series(dicom_dir: str | os.PathLike) -> list:
    """The pydicom datasets (without pixel data) of the one series in ``dicom_dir``: the same files
    SimpleITK builds the volume from, in no particular order."""
    import SimpleITK as sitk

    _, pydicom = require_highdicom()
    from pydicom.errors import InvalidDicomError

    dicom_dir = Path(dicom_dir)
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(dicom_dir))
    except RuntimeError:
        series = ()
    if len(series) != 1:
        raise ImageReadError(f"{dicom_dir}: folder holds {len(series)} DICOM series; a SEG needs exactly one")
    datasets = []
    for f in reader.GetGDCMSeriesFileNames(str(dicom_dir), series[0]):
        try:
            datasets.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as e:
            raise ImageReadError(f"{f}: unreadable DICOM file: {e}") from None
    return datasets


def series_geometry(datasets: Sequence) -> Geometry:
    """The grid of a single-frame series as SimpleITK reads it: x along the rows' direction, y down
    the columns, z along their cross product, slices sorted by position on it."""
    r, c = _orientation(datasets[0])
    normal = np.cross(r, c)
    positions = sorted((_position(ds) for ds in datasets), key=lambda p: float(p @ normal))
    gaps = np.diff([float(p @ normal) for p in positions])
    dz = float(np.median(gaps)) if len(gaps) else float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    row_spacing, col_spacing = (float(v) for v in datasets[0].PixelSpacing)
    return Geometry((col_spacing, row_spacing, dz), tuple(positions[0]), tuple(np.stack([r, c, normal], 1).ravel()))


def _orientation(ds) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    return iop[:3], iop[3:]


def _position(ds) -> np.ndarray:
    return np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)


def slice_mapping(datasets: Sequence, geometry: Geometry,
                  shape_zyx: Sequence[int]) -> list[tuple[int, bool, bool, bool]]:
    """For each dataset, ``(k, transpose, flip_rows, flip_columns)``: its frame is slice ``k`` of a
    ``(z, y, x)`` array on ``geometry``, transposed (when its rows run along x) and then flipped.

    Each instance's first pixel and its row and column steps are expressed as voxel indices of the
    grid; they must fall on one slice, on the grid's x and y axes, and cover the slice exactly.
    """
    nz, ny, nx = (int(v) for v in shape_zyx)
    to_index = np.linalg.inv(geometry.direction_matrix @ np.diag(geometry.spacing))
    origin = np.asarray(geometry.origin)
    out, taken = [], {}
    for ds in datasets:
        if int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise UserError(f"instance {ds.SOPInstanceUID}: multi-frame source images are not supported")
        rows, cols = int(ds.Rows), int(ds.Columns)
        r, c = _orientation(ds)
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        start = to_index @ (_position(ds) - origin)
        step_col = to_index @ (r * col_spacing)  # one column to the right, in voxel indices (x, y, z)
        step_row = to_index @ (c * row_spacing)  # one row down
        tol = 0.1 / max(rows, cols)  # drift below 0.1 voxel across the whole frame
        axes = []
        for step in (step_row, step_col):
            axis = int(np.argmax(np.abs(step)))
            unit = np.zeros(3)
            unit[axis] = np.sign(step[axis])
            if axis == 2 or np.abs(step - unit).max() > tol:
                raise UserError(f"instance {ds.SOPInstanceUID}: its pixel grid is not a slice of the label map's "
                                 f"grid (row step {_fmt(step_row)}, column step {_fmt(step_col)} voxels)")
            axes.append((axis, unit[axis] < 0))
        (axis_r, flip_r), (axis_c, flip_c) = axes
        sizes = (nx, ny)
        if axis_r == axis_c or (sizes[axis_r], sizes[axis_c]) != (rows, cols):
            raise UserError(f"instance {ds.SOPInstanceUID}: {rows} x {cols} pixels do not match the label map's "
                             f"{ny} x {nx} slices")
        k = round(float(start[2]))
        expected = np.zeros(3)
        expected[axis_r] = sizes[axis_r] - 1 if flip_r else 0
        expected[axis_c] = sizes[axis_c] - 1 if flip_c else 0
        expected[2] = k
        if not 0 <= k < nz or np.abs(start - expected).max() > 0.1:
            raise UserError(f"instance {ds.SOPInstanceUID}: its position is voxel {_fmt(start)} of the label map, "
                             "not the corner of one of its slices")
        if k in taken:
            raise UserError(f"instances {taken[k]} and {ds.SOPInstanceUID} both lie on slice {k}")
        taken[k] = ds.SOPInstanceUID
        out.append((k, axis_r == 0, flip_r, flip_c))  # rows along x: the (y, x) slice is transposed
    if len(taken) != nz:
        raise UserError(f"the series has {len(taken)} slices, the label map {nz}")
    return out


def _fmt(v) -> str:
    return "(" + ", ".join(f"{x:.3g}" for x in v) + ")"


def _frame(label: np.ndarray, k: int, transpose: bool, flip_rows: bool, flip_cols: bool) -> np.ndarray:
    frame = label[k].T if transpose else label[k]
    if flip_rows:
        frame = frame[::-1]
    if flip_cols:
        frame = frame[:, ::-1]
    return frame


def write_dicom_seg(
    label: np.ndarray,
    dicom_dir: str | os.PathLike,
    out: str | os.PathLike,
    labels: Mapping[str, int],
    geometry: Geometry | None = None,
    *,
    include_empty: bool = False,
    concepts: Mapping[str, tuple] | None = None,
    series_number: int = 900,
    series_description: str = "unetrpp segmentation",
    model_name: str = "UNETR++",
) -> Path:
    """Write the ``(z, y, x)`` label map ``label`` as a binary DICOM SEG referencing the series in ``dicom_dir``.

    Args:
        label: integer label map as ``predict`` produces it, on ``geometry``.
        dicom_dir: the folder of the source series (one series, single-frame instances).
        out: the ``.dcm`` file; written to a temporary file and renamed into place.
        labels: the model's label names, name -> value (``Predictor.labels``); 0 is background.
        geometry: the label map's grid; by default the series' own grid as SimpleITK reads it.
        include_empty: also declare labels absent from the map (as segments without frames).
        concepts: name -> ``(category, type)`` codes (pydicom ``Code``); default SCT Tissue / Tissue.
    """
    from .. import __version__

    hd, _ = require_highdicom()
    from pydicom.sr.codedict import codes

    out = Path(out)
    label = np.asarray(label)
    if label.ndim != 3 or not np.issubdtype(label.dtype, np.integer):
        raise UserError(f"{out}: need a 3D integer label map, got {label.dtype} of shape {label.shape}")
    datasets = read_series(dicom_dir)
    if geometry is None:
        geometry = series_geometry(datasets)
    try:
        mapping = slice_mapping(datasets, geometry, label.shape)
    except (ValueError, AttributeError) as e:
        raise ImageWriteError(f"{out}: the label map does not fit the series in {dicom_dir}: {e}") from None
    if label.size and label.min() < 0:
        raise UserError(f"{out}: negative label values")
    names = {int(v): str(n) for n, v in labels.items()}
    declared = sorted(v for v in names if v > 0)
    present = _present(label)
    values = sorted(set(present) | set(declared)) if include_empty else present
    order = sorted(range(len(datasets)), key=lambda i: mapping[i][0])  # source instances in slice order
    if not present:  # highdicom cannot omit every frame: one empty frame per declared label
        values = values or declared
        if not values:
            raise UserError(f"{out}: the model declares no foreground label")
        order = order[:1]
    lut = np.zeros(int(max(values[-1], label.max(initial=0))) + 1, dtype=np.uint8 if len(values) < 256 else np.uint16)
    lut[values] = np.arange(1, len(values) + 1)
    frames = np.empty((len(order), int(datasets[0].Rows), int(datasets[0].Columns)), dtype=lut.dtype)
    for n, i in enumerate(order):
        frames[n] = lut[_frame(label, *mapping[i])]

    algorithm = hd.AlgorithmIdentificationSequence(name="unetrpp", family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    default = (codes.SCT.Tissue, codes.SCT.Tissue)
    descriptions = []
    for number, value in enumerate(values, start=1):
        name = names.get(value, f"label {value}")
        category, kind = (concepts or {}).get(name, default)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:_MAX_LABEL], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
    try:
        seg = hd.seg.Segmentation(
            source_images=[datasets[i] for i in order], pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
            series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
            manufacturer="unetrpp", manufacturer_model_name=model_name, software_versions=f"unetrpp {__version__}",
            device_serial_number="0", content_label="UNETRPP", content_description=series_description[:64],
            series_description=series_description[:64], omit_empty_frames=True)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise ImageWriteError(f"{out}: cannot make a DICOM SEG from {dicom_dir}: {_first_line(e)}") from None
    return atomic_write(out, seg.save_as)


def _present(label: np.ndarray) -> list[int]:
    """The foreground values in ``label``, counted slice by slice (no whole-volume int64 copy)."""
    seen = np.zeros(1, dtype=bool)
    for sl in label:
        counts = np.bincount(sl.ravel())
        if len(counts) > len(seen):
            seen = np.pad(seen, (0, len(counts) - len(seen)))
        seen[: len(counts)] |= counts > 0
    return [int(v) for v in np.flatnonzero(seen) if v > 0]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
