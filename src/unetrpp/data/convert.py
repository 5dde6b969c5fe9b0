"""Converters from the paper datasets' download layouts into the nnU-Net v2 raw layout.

Each converter reads the layout as it comes from the data provider, writes ``DST`` in the v2
layout (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``) and a ``splits.json``:

* ``synapse``: BTCV ``RawData`` (``img0001.nii.gz`` / ``label0001.nii.gz``); 14 classes, the
  paper's fixed 18 train / 12 test split (spec section 5.1).
* ``btcv``: the same download, all 13 organs, 24 train / 6 validation. The official list is not
  public; we fix the split of MONAI's BTCV tutorial (validation ``img0035``-``img0040``).
* ``acdc``: ``patientNNN/patientNNN_frameMM.nii.gz`` + ``_gt``, end-diastole and end-systole frames
  from ``Info.cfg``; the paper's 20 test patients (40 volumes) held out, patients 001-100
  otherwise train, patients above 100 (ACDC's own test set) go to ``imagesTs``/``labelsTs``.
* ``msd``: any Medical Segmentation Decathlon task (``dataset.json`` with a ``training`` list,
  4D multi-modal NIfTI split into ``CASE_0000``, ``CASE_0001``, ...). Task06 Lung gets the paper's
  fixed 13-case test split (spec section 5.4); every other task 5-fold cross-validation.

Source files are copied byte for byte where no channel split is needed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from ..io import read_image, read_json, write_image
from ..io.jsonio import atomic_write
from ..parallel import parallel_map
from .layout import fixed_split, kfold_splits, safe_case_name, write_dataset_json, write_splits

BTCV_LABELS = {
    "background": 0, "spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "esophagus": 5,
    "liver": 6, "stomach": 7, "aorta": 8, "inferior vena cava": 9, "portal and splenic vein": 10,
    "pancreas": 11, "right adrenal gland": 12, "left adrenal gland": 13,
}  # fmt: skip

#: Spec section 5.1: the paper's Synapse test ("val" in the official code) cases.
SYNAPSE_TEST = [f"img{i:04d}" for i in (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)]
#: Our fixed BTCV validation cases (MONAI's BTCV tutorial split).
BTCV_VAL = [f"img{i:04d}" for i in range(35, 41)]
#: Spec section 5.2: the paper's ACDC test patients.
ACDC_TEST_PATIENTS = (2, 3, 8, 9, 12, 14, 17, 24, 42, 48, 49, 53, 55, 64, 67, 79, 81, 88, 92, 95)
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
#: Spec section 5.4: the paper's Decathlon-Lung test cases.
LUNG_TEST = [f"lung_{i:03d}" for i in (1, 3, 25, 27, 44, 46, 48, 58, 62, 70, 81, 83, 93)]


def copy_atomic(src: Path, dst: Path, root: Path | None = None) -> None:
    """Copy byte for byte via a temporary file and a rename; ``src`` (links resolved) must be a regular
    file inside ``root`` when given, so a link in a downloaded folder cannot pull in other files."""
    if root is not None:
        try:
            real = src.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{src}: cannot be read ({e})") from None
        if not real.is_relative_to(Path(root).resolve()):
            raise UserError(f"{src}: points outside {root} (to {real}); refusing to copy it")
        if not real.is_file():
            raise UserError(f"{src}: not a regular file")
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def _need(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: expected by the source layout but missing")
    return path


def _call(fn: Callable, args: tuple):
    return fn(*args)


def _run(jobs: list[tuple[Callable, tuple]], workers: int) -> None:
    parallel_map(_call, jobs, workers)


# ---------------------------------------------------------------------- Synapse / BTCV
def convert_synapse(src: str | os.PathLike, dst: str | os.PathLike, variant: str = "synapse") -> Path:
    """BTCV ``RawData`` -> v2 layout with the ``synapse`` (18/12) or ``btcv`` (24/6) split."""
    if variant not in ("synapse", "btcv"):
        raise UserError(f"variant must be 'synapse' or 'btcv', got {variant!r}")
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    images, labels = {}, {}
    for p in sorted(src.rglob("*.nii.gz")):
        if p.name.startswith("."):
            continue
        m = re.fullmatch(r"(img|label)(\d{4})\.nii\.gz", p.name)
        if not m:
            continue
        table = images if m.group(1) == "img" else labels
        name = f"img{m.group(2)}"
        if name in table:
            raise UserError(f"{p}: case {name} appears twice in {src} (also {table[name]})")
        table[name] = p
    if not labels:
        raise UserError(f"{src}: no labelNNNN.nii.gz files; expected BTCV RawData (Training/img, Training/label)")
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise UserError(f"{labels[orphans[0]]}: label without image img{orphans[0][3:]}.nii.gz")
    train = sorted(labels)
    for n in train:
        copy_atomic(images[n], dst / "imagesTr" / f"{n}_0000.nii.gz", src)
        copy_atomic(labels[n], dst / "labelsTr" / f"{n}.nii.gz", src)
    for n in sorted(set(images) - set(labels)):
        copy_atomic(images[n], dst / "imagesTs" / f"{n}_0000.nii.gz", src)
    write_dataset_json(
        dst, ["CT"], BTCV_LABELS, len(train), ".nii.gz", name=variant,
        description=f"BTCV abdomen CT converted by unetrpp ({variant} split)",
    )  # fmt: skip
    val = SYNAPSE_TEST if variant == "synapse" else BTCV_VAL
    write_splits(dst, fixed_split(train, val))
    return dst


# ---------------------------------------------------------------------- ACDC
def _read_info(path: Path) -> dict[str, str]:
    info = {}
    for line in _need(path).read_text().splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise UserError(f"{path}: no integer {key} frame")
    return info


def convert_acdc(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """ACDC download -> v2 layout, ED and ES frames, the paper's 20 test patients held out."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such folder")
    patients = sorted(
        (p for p in src.rglob("patient*") if p.is_dir() and re.fullmatch(r"patient\d{3}", p.name)),
        key=lambda p: p.name,
    )
    if not patients:
        raise UserError(f"{src}: no patientNNN folders found; expected the ACDC training/ (and testing/) folders")
    train, test_patients = [], []
    seen = set()
    for folder in patients:
        if folder.name in seen:
            raise UserError(f"{folder}: {folder.name} appears twice in {src}")
        seen.add(folder.name)
        number = int(folder.name[7:])
        info = _read_info(folder / "Info.cfg")
        for key in ("ED", "ES"):
            case = f"{folder.name}_frame{int(info[key]):02d}"
            img = _need(folder / f"{case}.nii.gz")
            gt = folder / f"{case}_gt.nii.gz"
            if number <= 100:
                copy_atomic(img, dst / "imagesTr" / f"{case}_0000.nii.gz", src)
                copy_atomic(_need(gt), dst / "labelsTr" / f"{case}.nii.gz", src)
                train.append(case)
            else:
                copy_atomic(img, dst / "imagesTs" / f"{case}_0000.nii.gz", src)
                if gt.exists():
                    copy_atomic(gt, dst / "labelsTs" / f"{case}.nii.gz", src)
                test_patients.append(case)
    write_dataset_json(dst, ["MRI"], ACDC_LABELS, len(train), ".nii.gz", name="acdc",
                       description="ACDC cine MRI (ED and ES frames) converted by unetrpp")  # fmt: skip
    val = [c for c in train if int(c[7:10]) in ACDC_TEST_PATIENTS]
    write_splits(dst, fixed_split(train, val) if val else kfold_splits(train))
    return dst


