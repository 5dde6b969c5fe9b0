"""What ``unetrpp bench`` prints after its per-figure lines, and the EPA scaling plot."""

from __future__ import annotations

import os


def plot_epa(epa: dict, out: str | os.PathLike) -> None:
    """Time against N (log-log) for EPA and MHSA at each C, exponents in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.jsonio import atomic_write
    from ..viz import figure_png

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dims = sorted({r["dim"] for r in epa["rows"]})
    colours = plt.get_cmap("viridis")([i / max(len(dims) - 1, 1) for i in range(len(dims))])
    for colour, dim in zip(colours, dims, strict=True):
        for kind, style in (("epa", "-o"), ("mhsa", "--s")):
            pts = [(r["tokens"], r["median_s"]) for r in epa["rows"] if r["kind"] == kind and r["dim"] == dim]
            if pts:
                e = epa["exponents"].get(f"{kind}_C{dim}")
                label = f"{kind.upper()} C={dim}" + (f" (N^{e:.2f})" if e is not None else "")
                ax.plot(*zip(*pts, strict=True), style, color=colour, label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("forward time (s)")
    ax.set_title("EPA vs multi-head self-attention (SDPA), batch 1")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    data = figure_png(fig, dpi=120, bbox_inches="tight")
    atomic_write(out, lambda f: f.write(data))


def print_summary(record: dict) -> None:
    """The machine, the forward rate against its conv3d rate, and our sliding window's time over MONAI's."""
    m = record["machine"]
    print(f"machine: {m['cpu']} ({m['cpu_count']} CPUs){', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}, "
          f"{m['threads']} threads; {m['date']}")
    res = record["results"]
    if "forward" in res and "rates" in res:
        conv = res["rates"].get("conv3d_16ch_64x128x128_gmacs_per_s")
        if conv:
            print(f"forward rate {res['forward']['gmacs_per_s']:.1f} G MAC/s = "
                  f"{100 * res['forward']['gmacs_per_s'] / conv:.0f} % of this machine's conv3d rate ({conv:.1f})")
    if "sliding" in res:
        by = {(r["impl"], r["tta"]): r["wall_s"] for r in res["sliding"]}
        for t in (False, True):
            if ("unetrpp", t) in by and ("monai", t) in by:
                print(f"sliding window, TTA {'on' if t else 'off'}: unetrpp / MONAI time = "
                      f"{by[('unetrpp', t)] / by[('monai', t)]:.2f}")
