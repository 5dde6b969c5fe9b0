"""``progress.png``: loss and pseudo-Dice curves of a run (matplotlib, no display needed)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..io.jsonio import atomic_write
from ..viz import figure_png


def plot_progress(history: list[dict], path: str | os.PathLike) -> Path:
    """Two panels against the epoch: train/validation loss; pseudo-Dice, its EMA and each class (thin)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def column(key: str) -> list:  # a checkpoint resumed from may hold rows without some column
        return [h.get(key, math.nan) for h in history]

    epochs = [h.get("epoch", i) for i, h in enumerate(history)]
    fig, (ax_l, ax_d) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_l.plot(epochs, column("train_loss"), label="train loss", color="tab:blue")
    ax_l.plot(epochs, column("val_loss"), label="validation loss", color="tab:red")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("Dice + CE loss (deep supervision)")
    ax_l.legend()
    ax_l.grid(alpha=0.3)
    for key in history[0]:
        if key.startswith("dice_"):
            values = column(key)
            if not all(isinstance(v, float) and math.isnan(v) for v in values):
                ax_d.plot(epochs, values, lw=0.7, alpha=0.5, label=key[5:])
    ax_d.plot(epochs, column("pseudo_dice"), color="black", lw=1.5, label="mean")
    ax_d.plot(epochs, column("ema_dice"), color="tab:green", lw=2, label="EMA (best checkpoint)")
    ax_d.set_xlabel("epoch")
    ax_d.set_ylabel("pseudo-Dice (validation patches)")
    ax_d.set_ylim(0, 1)
    ax_d.grid(alpha=0.3)
    ax_d.legend(fontsize=7, ncol=2, loc="lower right")
    buf = figure_png(fig, dpi=100)
    return atomic_write(Path(path), lambda f: f.write(buf))