# ---------------------------------------------------------------------- MSD
def _msd_image(src: Path, out_dir: Path, case: str, channels: int) -> None:
    if channels == 1:
        copy_atomic(src, out_dir / f"{case}_0000.nii.gz")
        return
    array, geometry = read_image(src)
    if array.ndim != 4 or array.shape[0] != channels:
        raise UserError(f"{src}: expected {channels} channels (4D), got shape {array.shape}")
    for c in range(channels):
        write_image(array[c], geometry, out_dir / f"{case}_{c:04d}.nii.gz")


def _msd_path(root: Path, entry, where: str) -> Path:
    """The file a ``dataset.json`` entry names; it must resolve (symlinks followed) inside ``root``."""
    meta = root / "dataset.json"
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise UserError(f"{meta}: {where}: {entry!r} is not a file path")
    path = (root / entry).resolve()
    if not path.is_relative_to(root.resolve()):
        raise UserError(f"{meta}: {where}: {entry!r} points outside {root}; paths must stay inside the task folder")
    _need(root / entry)
    if not path.is_file():
        raise UserError(f"{meta}: {where}: {entry!r} is not a file")
    return path


def _case_of(src: Path, entry: str, where: str) -> str:
    """The case name of an MSD entry: its file name without the NIfTI ending (a symlink keeps the entry's name)."""
    name = Path(entry).name.removesuffix(".nii.gz").removesuffix(".nii")
    return safe_case_name(name, f"{src / 'dataset.json'}: {where}")


