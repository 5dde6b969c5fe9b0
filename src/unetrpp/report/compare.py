"""``unetrpp compare``: the paper-style table of several training runs, as Markdown, CSV and a PNG.

One row per run folder, in the order given: the network's parameters and multiply-adds at the
run's patch (batch 1, :func:`~unetrpp.network.analysis.count_macs`), one training step's time and
peak memory on this device (measured in a process of its own, :func:`measure_in_child`), Dice and
HD95 per region with their source, and the training's epochs, steps and wall time::

    rows = compare_runs(["results/unetrpp_fold0", "results/nnunet_fold0"],
                        evaluations={"results/unetrpp_fold0": "pred/evaluation.json"})
    write_comparison(rows, "comparison/")   # comparison.md, comparison.csv, comparison.png

What each figure is read from:

* accuracy: the run's ``validation/summary.json`` (the trainer's final validation), or an evaluation
  given for the run (``PRED_DIR/evaluation.json`` of ``unetrpp evaluate``); each row names its source.
  Runs scored on different regions share a table: the columns are the union, blank where a run was
  not scored. HD95 in millimetres and in voxels (``--compat official``) do not share a table.
* epochs, steps and wall time: the checkpoint's training state (``elapsed``: seconds of training,
  resumed runs included; ``history``: iterations per epoch), else ``progress.csv``, else the
  ``training done`` line of ``log.txt``.
* network: :func:`unetrpp.checkpoint.build_model` of the run's checkpoint (``checkpoint_final.pt``,
  else ``_best``, else ``_latest``). A run whose network does not build (a hand-made or legacy
  checkpoint, an architecture whose library is missing) keeps its row, with those columns blank
  and one line saying why.

Problems with the files given (no checkpoint, malformed JSON, a NaN, negative or boolean figure in
a summary, a run given twice) are one-line :class:`~unetrpp.errors.UserError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io.atomic import atomic_path

CHECKPOINT_NAMES = ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_latest.pt")
NOT_MEASURED = "not measured"
#: a spread of MACs (largest / smallest) beyond which the plot's x axis is logarithmic
LOG_SPREAD = 10.0


@dataclass
class Accuracy:
    """Per-region mean Dice and HD95 of one evaluation (``None``: not scored, e.g. every case empty)."""

    source: str  # "validation" (the run's final validation) or "evaluation" (given for the run)
    file: str
    regions: dict[str, list[int] | None]  # name -> labels (None: the file does not say)
    dice: dict[str, float | None]
    hd95: dict[str, float | None]
    mean_dice: float | None
    mean_hd95: float | None
    hd95_unit: str = "mm"  # "mm", or "voxels" for evaluations in the official scripts' definitions
    cases: int | None = None
    protocol: str | None = None


@dataclass
class RunSummary:
    """One row of the comparison table (``None``: not known; see ``notes``)."""

    label: str  # "ARCH FOLDER"
    arch: str
    run: str
    checkpoint: str
    params: int | None = None
    macs: int | None = None  # multiply-adds of one forward pass at ``patch``, batch 1
    patch: list[int] | None = None
    batch: int | None = None  # the run's training batch, at which the step is measured
    #: "measured"; "not measured" (not asked: --no-measure); "failed" (asked, but no network or the child failed)
    step_status: str = NOT_MEASURED
    device: str | None = None  # where the step was measured, and with which mixed precision
    amp: str | None = None
    step_s: float | None = None
    forward_s: float | None = None
    peak_memory_mb: float | None = None  # the measuring process's peak (RSS on CPU, allocated on CUDA)
    accuracy: Accuracy | None = None
    epochs: int | None = None
    steps: int | None = None
    wall_s: float | None = None
    wall_source: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def measured(self) -> bool:
        return self.step_status == "measured"

    @property
    def mean_dice(self) -> float | None:
        return self.accuracy.mean_dice if self.accuracy else None

    @property
    def mean_hd95(self) -> float | None:
        return self.accuracy.mean_hd95 if self.accuracy else None


# ---------------------------------------------------------------------------------------------- reading
def find_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint of a run folder: final, else best, else latest."""
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such run folder")
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder (give the folder that holds {CHECKPOINT_NAMES[0]})")
    for name in CHECKPOINT_NAMES:
        if (run / name).is_file():
            return run / name
    raise UserError(f"{run}: no checkpoint ({', '.join(CHECKPOINT_NAMES)}); not a training run folder?")


