"""The nnU-Net v2 raw dataset layout, and the splits file the trainer reads.

::

    DATASET/
      dataset.json        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                           "numTraining": 30, "file_ending": ".nii.gz", ...}
      imagesTr/CASE_0000.nii.gz [CASE_0001.nii.gz ...]   one file per channel
      labelsTr/CASE.nii.gz
      imagesTs/CASE_0000.nii.gz                          optional, unlabelled test cases
      splits.json         [{"train": [...], "val": [...]}, ...]   one entry per fold

A dataset in the Medical Segmentation Decathlon layout (``dataset.json`` with a ``training``
list, 4D multi-modal images) is recognised and refused with the command that converts it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath

import numpy as np

from ..errors import UserError
from ..io import FILE_ENDINGS, read_json, write_json

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order, its label file (None for test cases), and the
    label values its dataset declares (None when not known)."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None
    label_values: tuple[int, ...] | None = None


@dataclass
class Dataset:
    """A dataset in the nnU-Net v2 raw layout."""

    root: Path
    channel_names: list[str]
    labels: dict[str, int]
    file_ending: str
    num_training: int
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: str | os.PathLike) -> Dataset:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: no such dataset folder")
        meta = read_json(root / "dataset.json")
        problems = validate_dataset_json(meta)
        if problems:
            raise UserError(f"{root / 'dataset.json'}: {problems[0]}")
        channels = meta["channel_names"]
        return cls(
            root=root,
            channel_names=[str(channels[k]) for k in sorted(channels, key=int)],
            labels={str(k): int(v) for k, v in meta["labels"].items()},
            file_ending=meta["file_ending"],
            num_training=int(meta["numTraining"]),
            meta=meta,
        )

    # ------------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.root.name)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def label_values(self) -> list[int]:
        return sorted(set(self.labels.values()))

    @property
    def num_classes(self) -> int:
        """Network output channels: the largest label value + 1 (labels are 0..K)."""
        return max(self.label_values) + 1

    @property
    def class_names(self) -> dict[int, str]:
        return {v: k for k, v in self.labels.items()}

    # ------------------------------------------------------------------ cases
    def _cases_in(self, images_dir: str, labels_dir: str | None) -> list[Case]:
        img_root = self.root / images_dir
        names = set()
        if labels_dir is not None and (self.root / labels_dir).is_dir():
            names = set(_stems(self.root / labels_dir, self.file_ending))
        if img_root.is_dir():
            for stem in _stems(img_root, self.file_ending):
                m = _CHANNEL_RE.match(stem)
                if m:
                    names.add(m.group("case"))
        cases = []
        for n in sorted(names):
            images = tuple(img_root / f"{n}_{c:04d}{self.file_ending}" for c in range(self.num_channels))
            label = self.root / labels_dir / f"{n}{self.file_ending}" if labels_dir else None
            cases.append(Case(n, images, label, tuple(self.label_values)))
        return cases

    def training_cases(self) -> list[Case]:
        """Every case named by ``labelsTr`` or ``imagesTr`` (files may be missing: ``check`` says so)."""
        return self._cases_in("imagesTr", "labelsTr")

    def test_cases(self) -> list[Case]:
        """Cases in ``imagesTs``, with ``labelsTs/CASE`` as label where that file exists."""
        cases = self._cases_in("imagesTs", None)
        out = []
        for c in cases:
            lab = self.root / "labelsTs" / f"{c.name}{self.file_ending}"
            out.append(Case(c.name, c.images, lab if lab.exists() else None, c.label_values))
        return out

    def case(self, name: str) -> Case:
        for c in self.training_cases():
            if c.name == name:
                return c
        raise UserError(f"{self.root}: no training case named {name!r}")


def _stems(folder: Path, ending: str) -> list[str]:
    out = []
    for entry in os.scandir(folder):
        if entry.name.startswith(".") or not entry.name.endswith(ending):
            continue
        out.append(entry.name[: -len(ending)])
    return out


def validate_dataset_json(meta) -> list[str]:
    """Problems with a v2 ``dataset.json`` (empty when fine)."""
    if not isinstance(meta, dict):
        return ["dataset.json must hold a JSON object"]
    if "training" in meta and "channel_names" not in meta:
        return ["this is a Medical Segmentation Decathlon dataset.json; convert it first: unetrpp convert msd SRC DST"]
    problems = []
    for key in ("channel_names", "labels", "numTraining", "file_ending"):
        if key not in meta:
            problems.append(f"missing key {key!r}")
    if problems:
        return problems
    ch = meta["channel_names"]
    if not isinstance(ch, dict) or not ch:
        problems.append("'channel_names' must map '0', '1', ... to modality names")
    elif sorted(int(k) for k in ch if str(k).isdigit()) != list(range(len(ch))):
        problems.append(f"'channel_names' keys must be 0..{len(ch) - 1}, got {sorted(ch)}")
    labels = meta["labels"]
    if not isinstance(labels, dict) or not labels:
        problems.append("'labels' must map names to integer values")
    else:
        bad = [k for k, v in labels.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            problems.append(
                f"label {bad[0]!r} must be a non-negative integer (region-based label lists are not supported)"
            )
        elif 0 not in labels.values():
            problems.append("'labels' must include background with value 0")
        elif len(set(labels.values())) != len(labels):
            problems.append("two label names share one value")
    if meta.get("file_ending") not in FILE_ENDINGS:
        problems.append(f"'file_ending' must be one of {', '.join(FILE_ENDINGS)}, got {meta.get('file_ending')!r}")
    if not isinstance(meta.get("numTraining"), int) or meta["numTraining"] < 0:
        problems.append("'numTraining' must be a non-negative integer")
    return problems


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """``{name: value}`` from a dataset.json, v2 (``{"liver": 1}``) or MSD (``{"1": "liver"}``) style."""
    path = Path(path)
    meta = read_json(path)
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{path}: no 'labels' mapping")

    def integer(v) -> int | None:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        return int(v) if isinstance(v, str) and v.strip().isdigit() else None

    if all(integer(v) is not None for v in labels.values()):
        return {str(k): integer(v) for k, v in labels.items()}
    if all(integer(k) is not None and isinstance(v, str) for k, v in labels.items()):  # MSD: value -> name
        return {v: integer(k) for k, v in labels.items()}
    raise UserError(f"{path}: 'labels' must map names to integer values (or, MSD style, values to names)")


def write_dataset_json(
    root: str | os.PathLike,
    channel_names: list[str] | dict,
    labels: dict[str, int],
    num_training: int,
    file_ending: str = ".nii.gz",
    **extra,
) -> Path:
    if not isinstance(channel_names, dict):
        channel_names = {str(i): n for i, n in enumerate(channel_names)}
    meta = {
        "channel_names": channel_names,
        "labels": {str(k): int(v) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": file_ending,
        **extra,
    }
    problems = validate_dataset_json(meta)
    if problems:
        raise UserError(f"dataset.json: {problems[0]}")
    return write_json(meta, Path(root) / "dataset.json")


# ---------------------------------------------------------------------- splits
SPLIT_SEED = 12345


def kfold_splits(names: list[str], folds: int = 5, seed: int = SPLIT_SEED) -> list[dict[str, list[str]]]:
    """``folds``-fold cross-validation over sorted case names, shuffled with a fixed seed."""
    names = sorted(names)
    if len(names) < 2:
        raise UserError(f"cross-validation needs at least 2 cases, got {len(names)}")
    folds = min(folds, len(names))
    order = np.random.default_rng(seed).permutation(len(names))
    parts = np.array_split(order, folds)
    out = []
    for k in range(folds):
        val = sorted(names[i] for i in parts[k])
        out.append({"train": [n for n in names if n not in set(val)], "val": val})
    return out


def fixed_split(names: list[str], val: list[str]) -> list[dict[str, list[str]]]:
    """One fold: ``val`` held out, every other case trains. Unknown ``val`` names are an error."""
    missing = sorted(set(val) - set(names))
    if missing:
        raise UserError(f"validation cases not in the dataset: {', '.join(missing[:5])}")
    vs = set(val)
    return [{"train": sorted(n for n in names if n not in vs), "val": sorted(vs)}]


def write_splits(root: str | os.PathLike, splits: list[dict[str, list[str]]]) -> Path:
    for i, s in enumerate(splits):
        overlap = set(s["train"]) & set(s["val"])
        if overlap:
            raise UserError(f"split {i}: cases both in train and val: {sorted(overlap)[:5]}")
    return write_json(splits, Path(root) / "splits.json")


def safe_case_name(name, source: str | os.PathLike) -> str:
    """``name`` when it is a plain case name (a file name stem: no folder, no ``..``); else a one-line
    ValueError naming ``source``, where the name came from. Every case name that becomes a path passes here."""
    if (
        not isinstance(name, str)
        or not name.strip()
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or os.path.isabs(name)
        or PureWindowsPath(name).drive
    ):
        raise UserError(f"{source}: case name {name!r} is not a plain name (no folders, '..', or absolute paths)")
    return name


def _check_splits(path: Path, splits, cases: set[str]) -> None:
    if not isinstance(splits, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in splits):
        raise UserError(f"{path}: must be a list of {{'train': [...], 'val': [...]}} folds")
    for i, fold in enumerate(splits):
        for key in ("train", "val"):
            if not isinstance(fold[key], list):
                raise UserError(f"{path}: fold {i} {key!r} must be a list of case names")
            for name in fold[key]:
                safe_case_name(name, f"{path}: fold {i} {key!r}")
                if name not in cases:
                    raise UserError(f"{path}: fold {i} {key!r}: case {name!r} is not a training case of the dataset")


def load_splits(root: str | os.PathLike, create: bool = True) -> list[dict[str, list[str]]]:
    """``splits.json`` of a dataset; made (5-fold CV over the training cases) when absent and ``create``.

    Every name in it must be a plain name of one of the dataset's training cases.
    """
    path = Path(root) / "splits.json"
    if path.exists():
        splits = read_json(path)
        _check_splits(path, splits, {c.name for c in Dataset.open(root).training_cases()})
        return splits
    if not create:
        raise FileNotFoundError(f"{path}: no such file")
    names = [c.name for c in Dataset.open(root).training_cases()]
    splits = kfold_splits(names)
    write_splits(root, splits)
    return splits
