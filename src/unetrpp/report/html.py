"""``unetrpp report``: one self-contained HTML page of evaluations and training runs.

The page needs no server and no network: its CSS, its JavaScript, the charts (inline SVG) and every
case's slices (zlib-compressed bytes in base64, unpacked in the browser by ``DecompressionStream``)
are all inside the one file. Each input becomes a section with the per-region means, a strip plot of
every case's Dice, the training curves (a run folder), the per-case table (click a header to sort)
and, for every case, a slice viewer: reference, prediction and their disagreement over the windowed
image, in axial, coronal or sagittal slices (slider, mouse wheel, arrow keys; A, C, S switch the
orientation), drawn with the aspect ratio of the voxel spacing. Slices are in array order, as
``unetrpp overlay`` draws them (coronal and sagittal with the first axis upwards).

Order: worst case first, by the case's mean Dice over the regions (regions whose Dice is missing left
out). A case with no Dice at all (every region empty in both reference and prediction: nothing to get
wrong) comes last.

Paths: a case's file is looked up as ``FOLDER/CASE`` plus a known ending, where ``CASE`` passed
:func:`~unetrpp.data.layout.safe_case_name` (no folders, no ``..``) and ``FOLDER`` is one the user
gave, the folder the JSON recorded, or the dataset's; a file path recorded in a JSON is never opened
as it stands. Strings from files (case and region names, the log) are HTML-escaped, and the JSON
inside ``<script>`` elements has ``<``, ``>`` and ``&`` escaped, so no name can end a script.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

MAX_CASE_VOXELS = 1 << 18
"""At most this many voxels of each case's volumes (image, reference, prediction: each) go into the page.
A bigger case is subsampled with integer strides, the finest-spaced axes first (a 512 x 512 x 100 CT at
0.8 x 0.8 x 2.5 mm becomes about 34 x 74 x 74), so a browser holds at most 3 x 256 KiB per case shown."""

MAX_CASE_BYTES = 75_000
"""At most this many compressed bytes of slices per case (image, reference and prediction together); the
strides grow until a case fits. In the page they take 4/3 as much (base64), so 50 cases stay under 5 MB
(MSD hippocampus, about 40 x 50 x 35 voxels of noisy MRI, needs 40-74 kB a case at full resolution)."""

EVALUATION_FILE = "evaluation.json"
_CHANNEL0 = "_0000"  # nnU-Net layout: CASE_0000.nii.gz is a case's first channel


@dataclass
class CaseResult:
    """One case's scores, per region (NaN: both masks empty, or no value)."""

    name: str
    dice: dict[str, float]
    hd95: dict[str, float]
    status: dict[str, str]

    @property
    def mean_dice(self) -> float:
        v = [d for d in self.dice.values() if not math.isnan(d)]
        return float(np.mean(v)) if v else math.nan


@dataclass
class ReportSection:
    """One input of the report: an evaluation, or a training run (curves, and its validation if any)."""

    name: str
    kind: str  # "evaluation" or "run"
    path: Path
    note: str  # one line: what was read from where
    regions: dict[str, list[int]] = field(default_factory=dict)
    units: str = ""
    means: dict[str, dict] = field(default_factory=dict)
    mean_dice: float = math.nan
    mean_hd95: float = math.nan
    cases: list[CaseResult] = field(default_factory=list)  # worst first
    files: list[tuple[Path | None, Path, Path]] = field(default_factory=list)  # (image, reference, prediction)
    progress: dict[str, list[float]] = field(default_factory=dict)  # progress.csv's columns
    config: dict = field(default_factory=dict)
    log_tail: list[str] = field(default_factory=list)
    views: list[dict] = field(default_factory=list)  # filled by write_report: the slices of each case


# ----------------------------------------------------------------------------------------------- reading inputs


def load_section(path: str | os.PathLike, references: str | os.PathLike | None = None,
                 images: str | os.PathLike | None = None,
                 predictions: str | os.PathLike | None = None) -> ReportSection:
    """Read one input: an evaluation JSON (or the folder holding ``evaluation.json``), or a run folder.

    ``references``, ``images`` and ``predictions`` are folders for an evaluation's files; without them
    the folders the evaluation recorded or the dataset's (``labelsTs``/``imagesTs`` beside the prediction
    folder) are used. A run's validation uses the recorded folder or its dataset's ``labelsTr``/``imagesTr``.
    Only checks that the files are there; :func:`write_report` reads them.
    """
    p = Path(os.path.abspath(path))  # "." and "evaluation.json" have parents to find the dataset by
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() != ".json":
            raise UserError(f"{p}: give an evaluation JSON, a folder holding {EVALUATION_FILE}, or a run folder")
        return _load_evaluation(p, references, images, predictions)
    if (p / EVALUATION_FILE).is_file():
        return _load_evaluation(p / EVALUATION_FILE, references, images, predictions)
    if (p / "progress.csv").is_file() or (p / "validation" / "summary.json").is_file():
        return _load_run(p)
    raise UserError(f"{p}: neither an evaluation ({EVALUATION_FILE}) nor a run folder (progress.csv or "
                    "validation/summary.json)")


def _number(v, where: str) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where}: {v!r} is not a number")
    return float(v)