def _figure(value, where: str, path, upper: float | None = None) -> float | None:
    """A figure of a summary: a finite number >= 0 (<= ``upper``) or null; anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{path}: {where} must be a number or null, got {json.dumps(value)[:60]}")
    if not math.isfinite(value):
        raise UserError(f"{path}: {where} is {value} (write null for a missing value)")
    if value < 0 or (upper is not None and value > upper):
        bound = f"between 0 and {upper:g}" if upper is not None else ">= 0"
        raise UserError(f"{path}: {where} must be {bound}, got {value}")
    return float(value)


def read_accuracy(path: str | os.PathLike, source: str = "evaluation") -> Accuracy:
    """Per-region means of an evaluation summary (``validation/summary.json`` or ``unetrpp evaluate``'s
    ``evaluation.json``; a folder means its ``evaluation.json``), checked: one-line errors naming the file."""
    from ..io.jsonio import read_json

    path = Path(path)
    if path.is_dir():
        path = path / "evaluation.json"
    if not path.is_file():
        raise UserError(f"{path}: no such evaluation file")
    d = read_json(path)
    mean = d.get("mean") if isinstance(d, dict) else None
    if not isinstance(mean, dict) or not mean:
        raise UserError(f"{path}: not an evaluation summary (no per-region means under \"mean\")")
    regions_in = d.get("regions")
    if regions_in is not None and not (isinstance(regions_in, dict) and all(
            isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
            for v in regions_in.values())):
        raise UserError(f"{path}: \"regions\" must map region names to lists of labels")
    regions: dict[str, list[int] | None] = {}
    dice: dict[str, float | None] = {}
    hd95: dict[str, float | None] = {}
    for name, m in mean.items():
        if not isinstance(m, dict):
            raise UserError(f"{path}: mean.{name} must be an object of metrics, got {json.dumps(m)[:60]}")
        regions[name] = list(regions_in[name]) if regions_in and name in regions_in else None
        dice[name] = _figure(m.get("dice"), f"mean.{name}.dice", path, upper=1.0)
        hd95[name] = _figure(m.get("hd95"), f"mean.{name}.hd95", path)
    mean_dice = _figure(d["mean_dice"], "mean_dice", path, upper=1.0) if "mean_dice" in d \
        else _nanmean(dice.values())
    mean_hd95 = _figure(d["mean_hd95"], "mean_hd95", path) if "mean_hd95" in d else _nanmean(hd95.values())
    cases = d.get("cases")
    n_cases = len(cases) if isinstance(cases, list) else None
    if source == "validation" and isinstance(d.get("cases_validated"), int):
        n_cases = d["cases_validated"]
    protocol = d.get("protocol") if isinstance(d.get("protocol"), str) else None
    unit = "voxels" if d.get("compat") == "official" else "mm"
    return Accuracy(source, str(path), regions, dice, hd95, mean_dice, mean_hd95, unit, n_cases, protocol)


def _nanmean(values) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _int(text: str, where: str, path) -> int:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {where} is not a number ({text!r:.40})") from None
    if not math.isfinite(v) or v < 0 or v != int(v):
        raise UserError(f"{path}: {where} must be a whole number >= 0, got {text!r:.40}")
    return int(v)


def read_progress(path: str | os.PathLike) -> tuple[int, int | None, float | None]:
    """``progress.csv``: (epochs, steps, training seconds), from its ``iterations`` and ``elapsed_s`` columns."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: not a progress table ({e})") from None
    steps = sum(_int(r.get("iterations"), f"row {i + 2} iterations", path) for i, r in enumerate(rows)) \
        if rows and "iterations" in rows[0] else None
    elapsed = None
    if rows and rows[-1].get("elapsed_s") not in (None, ""):
        try:
            elapsed = float(rows[-1]["elapsed_s"])
        except ValueError:
            raise UserError(f"{path}: row {len(rows) + 1} elapsed_s is not a number") from None
        if not math.isfinite(elapsed) or elapsed < 0:
            raise UserError(f"{path}: row {len(rows) + 1} elapsed_s must be a number >= 0, got {elapsed}")
    return len(rows), steps, elapsed