def convert_msd(src: str | os.PathLike, dst: str | os.PathLike, workers: int = 1) -> Path:
    """A Medical Segmentation Decathlon task folder -> v2 layout (+ splits)."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UserError(f"{dst}: the output must be outside the MSD task folder {src} (it would overwrite it)")
    meta = read_json(src / "dataset.json")
    if not isinstance(meta, dict) or "training" not in meta:
        raise UserError(f"{src / 'dataset.json'}: not an MSD dataset.json (no 'training' list)")
    modality = meta.get("modality") or {"0": "unknown"}
    channels = [str(modality[k]) for k in sorted(modality, key=int)]
    labels = {}
    for k, v in meta.get("labels", {}).items():
        if not str(k).isdigit():
            raise UserError(f"{src / 'dataset.json'}: label key {k!r} is not an integer")
        name = str(v) if str(v) not in labels else f"{v}_{k}"
        labels[name] = int(k)
    # every entry is checked before anything is copied
    jobs, train = [], []
    if not isinstance(meta["training"], list) or not isinstance(meta.get("test", []), list):
        raise UserError(f"{src / 'dataset.json'}: 'training' and 'test' must be lists")
    for i, item in enumerate(meta["training"]):
        if not isinstance(item, dict) or not {"image", "label"} <= set(item):
            raise UserError(f"{src / 'dataset.json'}: training[{i}] must be {{'image': ..., 'label': ...}}")
        img = _msd_path(src, item["image"], f"training[{i}].image")
        lab = _msd_path(src, item["label"], f"training[{i}].label")
        case = _case_of(src, item["image"], f"training[{i}].image")
        train.append(case)
        jobs.append((_msd_image, (img, dst / "imagesTr", case, len(channels))))
        jobs.append((copy_atomic, (lab, dst / "labelsTr" / f"{case}.nii.gz")))
    for i, entry in enumerate(meta.get("test", [])):
        entry = entry.get("image") if isinstance(entry, dict) else entry
        img = _msd_path(src, entry, f"test[{i}]")
        case = _case_of(src, entry, f"test[{i}]")
        jobs.append((_msd_image, (img, dst / "imagesTs", case, len(channels))))
    if len(set(train)) != len(train):
        raise UserError(f"{src / 'dataset.json'}: a case is listed twice in 'training'")
    _run(jobs, workers)
    name = str(meta.get("name") or src.name)
    write_dataset_json(
        dst, channels, labels, len(train), ".nii.gz", name=name,
        description=str(meta.get("description", "")), reference=str(meta.get("reference", "")),
        licence=str(meta.get("licence", "")), converted_from="Medical Segmentation Decathlon",
    )  # fmt: skip
    if set(LUNG_TEST) <= set(train):
        write_splits(dst, fixed_split(train, LUNG_TEST))
    else:
        write_splits(dst, kfold_splits(train))
    return dst


CONVERTERS = {
    "synapse": lambda s, d, w: convert_synapse(s, d, "synapse"),
    "btcv": lambda s, d, w: convert_synapse(s, d, "btcv"),
    "acdc": lambda s, d, w: convert_acdc(s, d),
    "msd": lambda s, d, w: convert_msd(s, d, workers=w),
}