def _read_scores(path: Path) -> tuple[dict, list[CaseResult]]:
    """The summary dict and its cases, checked: plain unique case names, numbers where numbers belong."""
    from ..data.layout import safe_case_name
    from ..io import read_json

    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("cases"), list):
        raise UserError(f"{path}: not an evaluation (no 'cases' list)")
    regions = d.get("regions")
    if regions is None:
        first = d["cases"][0].get("regions") if d["cases"] and isinstance(d["cases"][0], dict) else None
        regions = {str(k): [] for k in first} if isinstance(first, dict) else {}
    if not isinstance(regions, dict) or not all(
            isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            for v in regions.values()):
        raise UserError(f"{path}: 'regions' must map region names to lists of label values")
    cases, seen = [], set()
    for i, c in enumerate(d["cases"]):
        if not isinstance(c, dict) or not isinstance(c.get("regions"), dict):
            raise UserError(f"{path}: case {i} has no 'regions' mapping")
        name = safe_case_name(c.get("case"), path)
        if name in seen:
            raise UserError(f"{path}: case {name!r} is listed twice")
        seen.add(name)
        dice, hd95, status = {}, {}, {}
        for region in regions:
            m = c["regions"].get(region, {})
            if not isinstance(m, dict):
                raise UserError(f"{path}: case {name!r}, region {region!r}: not a mapping")
            dice[region] = _number(m.get("dice"), f"{path}: case {name!r}, region {region!r}, dice")
            hd95[region] = _number(m.get("hd95"), f"{path}: case {name!r}, region {region!r}, hd95")
            status[region] = str(m.get("status", ""))
        cases.append(CaseResult(name, dice, hd95, status))
    if not cases:
        raise UserError(f"{path}: no cases")
    d["regions"] = regions
    return d, cases


def worst_first(cases: Sequence[CaseResult]) -> list[CaseResult]:
    """Lowest mean Dice first; cases without any Dice (every region empty in both) last; ties by name."""
    return sorted(cases, key=lambda c: (math.isnan(c.mean_dice), c.mean_dice if not math.isnan(c.mean_dice)
                                        else 0.0, c.name))


def _recorded_folder(summary: dict, key: str, root: Path) -> Path | None:
    """The one folder the JSON's cases recorded under ``key`` (e.g. every reference in labelsTs), if there is
    one and it lies inside ``root`` (the dataset the JSON belongs to): a path read from a file does not lead
    the report elsewhere; a folder outside is given with --references/--predictions."""
    folders = {str(Path(c[key]).parent) for c in summary["cases"] if isinstance(c.get(key), str)}
    if len(folders) != 1:
        return None
    folder = Path(os.path.realpath(folders.pop()))
    return folder if folder.is_relative_to(Path(os.path.realpath(root))) else None


def _case_file(folder: Path, stem: str) -> Path | None:
    for ending in _endings():
        p = folder / (stem + ending)
        if p.parent == folder and p.is_file():
            return p
    return None


def _endings() -> tuple[str, ...]:
    from ..io import FILE_ENDINGS

    return FILE_ENDINGS


def _pick_folder(what: str, given, candidates: list[tuple[Path | None, str]], first: str,
                 channel: bool = False) -> tuple[Path | None, str]:
    """The folder given (it must exist), else the first candidate holding the first case's file."""
    if given is not None:
        folder = Path(given)
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder (the {what})")
        return folder, "given"
    for folder, how in candidates:
        if folder is not None and folder.is_dir() and (
                _case_file(folder, first) or (channel and _case_file(folder, first + _CHANNEL0))):
            return folder, how
    return None, " or ".join(str(f) for f, _ in candidates if f is not None) or "no folder"


def _files(section: ReportSection, source: Path, refs: Path, preds: Path, imgs: Path | None) -> None:
    """Each case's (image, reference, prediction) files, or one line naming the first that is missing."""
    ending = _endings()
    for c in section.cases:
        ref, pred = _case_file(refs, c.name), _case_file(preds, c.name)
        if ref is None:
            raise UserError(f"{refs / (c.name + ending[0])}: no such file (the reference of case {c.name!r} in "
                            f"{source})")
        if pred is None:
            raise UserError(f"{preds / (c.name + ending[0])}: no such file (the prediction of case {c.name!r} in "
                            f"{source})")
        img = None
        if imgs is not None:
            img = _case_file(imgs, c.name + _CHANNEL0) or _case_file(imgs, c.name)
            if img is None:
                raise UserError(f"{imgs / (c.name + _CHANNEL0 + ending[0])}: no such file (the image of case "
                                f"{c.name!r} in {source})")
        section.files.append((img, ref, pred))


def _images_beside(refs: Path) -> Path | None:
    """``imagesTs`` beside ``labelsTs`` (``imagesTr`` beside ``labelsTr``)."""
    if refs.name.startswith("labels"):
        return refs.parent / ("images" + refs.name[len("labels"):])
    return None


def _with_scores(section: ReportSection, path: Path, root: Path, pred_candidates, ref_candidates, references,
                 images, predictions) -> str:
    """Fill ``section`` from the scores at ``path``; returns the note's part on where the files came from."""
    summary, cases = _read_scores(path)
    section.regions = summary["regions"]
    section.units = str(summary.get("units", ""))
    section.means = summary.get("mean") if isinstance(summary.get("mean"), dict) else {}
    section.mean_dice = _number(summary.get("mean_dice"), f"{path}: mean_dice")
    section.mean_hd95 = _number(summary.get("mean_hd95"), f"{path}: mean_hd95")
    section.cases = worst_first(cases)
    first = section.cases[0].name
    preds, how_p = _pick_folder("predictions", predictions,
                                [*pred_candidates, (_recorded_folder(summary, "prediction", root), "recorded")], first)
    if preds is None:
        raise UserError(f"{path}: no prediction file of case {first!r} in {how_p} (give --predictions DIR)")
    refs, how_r = _pick_folder("references", references,
                               [(_recorded_folder(summary, "reference", root), "recorded"), *ref_candidates], first)
    if refs is None:
        raise UserError(f"{path}: no reference file of case {first!r} in {how_r} (give --references DIR)")
    imgs, how_i = _pick_folder("images", images, [(_images_beside(refs), "beside the references")], first,
                               channel=True)
    _files(section, path, refs, preds, imgs)
    where = f"predictions {preds}, references {refs} ({how_r}), "
    where += f"images {imgs} ({how_i})" if imgs else f"no images (none in {how_i}: labels over black; --images DIR)"
    return where


def _section_name(folder: Path) -> str:
    parent = folder.parent
    if parent.name in ("results", "validation") and parent.parent.name:
        parent = parent.parent
    return f"{parent.name}/{folder.name}" if parent.name else folder.name