_DONE = re.compile(r"training done: (\d+) epoch\(s\), ([0-9.]+) min")


def _training_record(run: Path, ckpt) -> tuple[int | None, int | None, float | None, str | None]:
    """(epochs, steps, wall seconds, where the wall time came from)."""
    t = ckpt.training
    epochs = steps = wall = None
    source = None
    if t is not None:
        epochs = t.epoch
        if t.history:
            steps = sum(int(row.get("iterations", 0)) for row in t.history) + (t.iteration or 0)
            epochs = epochs if epochs is not None else len(t.history)
        if t.elapsed is not None:
            wall, source = float(t.elapsed), "checkpoint"
    if (steps is None or wall is None) and (run / "progress.csv").is_file():
        n, s, e = read_progress(run / "progress.csv")
        epochs = epochs if epochs is not None else n
        steps = steps if steps is not None else s
        if wall is None and e is not None:
            wall, source = e, "progress.csv"
    if (wall is None or epochs is None) and (run / "log.txt").is_file():
        found = _DONE.findall((run / "log.txt").read_text(encoding="utf-8", errors="replace"))
        if found:
            epochs = epochs if epochs is not None else int(found[-1][0])
            if wall is None:
                wall, source = float(found[-1][1]) * 60, "log.txt"
    return epochs, steps, wall, source


def _train_batch(run: Path, ckpt) -> int:
    """The run's training batch: the train config's, else the plans' (the trainer's rule), else 2."""
    from ..io.jsonio import read_json

    tc = ckpt.training.train_config if ckpt.training and ckpt.training.train_config else None
    if tc is None and (run / "train_config.json").is_file():
        tc = read_json(run / "train_config.json")
        if not isinstance(tc, dict):
            raise UserError(f"{run / 'train_config.json'}: not a training configuration (a JSON object)")
    for value in ((tc or {}).get("batch_size"), ckpt.plans.get("batch_size")):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 2


def _first_line(e: BaseException, source: str) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[len(source) + 2:] if text.startswith(source + ": ") else text


# ------------------------------------------------------------------------------------------ measuring
def measure_in_child(model_config: dict, batch: int, device: str, amp: str) -> dict:
    """One training step of ``model_config`` (:func:`~unetrpp.training.budget.measure_step`) in a process of
    its own: ``{"step_s", "forward_s", "peak_memory_mb"}``, the peak being that process's. A failure raises
    :class:`~unetrpp.bench.harness.ChildError` (one line)."""
    from ..bench.harness import run_child

    spec = json.dumps({"model_config": model_config, "batch": batch, "device": str(device), "amp": amp})
    code = "import sys; from unetrpp.report.compare import measure_child_main; measure_child_main(sys.argv[1])"
    return run_child([sys.executable, "-c", code, spec], "the step measurement")


def measure_child_main(spec_json: str) -> None:
    """The measuring process: configured as ``unetrpp train`` configures itself, then one ``RESULT`` line."""
    import torch

    from ..bench.harness import emit_result
    from ..runtime import peak_memory_mb, tune_cpu_allocator
    from ..training.budget import measure_step

    spec = json.loads(spec_json)
    tune_cpu_allocator()
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.backends.cudnn.benchmark = True
    step_s, forward_s = measure_step(spec["model_config"], int(spec["batch"]), device, spec["amp"])
    emit_result({"step_s": step_s, "forward_s": forward_s, "peak_memory_mb": peak_memory_mb(device)})


