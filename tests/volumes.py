"""Small volumes, geometries and DICOM series made in the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unetrpp.io import Geometry, write_image


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A proper rotation (det +1) from angles in degrees about x, y, z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


#: LPS identity, a RAS-stored (x and y flipped) one, and an oblique one.
GEOMETRIES = {
    "lps": Geometry((0.8, 0.75, 2.5), (-120.5, -98.25, 33.0), tuple(np.eye(3).ravel())),
    "ras": Geometry((1.5, 1.25, 3.0), (101.0, 88.5, -40.0), tuple(np.diag([-1.0, -1.0, 1.0]).ravel())),
    "oblique": Geometry((0.9, 1.1, 4.0), (12.5, -7.25, 100.0), tuple(rotation(12.0, -7.0, 25.0).ravel())),
}


def write_dicom_series(
    volume: np.ndarray, geometry: Geometry, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1"
) -> Path:
    """Write an int16 ``(z, y, x)`` volume as a CT DICOM series, one file per slice."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    d = geometry.direction_matrix
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    for k in range(volume.shape[0]):
        sl = sitk.GetImageFromArray(volume[k : k + 1].astype(np.int16))
        pos = np.asarray(geometry.origin) + d[:, 2] * geometry.spacing[2] * k
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0010|0010": "PHANTOM^TEST",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in pos),
            "0020|0037": orientation,
            "0028|0030": f"{geometry.spacing[1]:.10f}\\{geometry.spacing[0]:.10f}",
            "0018|0050": f"{geometry.spacing[2]:.10f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        sl.SetSpacing((geometry.spacing[0], geometry.spacing[1], geometry.spacing[2]))
        writer.SetFileName(str(folder / f"{series_uid.replace('.', '_')}_{k:04d}.dcm"))
        writer.Execute(sl)
    return folder


def make_v2_dataset(root: Path, cases: int = 3, channels: int = 1, shape=(12, 16, 14), seed: int = 0,
                    geometry: Geometry | None = None, labels=None) -> Path:
    """A small valid v2 dataset: noise images with a labelled box per class."""
    from unetrpp.data.layout import write_dataset_json

    rng = np.random.default_rng(seed)
    geometry = geometry or GEOMETRIES["lps"]
    labels = labels or {"background": 0, "a": 1, "b": 2}
    for i in range(cases):
        name = f"case_{i:03d}"
        lab = np.zeros(shape, np.uint8)
        lab[2:6, 3:8, 2:7] = 1
        lab[7:10, 8:13, 6:12] = 2
        for c in range(channels):
            img = (rng.normal(100 + 20 * c, 10, shape) + 40 * lab).astype(np.float32)
            write_image(img, geometry, root / "imagesTr" / f"{name}_{c:04d}.nii.gz")
        write_image(lab, geometry, root / "labelsTr" / f"{name}.nii.gz")
    write_dataset_json(root, [f"MR{c}" for c in range(channels)], labels, cases)
    return root


def plans_for(normalization, target_spacing=(2.0, 1.0, 1.0), labels=None, patch=(16, 32, 32), channels=None):
    """A :class:`unetrpp.data.plans.Plans` with just what a preprocessing test sets (the network: synapse's)."""
    from unetrpp.data.plans import Plans

    labels = labels or {"background": 0, "a": 1, "b": 2}
    channels = channels or [n.get("channel", f"ch{i}") for i, n in enumerate(normalization)]
    return Plans.from_dict({"dataset": "test", "target_spacing": list(target_spacing), "patch_size": list(patch),
                            "channel_names": channels, "labels": labels, "normalization": normalization,
                            "resampling": {"image_order": 3, "label_order": 1, "anisotropy_threshold": 3,
                                           "low_resolution_axis_order": 0}})


def planned_phantom(root: Path, cases: int, seed: int = 5, patch=(16, 32, 32), preset: str = "synapse") -> Path:
    """A phantom dataset of ``cases`` cases at ``root``, planned for ``patch`` and preprocessed: ready to train."""
    from unetrpp.data import make_phantom_dataset, plan_dataset, preprocess_dataset

    make_phantom_dataset(root, cases=cases, seed=seed)
    plan_dataset(root, patch_size=patch, preset=preset)
    preprocess_dataset(root, workers=1)
    return root