def _load_evaluation(path: Path, references, images, predictions) -> ReportSection:
    folder = path.parent
    section = ReportSection(name=_section_name(folder), kind="evaluation", path=path, note="")
    root = folder.parent
    where = _with_scores(section, path, root, [(folder, "beside the JSON")],
                         [(root / "labelsTs", "the dataset's"), (root / "labelsTr", "the dataset's")],
                         references, images, predictions)
    section.note = f"{section.name}: {len(section.cases)} case(s) from {path}; {where}"
    return section


def _load_run(folder: Path) -> ReportSection:
    from ..io import read_json

    section = ReportSection(name=_section_name(folder), kind="run", path=folder, note="")
    parts = []
    if (folder / "progress.csv").is_file():
        section.progress = read_progress(folder / "progress.csv")
        parts.append(f"{len(section.progress.get('epoch', []))} epoch(s) from progress.csv")
    if (folder / "train_config.json").is_file():
        cfg = read_json(folder / "train_config.json")
        section.config = cfg if isinstance(cfg, dict) else {}
    if (folder / "log.txt").is_file():
        section.log_tail = (folder / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
    summary = folder / "validation" / "summary.json"
    if summary.is_file():
        root = folder.parent.parent if folder.parent.name == "results" else folder.parent
        where = _with_scores(section, summary, root, [(folder / "validation", "the run's")],
                             [(root / "labelsTr", "the dataset's")], None, None, None)
        parts.append(f"{len(section.cases)} validation case(s); {where}")
    else:
        parts.append("no validation/summary.json")
    section.note = f"{section.name}: run {folder}; " + "; ".join(parts)
    return section


def read_progress(path: str | os.PathLike) -> dict[str, list[float]]:
    """progress.csv as ``{column: values}`` (an empty cell or ``nan`` is NaN); one line naming a bad cell."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    if not rows or not rows[0]:
        raise UserError(f"{path}: empty (no header line)")
    head = [h.strip() for h in rows[0]]
    out: dict[str, list[float]] = {h: [] for h in head}
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(head):
            raise UserError(f"{path}: line {n} has {len(row)} values, the header {len(head)}")
        for h, v in zip(head, row, strict=True):
            try:
                out[h].append(float(v) if v.strip() else math.nan)
            except ValueError:
                raise UserError(f"{path}: line {n}, column {h!r}: {v[:40]!r} is not a number") from None
    return out


# --------------------------------------------------------------------------------------------- slices of a case


def _stride_steps(shape: Sequence[int], spacing: Sequence[float]):
    """Strides from (1, 1, 1) on, one axis one step coarser at a time: the axis whose shown spacing is the finest
    (of those, the longest), so each step at most halves the voxels and the shown voxels stay near-isotropic."""
    strides = [1, 1, 1]
    while True:
        yield tuple(strides)
        open_axes = [a for a in range(3) if strides[a] < shape[a]]
        if not open_axes:
            return
        a = min(open_axes, key=lambda a: (spacing[a] * strides[a], -math.ceil(shape[a] / strides[a])))
        strides[a] += 1


def _labels_u8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def case_view(image_path: Path | None, ref_path: Path, pred_path: Path) -> dict:
    """A case's slices for the page: the windowed image and both label maps (uint8), subsampled to fit
    :data:`MAX_CASE_VOXELS` and :data:`MAX_CASE_BYTES`, zlib-compressed and base64-encoded together."""
    from ..io import read_image
    from ..viz import _window

    ref, geometry = read_image(ref_path)
    if ref.ndim != 3:
        raise UserError(f"{ref_path}: a 3D label map is needed, not shape {ref.shape}")
    pred, _ = read_image(pred_path)
    if pred.shape != ref.shape:
        raise UserError(f"{pred_path}: shape {pred.shape} differs from the reference {ref_path} {ref.shape}")
    image = None
    if image_path is not None:
        image, _ = read_image(image_path)
        image = image[0] if image.ndim == 4 else image
        if image.shape != ref.shape:
            raise UserError(f"{image_path}: shape {image.shape} differs from the reference {ref_path} {ref.shape}")
    spacing = geometry.spacing_zyx
    window, limit = None, MAX_CASE_VOXELS
    for strides in _stride_steps(ref.shape, spacing):
        dims = tuple(len(range(0, n, s)) for n, s in zip(ref.shape, strides, strict=True))
        if math.prod(dims) > limit:
            continue
        view = tuple(slice(None, None, s) for s in strides)
        parts = []
        if image is not None:
            small = image[view].astype(np.float32)
            if window is None:
                window = _window(small)
            lo, hi = window
            parts.append(np.clip(np.rint((small - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8))
        r, p = _labels_u8(ref[view]), _labels_u8(pred[view])
        blob = zlib.compress(b"".join(a.tobytes() for a in (*parts, r, p)), 6)
        if len(blob) <= MAX_CASE_BYTES:
            break
        limit = math.prod(dims) * MAX_CASE_BYTES // len(blob)  # skip the steps that cannot fit at this ratio
    fg = np.argwhere((r > 0) | (p > 0))
    start = fg.mean(0).round().astype(int) if len(fg) else np.array(dims) // 2
    return {
        "dims": list(dims),
        "spacing": [float(s * st) for s, st in zip(spacing, strides, strict=True)],
        "strides": list(strides),
        "shape": list(ref.shape),
        "image": image is not None,
        "labels": sorted({int(v) for v in np.unique(r)} | {int(v) for v in np.unique(p)}),
        "start": [int(v) for v in start],
        "data": base64.b64encode(blob).decode("ascii"),
    }


# ---------------------------------------------------------------------------------------------------- the page


def write_report(inputs: Sequence[str | os.PathLike | ReportSection], out: str | os.PathLike,
                 title: str | None = None, workers: int = 1, references=None, images=None,
                 predictions=None) -> Path:
    """Write the report of ``inputs`` (paths, as :func:`load_section` takes, or loaded sections) to ``out``.

    Every case's volumes are read here (``workers`` processes); the page is written atomically, so
    ``out`` is either the old file or the whole new page. Returns ``out``.
    """
    from ..io import atomic_path
    from ..parallel import parallel_map

    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: the report must be an .html file")
    if not inputs:
        raise UserError("no inputs to report on")
    sections = [s if isinstance(s, ReportSection) else load_section(s, references, images, predictions)
                for s in inputs]
    _unique_names(sections)
    jobs = [f for s in sections for f in s.files]
    views = iter(parallel_map(case_view, jobs, workers))
    for s in sections:
        s.views = [next(views) for _ in s.files]
    page = build_page(sections, title)
    with atomic_path(out, suffix=".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out


def _unique_names(sections: Sequence[ReportSection]) -> None:
    seen: dict[str, int] = {}
    for s in sections:
        n = seen.get(s.name, 0)
        seen[s.name] = n + 1
        if n:
            s.name = f"{s.name} ({n + 1})"


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def script_json(obj) -> str:
    """JSON safe inside ``<script>``: NaN as null, and ``<``, ``>``, ``&`` as \\u escapes (no ``</script>``)."""
    from ..io.jsonio import finite

    text = json.dumps(finite(obj), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fmt(v: float, digits: int) -> str:
    return "–" if v is None or math.isnan(v) else f"{v:.{digits}f}"


def _dv(v: float) -> str:
    """A sort key attribute: the number, or empty (missing: sorted last)."""
    return "" if math.isnan(v) else repr(float(v))


def _dice_bg(v: float) -> str:
    if math.isnan(v):
        return ""
    return f' style="background:hsl({max(0.0, min(1.0, v)) * 120:.0f},70%,84%)"'


_STATUS = {"both_empty": "both empty", "pred_empty": "prediction empty", "gt_empty": "reference empty"}


def build_page(sections: Sequence[ReportSection], title: str | None = None) -> str:
    """The whole HTML page of ``sections`` (their ``views`` filled for the slice viewers)."""
    from .. import __version__

    title = title or "UNETR++ report: " + ", ".join(s.name for s in sections)
    body = [_overview(sections)]
    for i, s in enumerate(sections):
        body.append(_section_html(i, s))
    nav = "".join(f'<a href="#s{i}">{_esc(s.name)}</a>' for i, s in enumerate(sections))
    data = "".join(f'<script type="application/json" id="data-{i}">{script_json(_section_data(s))}</script>\n'
                   for i, s in enumerate(sections))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<link rel="icon" href="data:,">
<style>{_CSS}</style>
</head>
<body>
<header class="top">
<h1>{_esc(title)}</h1>
<nav>{nav}</nav>
<label class="opacity">labels <input type="range" id="opacity" min="0" max="100" value="50"
 aria-label="label opacity"></label>
</header>
<main>
{"".join(body)}
</main>
<footer>Made by unetrpp {_esc(__version__)}. Slices: click a viewer, then the mouse wheel or the arrow keys
move through them, A / C / S switch to axial / coronal / sagittal. Click a table header to sort.</footer>
{data}<script>{_JS}</script>
</body>
</html>
"""


def _overview(sections: Sequence[ReportSection]) -> str:
    rows = []
    for i, s in enumerate(sections):
        epochs = len(s.progress.get("epoch", []))
        rows.append(f'<tr><td data-v="{_esc(s.name)}"><a href="#s{i}">{_esc(s.name)}</a></td>'
                    f'<td data-v="{s.kind}">{s.kind}</td><td data-v="{len(s.cases)}">{len(s.cases)}</td>'
                    f'<td data-v="{_dv(s.mean_dice)}"{_dice_bg(s.mean_dice)}>{_fmt(s.mean_dice, 4)}</td>'
                    f'<td data-v="{_dv(s.mean_hd95)}">{_fmt(s.mean_hd95, 2)}</td>'
                    f'<td data-v="{epochs}">{epochs or "–"}</td></tr>')
    return ('<section class="overview"><h2>Overview</h2><table class="sortable">'
            '<thead><tr><th data-type="text">input</th><th data-type="text">kind</th><th data-type="num">cases</th>'
            '<th data-type="num">mean Dice</th><th data-type="num">mean HD95</th><th data-type="num">epochs</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></section>')


def _section_html(i: int, s: ReportSection) -> str:
    parts = [f'<section class="input" id="s{i}"><h2>{_esc(s.name)} <small>{s.kind}</small></h2>',
             f'<p class="note">{_esc(s.note)}</p>']
    if s.cases:
        parts.append(_cards(s))
        parts.append('<div class="row">' + _region_table(s) + _strip_plot(s) + "</div>")
    if s.progress:
        parts.append(_curves(s))
    if s.cases:
        parts.append(_case_table(i, s))
        parts.append(_viewers(i, s))
    extra = []
    if s.config:
        rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(json.dumps(v))}</td></tr>" for k, v in s.config.items())
        extra.append(f"<details><summary>train_config.json</summary><table class=\"kv\">{rows}</table></details>")
    if s.log_tail:
        extra.append(f"<details><summary>log.txt (last {len(s.log_tail)} lines)</summary>"
                     f"<pre>{_esc(chr(10).join(s.log_tail))}</pre></details>")
    parts.extend(extra)
    parts.append("</section>")
    return "\n".join(parts)