# ------------------------------------------------------------------------------------------ collecting
def collect_run(path: str | os.PathLike, evaluation: str | os.PathLike | None = None, measure: bool = False,
                device: str = "cpu", amp: str = "off", batch: int | None = None,
                log: Callable[[str], None] | None = None) -> RunSummary:
    """One row: a run folder's network, cost, accuracy (its validation, or ``evaluation``) and training record.

    ``measure``: time one training step at the run's patch and batch (or ``batch``) on ``device`` in a child
    process. Problems with the files are :class:`UserError`; a network that does not build, or a step that
    cannot be measured, leaves those columns blank with a note (also passed to ``log``).
    """
    run = Path(path)
    ckpt_path = find_checkpoint(run)
    row = _read_run(run, ckpt_path, _run_accuracy(run, evaluation), measure, batch, log)
    _add_cost(row, measure, device, amp, log)
    return row


def _run_accuracy(run: Path, evaluation) -> Accuracy | None:
    if evaluation is not None:
        return read_accuracy(evaluation, "evaluation")
    summary = run / "validation" / "summary.json"
    return read_accuracy(summary, "validation") if summary.exists() else None


def _note(row: RunSummary, text: str, log: Callable[[str], None] | None) -> None:
    row.notes.append(text)
    if log:
        log(f"{row.run}: {text}")


def _read_run(run: Path, ckpt_path: Path, accuracy: Accuracy | None, measure: bool, batch: int | None,
              log: Callable[[str], None] | None) -> RunSummary:
    """A row's records (checkpoint checked, training record, accuracy), before any network is built."""
    from ..checkpoint import Checkpoint

    ckpt = Checkpoint.load(ckpt_path)
    arch = ckpt.network.get("arch", "unetrpp")
    arch = arch if isinstance(arch, str) and arch else "unetrpp"
    row = RunSummary(label=f"{arch} {run.name}", arch=arch, run=str(run), checkpoint=str(ckpt_path),
                     accuracy=accuracy)
    img = ckpt.network.get("img_size")
    if isinstance(img, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in img):
        row.patch = list(img)
    row.batch = batch or _train_batch(run, ckpt)
    row.step_status = "failed" if measure else NOT_MEASURED
    row.epochs, row.steps, row.wall_s, row.wall_source = _training_record(run, ckpt)
    if accuracy is None:
        _note(row, "no accuracy: no validation/summary.json (the run skipped its final validation; give "
                   "--evaluation RUN=PRED_DIR/evaluation.json)", log)
    return row


def _add_cost(row: RunSummary, measure: bool, device: str, amp: str, log: Callable[[str], None] | None) -> None:
    """Parameters and MACs of the row's network, and (``measure``) its training step in a child process."""
    from ..checkpoint import Checkpoint, build_model

    ckpt = Checkpoint.load(row.checkpoint)
    try:
        model = build_model(ckpt)
    except (ValueError, TypeError, KeyError, RuntimeError, ImportError) as e:
        blank = "parameters, MACs and step" if measure else "parameters and MACs"
        _note(row, f"network not built ({_first_line(e, row.checkpoint)}); {blank} left blank", log)
        return
    from ..network.analysis import count_macs

    row.params = sum(p.numel() for p in model.parameters())
    try:
        row.macs = int(count_macs(model)[0])
    except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
        _note(row, f"multiply-adds not counted ({_first_line(e, row.checkpoint)})", log)
    del model
    network = dict(ckpt.network)
    del ckpt
    if not measure:
        return
    if log:
        log(f"{row.run}: measuring one training step (batch {row.batch}, patch "
            f"{'x'.join(map(str, row.patch or []))}) on {device} in a process of its own")
    try:
        res = measure_in_child(network, row.batch, device, amp)
    except RuntimeError as e:  # ChildError: its one line
        _note(row, f"step not measured ({_first_line(e, '')})", log)
        return
    row.step_status, row.device, row.amp = "measured", str(device), amp
    row.step_s, row.forward_s = float(res["step_s"]), float(res["forward_s"])
    row.peak_memory_mb = float(res["peak_memory_mb"])


