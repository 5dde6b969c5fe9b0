"""Overlay pictures: three orthogonal slices through a label map's centre, with a legend by class name."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import UserError
from .io.jsonio import atomic_write


def _window(image: np.ndarray) -> tuple[float, float]:
    """CT in Hounsfield units: an abdominal window (-160, 240); anything else: 1st-99th percentile."""
    lo, hi = np.percentile(image, [1, 99])
    if image.min() < -500 and hi > 0:
        return -160.0, 240.0
    return float(lo), float(hi if hi > lo else lo + 1)


#: tab20 entries in label order: the nine saturated colours, then their light shades; the two greys
#: (14, 15) are left out, they vanish on CT.
_TAB20_ORDER = (0, 2, 4, 6, 8, 10, 12, 16, 18, 1, 3, 5, 7, 9, 11, 13, 17, 19)


def colours(n: int) -> np.ndarray:
    """RGB colours for labels 1..n-1 (row 0 unused), distinct for the first 18 and never grey."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return np.array([(0, 0, 0)] + [cmap.colors[_TAB20_ORDER[i % len(_TAB20_ORDER)]] for i in range(n - 1)])


def overlay_png(
    image: np.ndarray,
    label: np.ndarray,
    spacing_zyx: Sequence[float],
    class_names: dict[int, str] | None = None,
    title: str | None = None,
    alpha: float = 0.45,
) -> bytes:
    """PNG bytes of axial, coronal and sagittal slices through the label's centre of mass (volume centre if empty)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if image.shape != label.shape:
        raise UserError(f"image shape {image.shape} differs from label shape {label.shape}")
    fg = np.argwhere(label > 0)
    centre = fg.mean(0).round().astype(int) if len(fg) else np.array(image.shape) // 2
    lo, hi = _window(image)
    present = [int(v) for v in np.unique(label) if v != 0]
    cols = colours(max([*present, 1]) + 1)
    sz, sy, sx = spacing_zyx
    views = [  # (image slice, label slice, aspect = row spacing / column spacing, name)
        (image[centre[0]], label[centre[0]], sy / sx, f"axial z={centre[0]}"),
        (image[:, centre[1]][::-1], label[:, centre[1]][::-1], sz / sx, f"coronal y={centre[1]}"),
        (image[:, :, centre[2]][::-1], label[:, :, centre[2]][::-1], sz / sy, f"sagittal x={centre[2]}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 5), constrained_layout=True)
    for ax, (img, lab, aspect, name) in zip(axes, views, strict=True):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        rgba = np.zeros((*lab.shape, 4))
        mask = lab > 0
        rgba[mask, :3] = cols[np.clip(lab[mask], 0, len(cols) - 1)]
        rgba[mask, 3] = alpha
        ax.imshow(rgba, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    names = class_names or {}
    handles = [Patch(color=cols[v], label=names.get(v, f"label {v}")) for v in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=9,
                   bbox_to_anchor=(0.5, -0.02))
    if title:
        fig.suptitle(title)
    return figure_png(fig, dpi=90, bbox_inches="tight")


def figure_png(fig, **savefig_kwargs) -> bytes:
    """PNG bytes of a matplotlib figure, which is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    plt.close(fig)
    return buf.getvalue()


def write_overlay(image: np.ndarray, label: np.ndarray, spacing_zyx: Sequence[float], out: str | os.PathLike,
                  class_names: dict[int, str] | None = None, title: str | None = None) -> Path:
    data = overlay_png(image, label, spacing_zyx, class_names, title)
    return atomic_write(Path(out), lambda f: f.write(data))