def _cards(s: ReportSection) -> str:
    worst = s.cases[0]
    cards = [("mean Dice", _fmt(s.mean_dice, 4)), ("mean HD95", _fmt(s.mean_hd95, 2)),
             ("cases", str(len(s.cases))), ("worst case", f"{worst.name} ({_fmt(worst.mean_dice, 3)})")]
    if s.progress.get("epoch"):
        ema = [v for v in s.progress.get("ema_dice", []) if not math.isnan(v)]
        if ema:
            cards.append(("best EMA Dice", f"{max(ema):.4f}"))
        el = [v for v in s.progress.get("elapsed_s", []) if not math.isnan(v)]
        if el:
            cards.append(("training time", f"{el[-1] / 60:.1f} min"))
    return '<div class="cards">' + "".join(
        f'<div class="card"><span>{_esc(k)}</span><b>{_esc(v)}</b></div>' for k, v in cards) + "</div>" + (
        f'<p class="units">{_esc(s.units)}</p>' if s.units else "")


def _region_colours(s: ReportSection) -> dict[str, str]:
    """A region of one label takes that label's colour in the viewers; others grey."""
    pal = _palette(s)
    out = {}
    for r, labs in s.regions.items():
        out[r] = "rgb({},{},{})".format(*pal[labs[0]]) if len(labs) == 1 and 0 < labs[0] < len(pal) else "#777"
    return out