def _split_evaluations(evaluations, runs: list[Path]) -> dict[int, str]:
    """``RUN=PATH`` strings (or a RUN -> PATH mapping) as run index -> PATH. RUN is a run as given (or the
    same folder) or a run's folder name."""
    resolved = [r.resolve() for r in runs]

    def match(key: str) -> int | None:
        try:
            p = Path(key).expanduser().resolve()
        except (OSError, RuntimeError):
            p = None
        if p is not None and p in resolved:
            return resolved.index(p)
        named = [i for i, r in enumerate(runs) if r.name == key]
        return named[0] if len(named) == 1 else None

    pairs: list[tuple[str, str, int | None]] = []
    if isinstance(evaluations, str):
        evaluations = [evaluations]
    if isinstance(evaluations, Mapping):
        pairs = [(f"{k}={v}", str(v), match(str(k))) for k, v in evaluations.items()]
    else:
        for spec in evaluations:
            cuts = [i for i, c in enumerate(spec) if c == "="]
            if not cuts:
                raise UserError(f"--evaluation {spec}: give RUN=PATH (PATH: an evaluation.json or its folder)")
            hit = next(((spec[i + 1:], m) for i in cuts if (m := match(spec[:i])) is not None), None)
            pairs.append((spec, *(hit or (spec[cuts[0] + 1:], None))))
    out: dict[int, str] = {}
    for spec, target, index in pairs:
        if index is None:
            raise UserError(f"--evaluation {spec}: RUN is none of the runs given (name a run as given, or its "
                             "folder name)")
        if index in out:
            raise UserError(f"--evaluation {spec}: {runs[index]} already has an evaluation ({out[index]})")
        if not target:
            raise UserError(f"--evaluation {spec}: no PATH after '='")
        out[index] = target
    return out


def _check_protocols(accuracies: list[Accuracy | None]) -> None:
    """Regions of the same name must be the same labels, and HD95 the same unit, in every evaluation."""
    first: dict[str, tuple[list[int], str]] = {}
    unit: tuple[str, str] | None = None
    for acc in accuracies:
        if acc is None:
            continue
        if unit is None:
            unit = (acc.hd95_unit, acc.file)
        elif acc.hd95_unit != unit[0]:
            raise UserError(f"{acc.file}: HD95 in {acc.hd95_unit}, but {unit[1]} has it in {unit[0]}; compare "
                             "evaluations made the same way (with or without --compat official)")
        for name, labels in acc.regions.items():
            if labels is None:
                continue
            if name in first and first[name][0] != labels:
                raise UserError(f"{acc.file}: region {name!r} is labels {labels}, but {first[name][1]} scores it "
                                 f"as {first[name][0]}")
            first.setdefault(name, (labels, acc.file))


def compare_runs(runs: Sequence[str | os.PathLike], evaluations: Sequence[str] | Mapping = (),
                 measure: bool = True, device: str = "auto", amp: str = "auto", batch: int | None = None,
                 log: Callable[[str], None] | None = None) -> list[RunSummary]:
    """The rows of the comparison, in the order of ``runs``.

    ``evaluations``: ``"RUN=PATH"`` strings (or a RUN -> PATH mapping) giving a run's accuracy from an
    evaluation instead of its validation. Every file is checked before any network is built or measured.
    ``measure``: time one training step per run on ``device`` (``auto``: CUDA if any) with ``amp``
    (``auto``: bf16/fp16 on CUDA, off on the CPU), at each run's training batch unless ``batch``.
    """
    from ..runtime import resolve_amp, resolve_device

    if not runs:
        raise UserError("give at least one run folder")
    paths = [Path(r) for r in runs]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise UserError(f"{p}: given twice" + (f" (as {seen[key]})" if str(seen[key]) != str(p) else ""))
        seen[key] = p
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UserError(f"batch must be a positive integer, got {batch!r}")
    chosen = _split_evaluations(evaluations, paths)
    ckpts = [find_checkpoint(p) for p in paths]
    accuracies = [_run_accuracy(p, chosen.get(i)) for i, p in enumerate(paths)]
    _check_protocols(accuracies)
    dev, amp_mode = "cpu", "off"
    if measure:
        where = resolve_device(device)
        dev, amp_mode = str(where), resolve_amp(amp, where)
    # every checkpoint is read and checked before the first network is built or measured
    rows = [_read_run(p, c, a, measure, batch, log) for p, c, a in zip(paths, ckpts, accuracies, strict=True)]
    for row in rows:
        _add_cost(row, measure, dev, amp_mode, log)
    _unique_labels(rows, paths)
    return rows


