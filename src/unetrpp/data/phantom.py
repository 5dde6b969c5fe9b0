"""``unetrpp phantom``: a synthetic abdominal CT dataset (nnU-Net v2 layout) for the demo and tests.

Each case is an axial stack through the upper abdomen in Hounsfield units: air, a body outline
with subcutaneous fat and an abdominal wall, visceral fat, a vertebra with paraspinal muscles,
unlabelled distractors with organ-like densities (bowel loops, inferior vena cava), and eight
labelled organs in BTCV numbering: spleen 1, right kidney 2, left kidney 3, gallbladder 4,
liver 6, stomach 7, aorta 8, pancreas 11. Organ shapes are ellipsoids (the pancreas a curved
chain of them) placed, scaled and rotated at random per case and bent by a smooth random
displacement field, so no two cases share a shape. Intensities overlap as in real CT (liver,
spleen, kidneys, pancreas, muscle and bowel within tens of HU of each other) with per-case
offsets, soft-tissue texture and acquisition noise, so a model has to learn shape and context.
Spacing is anisotropic (2-3 mm in plane, 4-6 mm between slices). Deterministic for a seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import UserError
from ..io import Geometry, write_image
from ..parallel import parallel_map
from .convert import BTCV_LABELS
from .layout import kfold_splits, write_dataset_json, write_splits

#: The organs drawn (BTCV numbering).
PHANTOM_ORGANS = {"spleen": 1, "right kidney": 2, "left kidney": 3, "gallbladder": 4, "liver": 6,
                  "stomach": 7, "aorta": 8, "pancreas": 11}  # fmt: skip


def _rot_z(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rot(rng, max_deg: float) -> np.ndarray:
    """Random rotation: about z by up to ``max_deg``, tilted about x and y by up to a third of it."""
    a, b, c = rng.uniform(-max_deg, max_deg), rng.uniform(-max_deg / 3, max_deg / 3), rng.uniform(-max_deg / 3,
                                                                                                   max_deg / 3)
    ta, tb, tc = np.deg2rad([a, b, c])
    rx = np.array([[1, 0, 0], [0, np.cos(tb), -np.sin(tb)], [0, np.sin(tb), np.cos(tb)]])
    ry = np.array([[np.cos(tc), 0, np.sin(tc)], [0, 1, 0], [-np.sin(tc), 0, np.cos(tc)]])
    return _rot_z(np.rad2deg(ta)) @ rx @ ry


class _Scene:
    """Voxel-centre coordinates (mm, x/y/z about the body centre), bent by a smooth random field."""

    def __init__(self, rng, shape, spacing_zyx, bend_mm: float):
        z, y, x = (np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape)
        sz, sy, sx = spacing_zyx
        self.shape = shape
        self.rng = rng
        grid = [g.astype(np.float32) for g in np.meshgrid(z * sz, y * sy, x * sx, indexing="ij")]
        coarse = (4, 5, 5)
        for g in grid:
            field = rng.normal(0, bend_mm, coarse).astype(np.float32)
            g += ndimage.zoom(field, [n / c for n, c in zip(shape, coarse, strict=True)], order=3, grid_mode=True,
                              mode="nearest")  # fmt: skip
        self.z, self.y, self.x = grid

    def ellipsoid(self, centre, radii, rotation=None) -> np.ndarray:
        """Boolean mask of a (rotated) ellipsoid; centre and radii as (x, y, z) mm."""
        d = [self.x - centre[0], self.y - centre[1], self.z - centre[2]]
        if rotation is not None:  # local = R^T d
            d = [rotation[0, i] * d[0] + rotation[1, i] * d[1] + rotation[2, i] * d[2] for i in range(3)]
        return (d[0] / radii[0]) ** 2 + (d[1] / radii[1]) ** 2 + (d[2] / radii[2]) ** 2 <= 1.0

    def texture(self, sigma_vox: float, amplitude: float) -> np.ndarray:
        t = ndimage.gaussian_filter(self.rng.normal(0, 1, self.shape).astype(np.float32), sigma_vox)
        return t * (amplitude / max(float(t.std()), 1e-6))


#: Portal-venous-phase enhancement (HU ranges) used with ``contrast=True``.
VENOUS_HU = {1: (120, 140), 2: (165, 200), 3: (165, 200), 6: (95, 115), 7: (70, 90), 8: (160, 210), 11: (75, 92)}


def make_phantom_case(seed, contrast: bool = False) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """One case: ``(image int16 HU, label uint8, geometry)``, determined by ``seed``.

    ``contrast=False``: unenhanced, organ intensities overlapping within tens of HU (hard).
    ``contrast=True``: portal-venous enhancement (:data:`VENOUS_HU`), as most abdominal CT is read:
    kidneys and aorta bright, spleen above liver above pancreas; shapes and placement unchanged in kind.
    """
    rng = np.random.default_rng(seed)
    sxy, sz = rng.uniform(2.0, 3.0), rng.uniform(4.0, 6.0)
    fov_xy, fov_y, fov_z = rng.uniform(340, 380), rng.uniform(260, 300), rng.uniform(190, 230)
    shape = (round(fov_z / sz), round(fov_y / sxy), round(fov_xy / sxy))
    s = _Scene(rng, shape, (sz, sxy, sxy), bend_mm=rng.uniform(4.0, 8.0))
    u = rng.uniform

    hu = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    claimed = np.zeros(shape, dtype=bool)

    # body outline, abdominal wall, visceral fat
    bx, by = u(135, 160), u(100, 120)
    taper = 1.0 + 0.08 * (s.z / 100.0)
    body = (s.x / (bx * taper)) ** 2 + ((s.y - 10) / by) ** 2 <= 1
    wall = (s.x / (bx * taper - 18)) ** 2 + ((s.y - 10) / (by - 16)) ** 2 <= 1
    cavity = (s.x / (bx * taper - 26)) ** 2 + ((s.y - 10) / (by - 24)) ** 2 <= 1
    hu[body] = u(-110, -90)
    hu[wall & ~cavity] = u(40, 60)
    hu[cavity] = u(-100, -80)
    organ_hu = {}
    venous = {lab: rng.uniform(*r) for lab, r in VENOUS_HU.items()} if contrast else {}

    def paint(mask, value, lab=0, exclusive=True):
        m = mask & cavity
        if exclusive:
            m &= ~claimed
        hu[m] = value
        if lab:
            label[m] = lab
        if exclusive:
            claimed[m] = True

    # spine and paraspinal muscles (outside the labelled set, bone and muscle-like)
    vy = u(60, 75)
    vert = ((s.x / u(17, 21)) ** 2 + ((s.y - vy) / u(15, 19)) ** 2 <= 1) & body
    hu[vert] = u(250, 350)
    hu[vert & ~(((s.x / 14) ** 2 + ((s.y - vy) / 12) ** 2) <= 1)] = u(600, 800)
    for side in (-1, 1):
        muscle = (((s.x - side * u(38, 46)) / u(22, 28)) ** 2 + ((s.y - vy - u(8, 14)) / u(18, 24)) ** 2 <= 1) & wall
        hu[muscle & ~vert] = u(45, 60)
    claimed |= vert

    jitter = lambda c, r: (c[0] + u(-r, r), c[1] + u(-r, r), c[2] + u(-r, r))  # noqa: E731
    scale = u(0.88, 1.12)
    sc = lambda r: tuple(v * scale * u(0.9, 1.1) for v in r)  # noqa: E731

    # aorta and inferior vena cava: tubes along z in front of the spine
    ax = u(5, 15)
    aorta = ((s.x - ax) / u(10, 13)) ** 2 + ((s.y - vy + u(30, 36)) / u(10, 13)) ** 2 <= 1
    organ_hu[8] = venous.get(8, u(140, 200))
    paint(aorta, organ_hu[8], 8)
    ivc = ((s.x + u(18, 26)) / u(10, 14)) ** 2 + ((s.y - vy + u(28, 36)) / u(8, 11)) ** 2 <= 1
    paint(ivc & (s.z > -s.z.max() * 0.8), u(70, 110))

    # kidneys beside the spine, lower half; bean-like (a medial notch)
    soft = u(40, 55)  # a per-case soft-tissue level: organs scatter around it
    for lab, side in ((2, -1), (3, 1)):
        c = jitter((side * 62, vy - 5, -35 + (10 if side > 0 else 0)), 8)
        r = sc((24, 28, 50))
        kid = s.ellipsoid(c, r, _rot(rng, 15)) & ~s.ellipsoid((c[0] - side * 22, c[1] - 6, c[2]), (12, 10, 22))
        organ_hu[lab] = venous.get(lab, soft + u(-15, 10))
        paint(kid, organ_hu[lab], lab)

    # gallbladder under the liver (painted before the liver so it is not covered)
    gb_c = jitter((-50, -45, -20), 10)
    organ_hu[4] = u(0, 25)
    paint(s.ellipsoid(gb_c, sc((15, 19, 32)), _rot(rng, 25)), organ_hu[4], 4)

    # pancreas: a curved chain from the head (right, by the duodenum) to the tail (by the spleen)
    organ_hu[11] = venous.get(11, soft + u(-10, 5))
    head, tail = np.array(jitter((-25, -5, -20), 8)), np.array(jitter((75, 25, 5), 8))
    bow = u(10, 25)
    for t in np.linspace(0, 1, 9):
        p = head + (tail - head) * t + np.array([0, -bow * np.sin(np.pi * t), 0])
        rad = 13 - 4 * t
        paint(s.ellipsoid(p, (rad * 1.3, rad, rad * 1.2)), organ_hu[11], 11)

    # spleen (posterior left, upper), stomach (anterior left, upper), liver (right, upper)
    organ_hu[1] = venous.get(1, soft + u(-5, 15))
    paint(s.ellipsoid(jitter((95, 45, 35), 10), sc((28, 45, 50)), _rot(rng, 30) @ _rot_z(-35)), organ_hu[1], 1)
    st_c = jitter((45, -35, 35), 10)
    st_r = sc((48, 35, 45))
    stomach = s.ellipsoid(st_c, st_r, _rot(rng, 20))
    organ_hu[7] = venous.get(7, soft + u(-10, 10))
    lumen = s.ellipsoid(st_c, tuple(v * 0.7 for v in st_r))
    gas = lumen & (s.y < st_c[1] - st_r[1] * 0.35)
    st_m = stomach & cavity & ~claimed
    hu[st_m] = organ_hu[7]
    hu[st_m & lumen] = u(5, 25)
    hu[st_m & gas] = u(-800, -600)
    label[st_m] = 7
    claimed |= st_m
    organ_hu[6] = venous.get(6, soft + u(0, 20))
    liver = s.ellipsoid(jitter((-65, 0, 30), 8), sc((80, 75, 70)), _rot(rng, 12))
    liver |= s.ellipsoid(jitter((-10, -30, 55), 8), sc((45, 35, 35)), _rot(rng, 12))  # left lobe
    paint(liver, organ_hu[6], 6)

    # bowel loops: unlabelled organ-density blobs with gas, filling free space in the lower abdomen
    for _ in range(int(rng.integers(10, 18))):
        c = (u(-90, 90), u(-70, 40), u(-110, 10))
        loop = s.ellipsoid(c, (u(12, 25), u(12, 25), u(15, 35)), _rot(rng, 90))
        paint(loop, soft + u(-20, 5))
        paint(s.ellipsoid(c, (u(4, 8), u(4, 8), u(5, 10))) & loop, u(-900, -500), exclusive=False)

    # texture inside soft tissue, then acquisition blur and noise
    tissue = (hu > -300) & (hu < 300)
    hu += np.where(tissue, s.texture(1.0, u(5, 9)), 0).astype(np.float32)
    hu = ndimage.gaussian_filter(hu, (0.4, 0.7, 0.7))
    hu += rng.normal(0, u(10, 18), shape).astype(np.float32)
    image = np.clip(np.round(hu), -1024, 3071).astype(np.int16)

    origin = (-fov_xy / 2 + u(-20, 20), -fov_y / 2 + u(-20, 20), u(-400, -200))
    geometry = Geometry((sxy, sxy, sz), origin, tuple(np.eye(3).ravel()))
    return image, label, geometry


def _write_case(out: Path, folder: str, label_folder: str, name: str, seed, contrast: bool = False) -> str:
    image, label, geometry = make_phantom_case(seed, contrast)
    write_image(image, geometry, out / folder / f"{name}_0000.nii.gz")
    write_image(label, geometry, out / label_folder / f"{name}.nii.gz")
    return name


def make_phantom_dataset(
    out: str | os.PathLike, cases: int = 20, seed: int = 0, test: int = 0, workers: int = 1, contrast: bool = False
) -> Path:
    """Write ``cases`` training cases (+ ``test`` held-out cases in imagesTs/labelsTs) in the v2 layout."""
    if cases < 2:
        raise UserError(f"--cases must be at least 2, got {cases}")
    if test < 0:
        raise UserError(f"--test must be >= 0, got {test}")
    out = Path(out)
    jobs = [(out, "imagesTr", "labelsTr", f"phantom_{i:03d}", (seed, i), contrast) for i in range(cases)]
    jobs += [(out, "imagesTs", "labelsTs", f"phantom_{cases + i:03d}", (seed, cases + i), contrast)
             for i in range(test)]
    parallel_map(_write_case, jobs, workers)
    write_dataset_json(
        out, ["CT"], BTCV_LABELS, cases, ".nii.gz", name="phantom",
        description=f"unetrpp synthetic abdominal CT ({'portal venous' if contrast else 'unenhanced'}), seed "
                    f"{seed}: organs {sorted(PHANTOM_ORGANS.values())} drawn in BTCV numbering, the other BTCV "
                    "classes absent",
    )  # fmt: skip
    write_splits(out, kfold_splits([j[3] for j in jobs[:cases]]))
    return out