def _region_table(s: ReportSection) -> str:
    cols = _region_colours(s)
    rows = []
    for r in s.regions:
        m = s.means.get(r, {}) if isinstance(s.means.get(r), dict) else {}
        dice = _safe_num(m.get("dice"))
        hd = _safe_num(m.get("hd95"))
        rows.append(f'<tr><td data-v="{_esc(r)}"><i class="chip" style="background:{cols[r]}"></i>{_esc(r)}</td>'
                    f'<td data-v="{_esc(" ".join(map(str, s.regions[r])))}">'
                    f'{_esc(", ".join(map(str, s.regions[r])))}</td>'
                    f'<td data-v="{_dv(dice)}"{_dice_bg(dice)}>{_fmt(dice, 4)}</td>'
                    f'<td data-v="{_dv(hd)}">{_fmt(hd, 2)}</td>'
                    + "".join(f'<td data-v="{_esc(m.get(k, ""))}">{_esc(m.get(k, "–"))}</td>'
                              for k in ("cases", "both_empty", "hd95_missing")) + "</tr>")
    return ('<div><h3>Per region</h3><table class="sortable regions"><thead><tr><th data-type="text">region</th>'
            '<th data-type="text">labels</th><th data-type="num">Dice</th><th data-type="num">HD95</th>'
            '<th data-type="num">cases</th><th data-type="num">both empty</th><th data-type="num">no HD95</th>'
            f'</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _safe_num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _strip_plot(s: ReportSection) -> str:
    """Every case's Dice per region as dots on 0..1 (hover: the case), the mean as a bar."""
    regions = list(s.regions)
    w, left, right, row = 520, 120, 16, 30
    h = 34 + row * len(regions)
    cols = _region_colours(s)

    def x(v):
        return left + (w - left - right) * max(0.0, min(1.0, v))

    out = [f'<svg class="strip" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
           'aria-label="Dice of every case per region">']
    for t in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        out.append(f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="8" y2="{h - 22}" class="grid"/>'
                   f'<text x="{x(t):.1f}" y="{h - 8}" class="tick" text-anchor="middle">{t:.1f}</text>')
    rng = np.random.default_rng(0)
    for j, r in enumerate(regions):
        y0 = 8 + row * j + row / 2
        label = r if len(r) <= 16 else r[:15] + "…"
        out.append(f'<text x="{left - 8}" y="{y0 + 4:.1f}" text-anchor="end" class="lab">{_esc(label)}</text>')
        vals = [(c.name, c.dice[r]) for c in s.cases if not math.isnan(c.dice[r])]
        for name, v in vals:
            jy = y0 + rng.uniform(-row * 0.3, row * 0.3)
            out.append(f'<circle cx="{x(v):.1f}" cy="{jy:.1f}" r="3" fill="{cols[r]}" fill-opacity="0.7">'
                       f'<title>{_esc(name)}: {v:.3f}</title></circle>')
        if vals:
            m = float(np.mean([v for _, v in vals]))
            out.append(f'<line x1="{x(m):.1f}" x2="{x(m):.1f}" y1="{y0 - row * 0.42:.1f}" y2="{y0 + row * 0.42:.1f}" '
                       f'class="mean"><title>mean {m:.4f}</title></line>')
    out.append("</svg>")
    return f'<div><h3>Dice of every case</h3>{"".join(out)}</div>'


_SERIES = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#000000", "#f0e442", "#999999")


def _ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], int]:
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= step * m:
            step *= m
            break
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