def _unique_labels(rows: list[RunSummary], paths: list[Path]) -> None:
    """Runs in different parents with the same folder name and architecture: add the parent's name."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r, p in zip(rows, paths, strict=True):
        if counts[r.label] > 1:
            r.label = f"{r.arch} {p.resolve().parent.name}/{p.name}"


# ------------------------------------------------------------------------------------------- writing
def region_names(rows: Sequence[RunSummary]) -> list[str]:
    """The union of the rows' regions, in order of first appearance."""
    names: list[str] = []
    for r in rows:
        for name in (r.accuracy.dice if r.accuracy else {}):
            if name not in names:
                names.append(name)
    return names


def _fmt(v, digits: int, scale: float = 1.0, blank: str = "-") -> str:
    return blank if v is None else f"{v / scale:.{digits}f}"


def md_cell(text: str) -> str:
    """Text safe inside a Markdown table cell: one line, ``|`` and backslashes escaped, no raw HTML."""
    text = " ".join(str(text).split())
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _accuracy_cell(r: RunSummary) -> str:
    a = r.accuracy
    if a is None:
        return "none"
    what = "validation" if a.source == "validation" else f"{a.source} ({Path(a.file).name})"
    return what + (f", {a.cases} case{'' if a.cases == 1 else 's'}" if a.cases is not None else "")


def _step_cells(r: RunSummary) -> tuple[str, str]:
    if r.measured:
        return _fmt(r.step_s, 3), _fmt(r.peak_memory_mb, 0)
    if r.step_status == NOT_MEASURED:
        return NOT_MEASURED, NOT_MEASURED
    return "-", "-"


