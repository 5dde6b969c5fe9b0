"""Reading and writing volumes with their geometry: NIfTI, NRRD, MHA/MHD and DICOM series.

Arrays are numpy in ``(z, y, x)`` order (SimpleITK's ``GetArrayFromImage``); a multi-channel case
is ``(c, z, y, x)``. Geometry follows ITK/DICOM conventions: ``spacing`` and ``origin`` in
``(x, y, z)`` millimetres in LPS patient space and ``direction`` as a row-major 3x3 matrix whose
columns are the x, y, z axis directions. ``Geometry.spacing_zyx`` gives the spacing in array order.

Every failure is an :class:`ImageReadError` / :class:`ImageWriteError` whose message is one line
naming the file. Writes go to a temporary file in the target folder and are renamed into place,
so an interrupted write never leaves a half-written volume under the final name.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .atomic import atomic_path

#: File endings we read and write, longest first so ``.nii.gz`` wins over ``.gz``.
FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageReadError(UserError):
    """A volume could not be read; the message names the file and the problem in one line."""


class NonFiniteError(ImageReadError):
    """A volume holds NaN/inf voxels (ITK's NIfTI reader would silently turn them into 0)."""


class ImageWriteError(UserError):
    """A volume could not be written; the message names the file and the problem in one line."""


def _sitk():
    import SimpleITK as sitk

    return sitk


def split_ending(path: str | os.PathLike) -> tuple[str, str]:
    """``'a/b/case_0000.nii.gz'`` -> ``('a/b/case_0000', '.nii.gz')``; ending '' for a folder or unknown type."""
    s = str(path)
    low = s.lower()
    for ending in FILE_ENDINGS:
        if low.endswith(ending):
            return s[: -len(ending)], s[-len(ending):]
    return s, ""


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in patient space (ITK conventions, LPS, x-y-z order)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major 3x3

    def __post_init__(self):
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise UserError("geometry needs 3 spacings, 3 origin coordinates and 9 direction values")
        if not all(v > 0 and np.isfinite(v) for v in self.spacing):
            raise UserError(f"spacing must be positive and finite, got {self.spacing}")
        if not (np.isfinite(self.origin).all() and np.isfinite(self.direction).all()):
            raise UserError("origin and direction must be finite")
        if abs(np.linalg.det(np.reshape(self.direction, (3, 3)))) < 1e-6:
            raise UserError(f"direction must be an invertible 3x3 matrix, got {self.direction}")

    @classmethod
    def identity(cls, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> Geometry:
        return cls(tuple(reversed([float(s) for s in spacing_zyx])), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.spacing))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def with_spacing_zyx(self, spacing_zyx: Sequence[float]) -> Geometry:
        return Geometry(tuple(reversed([float(s) for s in spacing_zyx])), self.origin, self.direction)

    def shifted(self, offset_zyx: Sequence[int]) -> Geometry:
        """The geometry of a crop that starts at voxel ``offset_zyx`` of this grid."""
        index_xyz = np.asarray(list(reversed(offset_zyx)), dtype=np.float64)
        origin = np.asarray(self.origin) + self.direction_matrix @ (index_xyz * np.asarray(self.spacing))
        return Geometry(self.spacing, tuple(origin), self.direction)

    def matches(self, other: Geometry, tol: float = 1e-3) -> bool:
        """Same grid within ``tol`` (relative for spacing, mm for origin, absolute for direction)."""
        return self.mismatch(other, tol) is None

    def mismatch(self, other: Geometry, tol: float = 1e-3) -> str | None:
        """A short description of the first difference beyond ``tol``, or None."""
        a, b = np.asarray(self.spacing), np.asarray(other.spacing)
        if not np.allclose(a, b, rtol=tol, atol=0):
            return f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}"
        if not np.allclose(self.origin, other.origin, rtol=0, atol=max(tol, tol * float(a.max()))):
            return f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}"
        if not np.allclose(self.direction, other.direction, rtol=0, atol=tol):
            return f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}"
        return None

    def to_json(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_json(cls, d: dict) -> Geometry:
        return cls(tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _geometry_of(image, path) -> Geometry:
    dim = image.GetDimension()
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()):
        raise ImageReadError(f"{path}: bad geometry in header: non-finite origin or direction")
    try:
        return Geometry(spacing[:3], origin[:3], tuple(direction[:3, :3].ravel()))
    except ValueError as e:
        raise ImageReadError(f"{path}: bad geometry in header: {e}") from None


def _read_sitk(path: Path) -> tuple:
    sitk = _sitk()
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        try:
            series = reader.GetGDCMSeriesIDs(str(path))
        except RuntimeError:
            series = ()
        if not series:
            raise ImageReadError(f"{path}: folder holds no DICOM series")
        if len(series) > 1:
            raise ImageReadError(
                f"{path}: folder holds {len(series)} DICOM series ({', '.join(series[:3])}); give one series a folder"
            )
        files = reader.GetGDCMSeriesFileNames(str(path), series[0])
        if len(files) < 2:
            raise ImageReadError(f"{path}: DICOM series has {len(files)} slice; a volume needs at least 2")
        reader.SetFileNames(files)
        try:
            return reader.Execute(), None
        except RuntimeError as e:
            raise ImageReadError(f"{path}: unreadable DICOM series: {_first_line(e)}") from None
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if not split_ending(path)[1]:
        raise ImageReadError(f"{path}: unknown file type; use one of {', '.join(FILE_ENDINGS)} or a DICOM folder")
    header = _verify_nifti(path) if path.name.lower().endswith((".nii", ".nii.gz")) else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        _check_memory(path, reader.GetSize(), reader.GetNumberOfComponents(),
                      sitk.GetPixelIDValueAsString(reader.GetPixelID()))
        return reader.Execute(), header
    except RuntimeError as e:
        raise ImageReadError(f"{path}: unreadable or truncated: {_first_line(e)}") from None


def _check_memory(path: Path, size: Sequence[int], components: int, pixel_type: str) -> None:
    """Refuse, before allocating, a volume that cannot fit in the memory left (ITK's buffer and its
    numpy copy): one line instead of a ``MemoryError`` or the kernel's OOM killer."""
    import re

    from ..runtime import available_memory

    voxels = math.prod(int(v) for v in size) * max(int(components), 1)
    if voxels == 0:
        raise ImageReadError(f"{path}: empty volume (size {_fmt(size)})")
    bits = re.search(r"(\d+)-bit", pixel_type)
    need = 2 * voxels * (int(bits.group(1)) // 8 if bits else 8)
    avail = available_memory()
    if avail is not None and need > avail:
        shape = " x ".join(str(int(v)) for v in reversed(size))
        raise ImageReadError(f"{path}: {shape} voxels of {pixel_type} need {need / 2**30:.1f} GiB of memory to read; "
                             f"{avail / 2**30:.1f} GiB are available")


def _first_line(e: Exception) -> str:
    # SimpleITK errors are multi-line C++ traces; keep the informative part of the last line.
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    msg = lines[-1]
    for ln in lines:
        if "Description:" in ln:
            msg = ln.split("Description:", 1)[1].strip()
            break
        if "ITK ERROR:" in ln:  # "ITK ERROR: MetaImageIO(0x..): File cannot be read: ..."
            msg = ln.split("):", 1)[-1].strip()
            break
    return msg[:200]


@dataclass(frozen=True)
class _NiftiHeader:
    """What :func:`_verify_nifti` learnt from a NIfTI header that ITK's reader hides."""

    path: Path
    byteorder: str  # "<" or ">"
    datatype: int
    offset: int  # of the voxel data, in the uncompressed stream
    voxels: int
    scl_inter: float
    compressed: bool


#: Bits per voxel of each NIfTI datatype code.
_NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64, 1280: 64,
               1536: 128, 1792: 128, 2048: 256, 2304: 32}
#: NIfTI datatype codes of IEEE floats (float32, float64), the only stored types that can hold NaN.
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _verify_nifti(path: Path) -> _NiftiHeader:
    """Refuse a NIfTI file whose voxel data is shorter than its header says, or whose spacing is bad.

    ITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros, so we
    compare the header's data size with the file size (``.nii``) or with the uncompressed size
    that gzip records in its last four bytes (``.nii.gz`` below 4 GiB). ITK also replaces a zero or
    NaN ``pixdim`` by 1 mm, so the spacing is checked here, in the header.
    """
    import gzip
    import struct

    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                head = f.read(544)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                actual = struct.unpack("<I", f.read(4))[0]
            compressed = True
        else:
            with open(path, "rb") as f:
                head = f.read(544)
            actual, compressed = path.stat().st_size, None
    except (OSError, EOFError, zlib.error) as e:
        raise ImageReadError(f"{path}: unreadable or truncated: {e}") from None
    if len(head) < 348:
        raise ImageReadError(f"{path}: truncated NIfTI header ({len(head)} bytes)")
    for end in "<>":
        size = struct.unpack(end + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        raise ImageReadError(f"{path}: not a NIfTI file (bad header size)")
    if size == 348:
        datatype, bitpix = struct.unpack(end + "2h", head[70:74])
        dim = struct.unpack(end + "8h", head[40:56])
        pixdim = struct.unpack(end + "8f", head[76:108])
        offset = struct.unpack(end + "f", head[108:112])[0]
        if not (math.isfinite(offset) and 0 <= offset < 2**40):
            raise ImageReadError(f"{path}: corrupt NIfTI header (vox_offset {offset})")
        offset = int(offset)
        scl_inter = struct.unpack(end + "f", head[116:120])[0]
    else:
        if len(head) < 540:
            raise ImageReadError(f"{path}: truncated NIfTI-2 header")
        datatype, bitpix = struct.unpack(end + "2h", head[12:16])
        dim = struct.unpack(end + "8q", head[16:80])
        pixdim = struct.unpack(end + "8d", head[104:168])
        offset = struct.unpack(end + "q", head[168:176])[0]
        if not 0 <= offset < 2**40:
            raise ImageReadError(f"{path}: corrupt NIfTI header (vox_offset {offset})")
        scl_inter = struct.unpack(end + "d", head[184:192])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        raise ImageReadError(f"{path}: corrupt NIfTI header (dim[0]={ndim}, bitpix={bitpix})")
    if any(d < 0 for d in dim[1 : ndim + 1]):
        raise ImageReadError(f"{path}: corrupt NIfTI header (negative size {_fmt(dim[1 : ndim + 1])})")
    if any(d == 0 for d in dim[1 : ndim + 1]):
        raise ImageReadError(f"{path}: empty volume (size {_fmt(dim[1 : ndim + 1])} in the header)")
    spacing = pixdim[1 : min(ndim, 3) + 1]
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ImageReadError(f"{path}: bad spacing in header: pixdim {_fmt(spacing)} must be positive and finite")
    voxels = math.prod(int(d) for d in dim[1 : ndim + 1])
    bits = _NIFTI_BITS.get(datatype, bitpix)  # readers size the data by the datatype, not bitpix
    expected = max(offset, size) + voxels * bits // 8
    if compressed is not None and actual != expected % 2**32:
        # the gzip trailer disagrees (a cut file ends in arbitrary bytes): decompress to be sure
        try:
            actual = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    actual += len(chunk)
        except (OSError, EOFError, zlib.error) as e:
            raise ImageReadError(f"{path}: truncated or corrupt gzip stream: {e}") from None
    if actual < expected:
        raise ImageReadError(f"{path}: truncated: header needs {expected} bytes of data, the file holds {actual}")
    return _NiftiHeader(path, end, datatype, max(offset, size), voxels, scl_inter, bool(compressed))


def _nifti_nonfinite(h: _NiftiHeader) -> int:
    """NaN/inf voxels stored in a float NIfTI file, counted from the raw data in 16 MiB pieces."""
    import gzip

    dtype = np.dtype(h.byteorder + _NIFTI_FLOATS[h.datatype])
    left, bad, carry = h.voxels * dtype.itemsize, 0, b""
    try:
        with (gzip.open if h.compressed else open)(h.path, "rb") as f:
            f.seek(h.offset)
            while left > 0 and (chunk := f.read(min(left, 1 << 24))):
                left -= len(chunk)
                chunk = carry + chunk
                usable = len(chunk) - len(chunk) % dtype.itemsize
                carry = chunk[usable:]
                x = np.frombuffer(chunk[:usable], dtype)
                bad += x.size - int(np.count_nonzero(np.isfinite(x)))
    except (OSError, EOFError, zlib.error) as e:
        raise ImageReadError(f"{h.path}: truncated or corrupt gzip stream: {e}") from None
    return bad


def _check_finite(path: Path, array: np.ndarray, header: _NiftiHeader | None) -> None:
    """Refuse NaN/inf voxels. ITK's NIfTI reader turns them into 0 (then applies ``scl_inter``), so a
    float NIfTI holding such a value is checked again in its raw data."""
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return
    if not (np.isfinite(array.min()) and np.isfinite(array.max())):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    elif header is not None and header.datatype in _NIFTI_FLOATS and (
        (array == 0).any() or (math.isfinite(header.scl_inter) and (array == header.scl_inter).any())
    ):
        bad = _nifti_nonfinite(header)
    else:
        return
    if bad:
        raise NonFiniteError(f"{path}: {bad} NaN/inf voxels; replace them (e.g. with the background value) first")


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, Geometry]:
    """Read one volume (file or DICOM folder) as ``(array_zyx, geometry)``.

    A 4D file (e.g. an MSD multi-modal NIfTI) comes back as ``(c, z, y, x)``; a multi-component
    (vector) image likewise. 2D images are refused, and so are NaN/inf voxels (:class:`NonFiniteError`).
    """
    sitk = _sitk()
    path = Path(path)
    image, header = _read_sitk(path)
    dim = image.GetDimension()
    if dim not in (3, 4):
        raise ImageReadError(f"{path}: is {dim}D; a 3D volume (or 4D multi-channel) is needed")
    geometry = _geometry_of(image, path)
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as e:
        raise ImageReadError(f"{path}: unreadable pixel data: {_first_line(e)}") from None
    if image.GetNumberOfComponentsPerPixel() > 1:  # vector pixels: (z, y, x, c) -> (c, z, y, x)
        if dim != 3:
            raise ImageReadError(f"{path}: 4D image with vector pixels is not supported")
        array = np.moveaxis(array, -1, 0)
    _check_finite(path, array, header)
    return array, geometry


def read_case(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case into ``(c, z, y, x)``; all channels must share one grid."""
    arrays, geometry = [], None
    for p in paths:
        array, g = read_image(p)
        if array.ndim == 4:
            raise ImageReadError(f"{p}: is 4D; channel files must be 3D (convert 4D files first)")
        if geometry is None:
            geometry, shape0 = g, array.shape
        else:
            if array.shape != shape0:
                raise ImageReadError(f"{p}: shape {array.shape} differs from the first channel's {shape0}")
            why = geometry.mismatch(g)
            if why:
                raise ImageReadError(f"{p}: geometry differs from the first channel: {why}")
        arrays.append(array)
    if not arrays:
        raise ImageReadError("no channel files given")
    return np.stack(arrays), geometry


_WRITABLE = {
    np.dtype(t)
    for t in ("uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64", "float32", "float64")
}


def _verify_written(tmp: str, array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Read a just-written volume back before it is renamed into place.

    ITK's writers do not report a short write (a full disk leaves a truncated file and no error), so
    the file is synced, read back and compared voxel for voxel, with its geometry.
    """
    sitk = _sitk()
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if tmp.endswith((".nii", ".nii.gz")):
            _verify_nifti(Path(tmp))
        back = sitk.ReadImage(tmp)
        data = sitk.GetArrayViewFromImage(back)
        if np.issubdtype(array.dtype, np.floating):  # NIfTI reads NaN/inf back as 0: compare the finite part
            same = np.array_equal(np.where(np.isfinite(data), data, 0), np.where(np.isfinite(array), array, 0))
        else:
            same = np.array_equal(data, array)
        same = same and np.allclose(back.GetSpacing(), geometry.spacing, rtol=1e-5)
    except (RuntimeError, ImageReadError, OSError) as e:
        raise ImageWriteError(f"{path}: the written file does not read back (disk full?): {_first_line(e)}") from None
    if not same:
        raise ImageWriteError(f"{path}: the written file differs from the data (disk full or faulty storage?)")


def write_image(array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a 3D ``(z, y, x)`` array with ``geometry`` to ``path`` atomically (format from the ending)."""
    sitk = _sitk()
    path = Path(path)
    ending = split_ending(path)[1]
    if not ending:
        raise ImageWriteError(f"{path}: unknown file type; use one of {', '.join(FILE_ENDINGS)}")
    array = np.asarray(array)
    if array.ndim != 3:
        raise ImageWriteError(f"{path}: can only write 3D volumes, got shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.dtype not in _WRITABLE:
        raise ImageWriteError(f"{path}: cannot write dtype {array.dtype}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ending in (".mhd", ".nhdr"):
        return _write_pair(image, array, geometry, path, compress)
    try:
        with atomic_path(path, suffix=ending) as tmp:
            sitk.WriteImage(image, str(tmp), compress)
            _verify_written(str(tmp), array, geometry, path)
    except RuntimeError as e:
        raise ImageWriteError(f"{path}: {_first_line(e)}") from None
    return path


def _write_pair(image, array: np.ndarray, geometry: Geometry, path: Path, compress: bool) -> Path:
    """A header + data file format (``.mhd``, ``.nhdr``): written, synced and verified in a hidden folder
    beside ``path`` under the final names (the header names its data file), then each file is moved in
    through :func:`atomic_path`, the data file first and the header last, so an existing header always
    has its complete data."""
    sitk = _sitk()
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".partial", dir=path.parent,
                                     ignore_cleanup_errors=True) as folder:
        header = Path(folder) / path.name
        try:
            sitk.WriteImage(image, str(header), compress)
        except RuntimeError as e:
            raise ImageWriteError(f"{path}: {_first_line(e)}") from None
        data_files = [f for f in Path(folder).iterdir() if f.name != path.name]
        for f in data_files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _verify_written(str(header), array, geometry, path)
        with contextlib.ExitStack() as renames:  # left in reverse: the data files take their names first
            for f in [header, *data_files]:
                os.replace(f, renames.enter_context(atomic_path(path.parent / f.name)))
    return path