def line_chart(title: str, x: Sequence[float], series: dict[str, Sequence[float]]) -> str:
    """An inline SVG line chart (NaN breaks a line) with an HTML legend; '' when there is nothing to draw."""
    pts = {k: [(a, b) for a, b in zip(x, v, strict=False)] for k, v in series.items()}
    ys = [b for v in pts.values() for a, b in v if not (math.isnan(a) or math.isnan(b))]
    xs = [a for a in x if not math.isnan(a)]
    if not ys or not xs:
        return ""
    w, h, left, right, top, bottom = 460, 230, 58, 14, 12, 30
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 0.5
    yticks, ydec = _ticks(ylo - pad, yhi + pad)
    xticks, xdec = _ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1, 6)
    y0, y1 = min(yticks[0], ylo - pad), max(yticks[-1], yhi + pad)
    x0, x1 = min(xticks[0], min(xs)), max(xticks[-1], max(xs))

    def px(a):
        return left + (w - left - right) * (a - x0) / (x1 - x0)

    def py(b):
        return top + (h - top - bottom) * (1 - (b - y0) / (y1 - y0))

    out = [f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{_esc(title)}">']
    for t in yticks:
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end" class="tick">{t:.{ydec}f}</text>')
    for t in xticks:
        out.append(f'<text x="{px(t):.1f}" y="{h - 12}" text-anchor="middle" class="tick">{t:.{xdec}f}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 1}" text-anchor="middle" class="tick">epoch</text>')
    legend = []
    for j, (name, v) in enumerate(pts.items()):
        col = _SERIES[j % len(_SERIES)]
        d, pen = [], "M"
        for a, b in v:
            if math.isnan(a) or math.isnan(b):
                pen = "M"
                continue
            d.append(f"{pen}{px(a):.1f},{py(b):.1f}")
            pen = "L"
        if not d:
            continue
        out.append(f'<path d="{" ".join(d)}" fill="none" stroke="{col}" stroke-width="1.8" class="series">'
                   f"<title>{_esc(name)}</title></path>")
        if len(v) <= 60:
            out.extend(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.2" fill="{col}">'
                       f'<title>{_esc(name)} epoch {a:g}: {b:.4g}</title></circle>'
                       for a, b in v if not (math.isnan(a) or math.isnan(b)))
        legend.append(f'<span><i class="chip" style="background:{col}"></i>{_esc(name)}</span>')
    out.append("</svg>")
    return (f'<figure class="chart"><figcaption><b>{_esc(title)}</b> {"".join(legend)}</figcaption>'
            f'{"".join(out)}</figure>')


def _curves(s: ReportSection) -> str:
    p = s.progress
    x = p.get("epoch") or list(range(len(next(iter(p.values()), []))))
    groups = [
        ("Loss", [c for c in ("train_loss", "val_loss") if c in p]),
        ("Validation Dice (pseudo, EMA)", [c for c in ("pseudo_dice", "ema_dice") if c in p]),
        ("Validation Dice per class", [c for c in p if c.startswith("dice_")]),
        ("Learning rate", [c for c in ("lr",) if c in p]),
    ]
    charts = [line_chart(t, x, {c: p[c] for c in cols}) for t, cols in groups if cols]
    charts = [c for c in charts if c]
    return f'<h3>Training</h3><div class="charts">{"".join(charts)}</div>' if charts else ""


def _case_table(i: int, s: ReportSection) -> str:
    unit = "vox" if "voxel" in s.units else "mm"
    head = ['<th data-type="num" aria-sort="ascending">rank</th>', '<th data-type="text">case</th>',
            '<th data-type="num">mean Dice</th>']
    head += [f'<th data-type="num">Dice {_esc(r)}</th>' for r in s.regions]
    head += [f'<th data-type="num">HD95 {_esc(r)} ({unit})</th>' for r in s.regions]
    rows = []
    for j, c in enumerate(s.cases):
        cells = [f'<td data-v="{j + 1}">{j + 1}</td>',
                 f'<td data-v="{_esc(c.name)}"><a href="#v{i}-{j}">{_esc(c.name)}</a></td>',
                 f'<td data-v="{_dv(c.mean_dice)}"{_dice_bg(c.mean_dice)}>{_fmt(c.mean_dice, 4)}</td>']
        for r in s.regions:
            tip = f' title="{_esc(_STATUS.get(c.status[r], c.status[r]))}"' if c.status[r] not in ("", "ok") else ""
            cells.append(f'<td data-v="{_dv(c.dice[r])}"{_dice_bg(c.dice[r])}{tip}>{_fmt(c.dice[r], 4)}</td>')
        for r in s.regions:
            cells.append(f'<td data-v="{_dv(c.hd95[r])}">{_fmt(c.hd95[r], 2)}</td>')
        rows.append(f'<tr data-case="{j}">{"".join(cells)}</tr>')
    return (f'<h3>Cases <small>worst first; click a header to sort, a case to see it</small></h3>'
            f'<div class="scroll"><table class="sortable cases" id="t{i}"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _palette(s: ReportSection) -> list[list[int]]:
    from ..viz import colours

    top = max([1, *(v for labs in s.regions.values() for v in labs),
               *(v for view in s.views for v in view["labels"])])
    return [[round(float(c) * 255) for c in rgb] for rgb in colours(min(top, 255) + 1)]


def _legend(s: ReportSection) -> str:
    pal = _palette(s)
    names = {labs[0]: r for r, labs in s.regions.items() if len(labs) == 1}
    present = sorted({v for view in s.views for v in view["labels"] if v} | set(names))
    chips = [f'<span><i class="chip" style="background:rgb({pal[v][0]},{pal[v][1]},{pal[v][2]})"></i>'
             f'{_esc(names.get(v, f"label {v}"))}</span>' for v in present if 0 < v < len(pal)]
    chips += ['<span class="diffkey">disagreement:</span>',
              '<span><i class="chip" style="background:rgb(255,0,255)"></i>missed (reference only)</span>',
              '<span><i class="chip" style="background:rgb(0,230,0)"></i>extra (prediction only)</span>',
              '<span><i class="chip" style="background:rgb(255,221,0)"></i>another label</span>']
    return f'<p class="legend">{"".join(chips)}</p>'


def _viewers(i: int, s: ReportSection) -> str:
    out = [f"<h3>Slices <small>worst first</small></h3>{_legend(s)}<div class=\"viewers\">"]
    for j, (c, view) in enumerate(zip(s.cases, s.views, strict=True)):
        dice = " · ".join(f"{_esc(r)} {_fmt(c.dice[r], 3)}" for r in s.regions)
        sub = "" if view["strides"] == [1, 1, 1] else (
            f' · shown at 1/{view["strides"][0]} × 1/{view["strides"][1]} × 1/{view["strides"][2]} of '
            f'{view["shape"][0]} × {view["shape"][1]} × {view["shape"][2]}')
        noimg = "" if view["image"] else " · no image"
        out.append(f"""<div class="viewer" id="v{i}-{j}" data-sec="{i}" data-case="{j}" tabindex="0">
<div class="vhead"><b>#{j + 1} {_esc(c.name)}</b> <span{_dice_bg(c.mean_dice)}>mean Dice {_fmt(c.mean_dice, 3)}</span>
<span class="sub">{dice}{sub}{noimg}</span> <a href="#t{i}" class="up">table</a></div>
<div class="vbar"><span class="orient"><button type="button" data-o="0" class="on">Axial</button><button type="button"
 data-o="1">Coronal</button><button type="button" data-o="2">Sagittal</button></span>
<input type="range" class="slice" min="0" max="{view["dims"][0] - 1}" value="{view["start"][0]}"
 aria-label="slice"><output class="idx">axial {view["start"][0] + 1} / {view["dims"][0]}</output></div>
<div class="panes"><figure><canvas class="ref"></canvas><figcaption>reference</figcaption></figure>
<figure><canvas class="pred"></canvas><figcaption>prediction</figcaption></figure>
<figure><canvas class="diff"></canvas><figcaption>disagreement</figcaption></figure></div>
<p class="msg"></p></div>""")
    out.append("</div>")
    return "\n".join(out)


def _section_data(s: ReportSection) -> dict:
    keep = ("dims", "spacing", "image", "start", "data")
    return {"palette": _palette(s), "cases": [{k: v[k] for k in keep} for v in s.views]}


_CSS = """
:root{--fg:#1d232a;--muted:#5f6b78;--line:#d9dee4;--bg:#f6f7f9;--card:#fff;--accent:#0b63b6}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header.top{position:sticky;top:0;z-index:5;display:flex;gap:18px;align-items:center;flex-wrap:wrap;
 padding:8px 20px;background:#13233a;color:#fff;box-shadow:0 1px 4px #0003}
header.top h1{font-size:17px;margin:0;font-weight:600}
header.top nav{display:flex;gap:12px;flex-wrap:wrap}
header.top a{color:#cfe3ff;text-decoration:none}
header.top .opacity{margin-left:auto;font-size:13px}
main{padding:12px 20px 40px;max-width:1500px;margin:0 auto}
section{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 18px 16px;margin:14px 0}
h2{font-size:20px;margin:10px 0 4px}h2 small,h3 small{color:var(--muted);font-weight:400;font-size:13px}
h3{font-size:15px;margin:18px 0 6px}
.note,.units{color:var(--muted);margin:2px 0 8px;overflow-wrap:anywhere}
.cards{display:flex;gap:10px;flex-wrap:wrap;margin:8px 0}
.card{border:1px solid var(--line);border-radius:6px;padding:6px 12px;min-width:120px;background:#fbfcfd}
.card span{display:block;color:var(--muted);font-size:12px}.card b{font-size:18px;font-weight:600}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 9px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child,table.cases td:nth-child(2),table.cases th:nth-child(2){text-align:left}
table.sortable th{cursor:pointer;user-select:none;background:#eef1f5;position:sticky;top:0}
table.sortable th:hover{background:#e1e7ee}
th[aria-sort=ascending]::after{content:" ▲";font-size:10px}th[aria-sort=descending]::after{content:" ▼";font-size:10px}
.scroll{max-height:460px;overflow:auto;border:1px solid var(--line);border-radius:6px}
table.kv th{text-align:left}table.kv td{text-align:left;white-space:normal;overflow-wrap:anywhere}
a{color:var(--accent)}
.chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin:0 5px 0 10px;vertical-align:-1px}
td .chip{margin-left:0}
svg text{font-size:11px;fill:#44505c}svg .grid{stroke:#e3e7ec}svg .mean{stroke:#111;stroke-width:2}
.charts{display:flex;flex-wrap:wrap;gap:14px}
figure.chart{margin:0;border:1px solid var(--line);border-radius:6px;padding:6px}
figure.chart figcaption{font-size:12px;max-width:460px}
.legend{font-size:12px;margin:4px 0 8px}.diffkey{margin-left:18px;color:var(--muted)}
section,.viewer,table{scroll-margin-top:64px}
.viewers{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.viewer{border:1px solid var(--line);border-radius:8px;padding:8px 10px;background:#fbfcfd;outline:none}
.viewer:focus{border-color:var(--accent);box-shadow:0 0 0 2px #0b63b633}
.vhead{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
.vhead span{padding:0 4px;border-radius:3px}.vhead .sub{color:var(--muted);font-size:12px}.vhead .up{margin-left:auto}
.vbar{display:flex;gap:10px;align-items:center;margin:6px 0}
.vbar input{flex:1}.vbar output{min-width:110px;font-variant-numeric:tabular-nums;color:var(--muted)}
.orient button{border:1px solid var(--line);background:#fff;padding:2px 8px;cursor:pointer;font:inherit}
.orient button:first-child{border-radius:4px 0 0 4px}.orient button:last-child{border-radius:0 4px 4px 0}
.orient button.on{background:var(--accent);color:#fff;border-color:var(--accent)}
.panes{display:grid;grid-template-columns:repeat(3,1fr);gap:6px;align-items:end}
.panes figure{margin:0;text-align:center}
.panes canvas{--r:1;width:min(100%,calc(var(--r)*300px));aspect-ratio:var(--r);height:auto;
 image-rendering:pixelated;background:#000;display:block;margin:0 auto;border-radius:3px}
.panes figcaption{font-size:12px;color:var(--muted)}
.msg{color:#b00020;margin:0;font-size:12px}
pre{background:#f1f3f6;padding:8px;overflow:auto;max-height:360px;font-size:12px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:0 20px 30px}
"""

_JS = r"""
(() => {
'use strict';
const NAMES = ['axial', 'coronal', 'sagittal'];
const DIFF = {missed: [255, 0, 255], extra: [0, 230, 0], other: [255, 221, 0]};
let alpha = 0.5;
const viewers = [];

function bytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

async function inflate(b64) {
  if (typeof DecompressionStream === 'undefined') throw new Error('this browser has no DecompressionStream');
  const stream = new Blob([bytes(b64)]).stream().pipeThrough(new DecompressionStream('deflate'));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

class Viewer {
  constructor(el, c, palette) {
    this.el = el; this.c = c; this.palette = palette; this.o = 0;
    this.idx = c.start.slice(); this.ready = false; this.loading = null;
    this.slider = el.querySelector('input.slice');
    this.out = el.querySelector('output.idx');
    this.canvases = ['ref', 'pred', 'diff'].map(k => el.querySelector('canvas.' + k));
    this.buttons = Array.from(el.querySelectorAll('.orient button'));
    this.slider.addEventListener('input', () => this.set(+this.slider.value));
    this.buttons.forEach(b => b.addEventListener('click', () => this.orient(+b.dataset.o)));
    el.querySelector('.panes').addEventListener('wheel', e => {
      e.preventDefault();
      this.set(this.idx[this.o] + (e.deltaY > 0 ? 1 : -1));
    }, {passive: false});
    el.addEventListener('pointerdown', e => { if (e.target.tagName === 'CANVAS') el.focus({preventScroll: true}); });
    el.addEventListener('keydown', e => this.key(e));
    this.shape();
  }
  count(o) { const [nz, ny, nx] = this.c.dims; return [nz, ny, nx][o]; }
  key(e) {
    const k = e.key, i = this.idx[this.o];
    const moves = {ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10, PageDown: -10};
    if (e.target === this.slider && k.length > 1) return;  // the slider moves itself (arrows, page, home, end)
    if (k in moves) this.set(i + moves[k]);
    else if (k === 'Home') this.set(0);
    else if (k === 'End') this.set(this.count(this.o) - 1);
    else if ('acs'.includes(k.toLowerCase()) && k.length === 1 && !e.ctrlKey && !e.metaKey) {
      this.orient('acs'.indexOf(k.toLowerCase()));
    } else return;
    e.preventDefault();
  }
  orient(o) {
    this.o = o;
    this.buttons.forEach(b => b.classList.toggle('on', +b.dataset.o === o));
    this.shape();
    this.set(this.idx[o]);
  }
  shape() {
    const [nz, ny, nx] = this.c.dims, [sz, sy, sx] = this.c.spacing;
    const [w, h, pw, ph] = [[nx, ny, sx, sy], [nx, nz, sx, sz], [ny, nz, sy, sz]][this.o];
    const ratio = (w * pw) / (h * ph);
    for (const cv of this.canvases) {
      cv.width = w; cv.height = h;
      cv.style.setProperty('--r', ratio.toFixed(4));
    }
    this.slider.max = this.count(this.o) - 1;
  }
  set(k) {
    k = Math.max(0, Math.min(this.count(this.o) - 1, Math.round(k)));
    this.idx[this.o] = k;
    this.slider.value = k;
    this.out.value = NAMES[this.o] + ' ' + (k + 1) + ' / ' + this.count(this.o);
    if (this.ready) this.draw(); else this.load();
  }
  load() {
    if (!this.loading) {
      this.loading = inflate(this.c.data).then(buf => {
        const n = this.c.dims[0] * this.c.dims[1] * this.c.dims[2];
        let at = 0;
        this.img = this.c.image ? buf.subarray(0, (at = n)) : null;
        this.ref = buf.subarray(at, at + n); this.pred = buf.subarray(at + n, at + 2 * n);
        if (this.pred.length !== n) throw new Error('slice data of the wrong size');
        this.ready = true; this.el.dataset.ready = '1';
        this.draw();
      }).catch(err => { this.el.querySelector('.msg').textContent = 'cannot show the slices: ' + err.message; });
    }
    return this.loading;
  }
  draw() {
    const [nz, ny, nx] = this.c.dims, k = this.idx[this.o], o = this.o;
    const w = this.canvases[0].width, h = this.canvases[0].height;
    const outs = this.canvases.map(cv => cv.getContext('2d').createImageData(w, h));
    const pal = this.palette, a = alpha, img = this.img, ref = this.ref, pred = this.pred;
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        let v;
        if (o === 0) v = (k * ny + r) * nx + c;
        else if (o === 1) v = ((nz - 1 - r) * ny + k) * nx + c;
        else v = ((nz - 1 - r) * ny + c) * nx + k;
        const g = img ? img[v] : 24, lr = ref[v], lp = pred[v], p = 4 * (r * w + c);
        const layers = [lr ? pal[Math.min(lr, pal.length - 1)] : null, lp ? pal[Math.min(lp, pal.length - 1)] : null,
          lr === lp ? null : (lp === 0 ? DIFF.missed : (lr === 0 ? DIFF.extra : DIFF.other))];
        for (let j = 0; j < 3; j++) {
          const d = outs[j].data, col = layers[j];
          if (col) {
            d[p] = g * (1 - a) + col[0] * a; d[p + 1] = g * (1 - a) + col[1] * a; d[p + 2] = g * (1 - a) + col[2] * a;
          } else { d[p] = d[p + 1] = d[p + 2] = g; }
          d[p + 3] = 255;
        }
      }
    }
    this.canvases.forEach((cv, j) => cv.getContext('2d').putImageData(outs[j], 0, 0));
  }
}

document.querySelectorAll('script[type="application/json"][id^="data-"]').forEach(node => {
  const sec = node.id.slice(5), data = JSON.parse(node.textContent);
  data.cases.forEach((c, j) => {
    const el = document.getElementById('v' + sec + '-' + j);
    if (el) viewers.push(new Viewer(el, c, data.palette));
  });
});
if ('IntersectionObserver' in window) {
  const seen = new IntersectionObserver(entries => entries.forEach(e => {
    if (e.isIntersecting) { const v = e.target._viewer; seen.unobserve(e.target); v.set(v.idx[v.o]); }
  }), {rootMargin: '400px'});
  viewers.forEach(v => { v.el._viewer = v; seen.observe(v.el); });
} else viewers.forEach(v => v.load());
document.getElementById('opacity').addEventListener('input', e => {
  alpha = e.target.value / 100;
  viewers.forEach(v => { if (v.ready) v.draw(); });
});

function sortBy(table, col, th) {
  const dir = th.getAttribute('aria-sort') === 'ascending' ? -1 : 1;
  table.querySelectorAll('thead th').forEach(t => t.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
  const num = th.dataset.type === 'num', body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((p, q) => {
    const x = p.cells[col].dataset.v, y = q.cells[col].dataset.v;
    if (x === '' || y === '') return (x === '') - (y === '');  // missing values last either way
    return dir * (num ? (+x) - (+y) : x.localeCompare(y, undefined, {numeric: true}));
  });
  rows.forEach(r => body.appendChild(r));
}
document.querySelectorAll('table.sortable').forEach(table => {
  table.querySelectorAll('thead th').forEach((th, col) => {
    th.tabIndex = 0;
    th.addEventListener('click', () => sortBy(table, col, th));
    th.addEventListener('keydown', e => { if (e.key === 'Enter') sortBy(table, col, th); });
  });
});
window.unetrppViewers = viewers;
})();
"""