def comparison_markdown(rows: Sequence[RunSummary], context: Mapping | None = None) -> str:
    """The table, its protocol and device lines, each row's sources and notes (Markdown); ``context``:
    ``{"machine": ...}`` (:func:`machine_line`) for the device line."""
    regions = region_names(rows)
    unit = next((r.accuracy.hd95_unit for r in rows if r.accuracy), "mm")
    head = ["Run", "Params (M)", "MACs (G)", "Patch", "Batch", "Step (s)", "Peak memory (MB)"]
    for name in regions:
        head += [f"{name} Dice", f"{name} HD95 ({unit})"]
    head += ["Mean Dice", f"Mean HD95 ({unit})", "Accuracy from", "Epochs", "Steps", "Wall time (min)"]
    lines = []
    ctx = dict(context or {})
    lines.append(f"# Comparison of {len(rows)} run(s)")
    lines.append("")
    labels = {}
    for r in rows:
        for name, labs in (r.accuracy.regions.items() if r.accuracy else ()):
            if labs is not None:
                labels.setdefault(name, labs)
    protocol = ", ".join(f"{n} {labels[n]}" if n in labels else n for n in regions) or "none"
    lines.append(f"- Accuracy: mean over cases of each region's Dice and HD95 ({unit}); regions (labels): "
                 f"{md_cell(protocol)}.")
    scored = [set(r.accuracy.dice) for r in rows if r.accuracy]
    if scored and any(s != set(regions) for s in scored):
        lines.append("- The runs were scored on different regions: blank (-) where a run was not scored on a "
                     "region; each mean is over that run's own regions.")
    lines.append("- Parameters and multiply-adds (MACs) of one forward pass at the run's patch, batch 1, "
                 "deep supervision on (the paper's count).")
    if any(r.step_status != NOT_MEASURED for r in rows):
        where = ", ".join(sorted({f"{r.device} (amp {r.amp})" for r in rows if r.measured})) or "this device"
        lines.append(f"- Step: one training step at the run's training batch and patch on "
                     f"{md_cell(where)} (median after a "
                     "warm-up step), each in a process of its own; peak memory is that process's peak (resident "
                     "set on the CPU, allocated memory on CUDA)" + (f"; {md_cell(ctx['machine'])}" if
                                                                     ctx.get("machine") else "") + ".")
    else:
        lines.append("- Step time and peak memory: not measured (--no-measure).")
    lines.append("- Wall time: the training's own, final validation not included (its source under Sources).")
    lines.append("")
    lines.append("| " + " | ".join(md_cell(h) for h in head) + " |")
    lines.append("|" + "|".join("---" if i == 0 or h in ("Patch", "Accuracy from") else "---:"
                                for i, h in enumerate(head)) + "|")
    for r in rows:
        step, peak = _step_cells(r)
        a = r.accuracy
        cells = [r.label, _fmt(r.params, 2, 1e6), _fmt(r.macs, 2, 1e9),
                 "x".join(map(str, r.patch)) if r.patch else "-", str(r.batch) if r.batch else "-", step, peak]
        for name in regions:
            cells += [_fmt(a.dice.get(name), 4) if a and name in a.dice else "-",
                      _fmt(a.hd95.get(name), 2) if a and name in a.hd95 else "-"]
        cells += [_fmt(r.mean_dice, 4), _fmt(r.mean_hd95, 2), _accuracy_cell(r),
                  "-" if r.epochs is None else str(r.epochs), "-" if r.steps is None else str(r.steps),
                  _fmt(r.wall_s, 1, 60.0)]
        lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    lines.append("")
    lines.append("## Sources")
    lines.append("")
    for r in rows:
        acc = r.accuracy.file if r.accuracy else "none"
        lines.append(f"- {md_cell(r.label)}: run {md_cell(r.run)}; network {md_cell(r.checkpoint)}; accuracy "
                     f"{md_cell(acc)}; wall time from {md_cell(r.wall_source or 'nowhere')}")
        for n in r.notes:
            lines.append(f"  - {md_cell(n)}")
    return "\n".join(lines) + "\n"


def _csv_text(text) -> str:
    """A text cell a spreadsheet shows as text, not as a formula."""
    text = "" if text is None else str(text)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_num(v) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else str(v)


