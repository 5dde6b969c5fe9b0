"""``unetrpp check``: every problem of a v2 dataset at once, each with the case it belongs to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..io import ImageReadError, NonFiniteError, read_image, read_json
from ..parallel import parallel_map
from .layout import _CHANNEL_RE, Case, Dataset, validate_dataset_json
from .validate import label_problem


@dataclass(frozen=True)
class Problem:
    case: str  # case name, or "dataset" for dataset-wide problems
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.message}"


def _reason(e: ImageReadError, path: Path) -> str:
    return str(e).removeprefix(f"{path}: ")


def _check_case(case: Case, num_channels: int, label_values: list[int]) -> list[Problem]:
    out: list[Problem] = []

    def add(msg: str) -> None:
        out.append(Problem(case.name, msg))

    reference = None  # (shape, geometry, file) of the first readable channel
    for path in case.images:
        if not path.exists():
            add(f"missing image file {path.name}")
            continue
        try:
            array, geometry = read_image(path)
        except NonFiniteError as e:  # raw voxels: ITK would have read them as 0
            add(f"{path.name} has {_reason(e, path)}")
            continue
        except ImageReadError as e:
            add(f"unreadable image {path.name}: {_reason(e, path)}")
            continue
        if array.ndim != 3:
            add(f"{path.name} is {array.ndim}D with shape {array.shape}; each channel file must be 3D")
            continue
        if reference is None:
            reference = (array.shape, geometry, path.name)
        else:
            if array.shape != reference[0]:
                add(f"{path.name} shape {array.shape} differs from {reference[2]} {reference[0]}")
            elif why := reference[1].mismatch(geometry):
                add(f"{path.name} geometry differs from {reference[2]}: {why}")
    if case.label is None:
        return out
    if not case.label.exists():
        add(f"missing label file {case.label.name}")
        return out
    try:
        label, lgeom = read_image(case.label)
    except NonFiniteError as e:
        add(f"label {case.label.name} has {_reason(e, case.label)}")
        return out
    except ImageReadError as e:
        add(f"unreadable label {case.label.name}: {_reason(e, case.label)}")
        return out
    if label.ndim != 3:
        add(f"label {case.label.name} is {label.ndim}D with shape {label.shape}; labels must be 3D")
        return out
    if problem := label_problem(label, label_values):
        add(f"label {case.label.name} has {problem}")
    if reference is not None:
        if label.shape != reference[0]:
            add(f"label shape {label.shape} differs from image shape {reference[0]}")
        elif why := reference[1].mismatch(lgeom):
            add(f"label geometry differs from image: {why}")
    return out


def check_dataset(root: str | os.PathLike, workers: int = 1, progress: bool = False) -> list[Problem]:
    """All problems found in the dataset at ``root`` (empty when it is ready for ``plan``)."""
    root = Path(root)
    if not root.is_dir():
        return [Problem("dataset", f"{root} is not a folder")]
    try:
        meta = read_json(root / "dataset.json")
    except (FileNotFoundError, ValueError) as e:
        return [Problem("dataset", str(e))]
    problems = [Problem("dataset", f"dataset.json: {p}") for p in validate_dataset_json(meta)]
    if problems:
        return problems
    ds = Dataset.open(root)
    if not (root / "imagesTr").is_dir():
        problems.append(Problem("dataset", "no imagesTr folder"))
    if not (root / "labelsTr").is_dir():
        problems.append(Problem("dataset", "no labelsTr folder"))
    cases = ds.training_cases()
    if not cases:
        problems.append(Problem("dataset", "no training cases: imagesTr/labelsTr hold no CASE files"))
    elif len(cases) != ds.num_training:
        msg = f"numTraining is {ds.num_training} but {len(cases)} training cases were found"
        problems.append(Problem("dataset", msg))
    problems += _extra_files(root, ds)

    jobs = [(c, ds.num_channels, ds.label_values) for c in cases]
    for r in parallel_map(_check_case, jobs, workers, progress, desc="check", chunksize=4):
        problems += r
    return problems


def _extra_files(root: Path, ds: Dataset) -> list[Problem]:
    out = []
    ending = ds.file_ending
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        d = root / folder
        if not d.is_dir():
            continue
        for entry in sorted(os.listdir(d)):
            if entry.startswith("."):
                continue
            if not entry.endswith(ending):
                out.append(Problem(entry, f"{folder}/{entry}: unexpected file (file_ending is {ending})"))
                continue
            stem = entry[: -len(ending)]
            if folder == "labelsTr":
                continue  # every label names a case
            m = _CHANNEL_RE.match(stem)
            if not m:
                out.append(Problem(stem, f"{folder}/{entry}: image name must end in _XXXX (channel index)"))
                continue
            case, channel = m.group("case"), int(m.group("channel"))
            if channel >= ds.num_channels:
                out.append(Problem(case, f"{folder}/{entry}: channel count mismatch: channel {channel} found, "
                                         f"dataset.json declares {ds.num_channels} channel(s)"))  # fmt: skip
    return out