def comparison_csv(rows: Sequence[RunSummary]) -> str:
    """One line per run; numbers in full precision, blank where not known, ``not measured`` under --no-measure."""
    regions = region_names(rows)
    head = ["label", "arch", "run", "checkpoint", "params", "macs", "patch", "batch", "step_s", "forward_s",
            "peak_memory_mb", "device", "amp"]
    head += [f"{k}_{name}" for name in regions for k in ("dice", "hd95")]
    head += ["mean_dice", "mean_hd95", "hd95_unit", "accuracy_source", "accuracy_file", "cases", "epochs",
             "steps", "wall_s", "wall_source", "notes"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for r in rows:
        a = r.accuracy
        if r.measured:
            timing = [_csv_num(r.step_s), _csv_num(r.forward_s), _csv_num(r.peak_memory_mb)]
        elif r.step_status == NOT_MEASURED:
            timing = [NOT_MEASURED] * 3
        else:
            timing = [""] * 3
        cells = [_csv_text(r.label), _csv_text(r.arch), _csv_text(r.run), _csv_text(r.checkpoint),
                 _csv_num(r.params), _csv_num(r.macs), "x".join(map(str, r.patch)) if r.patch else "",
                 _csv_num(r.batch), *timing, r.device or "", r.amp or ""]
        for name in regions:
            cells += [_csv_num(a.dice.get(name)) if a else "", _csv_num(a.hd95.get(name)) if a else ""]
        cells += [_csv_num(r.mean_dice), _csv_num(r.mean_hd95), a.hd95_unit if a else "",
                  a.source if a else "", _csv_text(a.file) if a else "", _csv_num(a.cases) if a else "",
                  _csv_num(r.epochs), _csv_num(r.steps), _csv_num(r.wall_s), r.wall_source or "",
                  _csv_text("; ".join(r.notes))]
        w.writerow(cells)
    return buf.getvalue()


def comparison_png(rows: Sequence[RunSummary]) -> bytes:
    """Mean Dice against G MACs (log axis when they spread over more than :data:`LOG_SPREAD`x), bubble area
    proportional to parameters, each point labelled; runs lacking either figure are listed below."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..viz import figure_png

    def text(s: str) -> str:  # no mathtext from a run's name
        return s.replace("$", r"\$")

    shown = [r for r in rows if r.macs and r.mean_dice is not None and r.params]
    left = [r for r in rows if r not in shown]
    fig, ax = plt.subplots(figsize=(7.5, 5.2), constrained_layout=True)
    if shown:
        x = [r.macs / 1e9 for r in shown]
        y = [r.mean_dice for r in shown]
        biggest = max(r.params for r in shown)
        sizes = [1800.0 * r.params / biggest for r in shown]
        colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(shown))]
        ax.scatter(x, y, s=sizes, c=colors, alpha=0.45, edgecolors="black", linewidths=0.8, zorder=3)
        for r, xi, yi in zip(shown, x, y, strict=True):
            ax.annotate(text(f"{r.label}\n{r.params / 1e6:.2f} M"), (xi, yi), xytext=(8, 6),
                        textcoords="offset points", fontsize=8, zorder=4)
        lo, hi = min(x), max(x)
        if hi / lo > LOG_SPREAD:
            ax.set_xscale("log")
            ax.set_xlim(lo / 2, hi * 3)
        else:
            pad = max((hi - lo) * 0.25, hi * 0.15)
            ax.set_xlim(max(lo - pad, 0), hi + pad * 1.5)  # room for the labels on the right
        lo, hi = min(y), max(y)
        pad = max((hi - lo) * 0.25, 0.02)
        ax.set_ylim(max(lo - pad, 0), min(hi + pad, 1.0))
    else:
        ax.text(0.5, 0.5, "no run has both multiply-adds and a mean Dice", ha="center", va="center",
                transform=ax.transAxes)
    sources = sorted({r.accuracy.source for r in shown if r.accuracy})
    ax.set_xlabel("multiply-adds per patch, batch 1 (G MACs)")
    ax.set_ylabel(f"mean Dice ({', '.join(sources) or 'no accuracy'})")
    ax.set_title("Accuracy against cost (bubble area proportional to parameters)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if left:
        fig.supxlabel(text("not plotted (no MACs or no Dice): " + ", ".join(r.label for r in left)), fontsize=7)
    return figure_png(fig, dpi=110)


def write_comparison(rows: Sequence[RunSummary], out_dir: str | os.PathLike,
                     context: Mapping | None = None) -> dict[str, Path]:
    """Write ``comparison.md``, ``comparison.csv`` and ``comparison.png`` into ``out_dir`` (each atomically;
    other files there are left alone). ``context``: ``{"machine": ...}``, what the steps were measured on."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    files = {"md": (out / "comparison.md", comparison_markdown(rows, context).encode()),
             "csv": (out / "comparison.csv", comparison_csv(rows).encode()),
             "png": (out / "comparison.png", comparison_png(rows))}
    for target, data in files.values():
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return {k: target for k, (target, _) in files.items()}


def machine_line(device: str) -> str:
    """The machine a step was measured on, in words."""
    from ..bench.harness import machine_info

    m = machine_info(device)
    return f"{m.get('gpu') or m['cpu']}, {m['threads']} threads, torch {m['torch']}"
