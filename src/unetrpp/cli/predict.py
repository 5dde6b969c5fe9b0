"""``unetrpp predict``: segment a file, a DICOM series or a folder of cases with a checkpoint."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..errors import UserError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def add_parser(sub) -> None:
    from ..inference.sliding_window import DEFAULT_SHORTCUTS, DEFAULT_STEP

    p = sub.add_parser(
        "predict", help="segment volumes with a trained checkpoint",
        description="Preprocess each input as in training, run a Gaussian-weighted sliding window (with mirroring "
                    "unless --no-tta), undo the preprocessing and write the label map with the input's spacing, "
                    "origin and direction in the input's format (NIfTI for DICOM input). A folder input is a set "
                    "of cases; channel files CASE_0000, CASE_0001, ... are grouped by case.")
    p.add_argument("-i", "--input", required=True, help="image file, DICOM folder, or folder of cases")
    p.add_argument("-o", "--output", required=True, help="output file (single input) or folder")
    p.add_argument("-m", "--model", required=True, nargs="+", metavar="MODEL",
                   help="a checkpoint (.pt), a run folder, a model package (.zip or folder from export-model or "
                        "import-official), or several run folders (an ensemble: their probabilities averaged)")
    p.add_argument("--postprocessing", metavar="JSON",
                   help="postprocessing.json to apply ('none': none); default: the package's own, or for run "
                        "folders the one `unetrpp find-best` wrote beside them for exactly these runs")
    p.add_argument("--step", type=float, default=DEFAULT_STEP,
                   help=f"window step as a fraction of the patch (default {DEFAULT_STEP:g})")
    p.add_argument("--no-tta", action="store_true", help="no mirroring test-time augmentation (8x faster)")
    p.add_argument("--exact", action="store_true",
                   help="the official protocol: every window and every mirror computed (no shortcuts)")
    p.add_argument("--mirror-margin", type=_margin, default=None, metavar="M",
                   help="run a window's 7 mirrored passes only if it holds a voxel whose unmirrored top-2 "
                        f"probability margin is below M (default {DEFAULT_SHORTCUTS.mirror_margin:g}; 1: every window)")
    p.add_argument("--mirror-step", type=_step, default=None, metavar="S",
                   help="faster, not exact: mirror the unsure voxels with windows S patches apart (e.g. 1) "
                        "instead of every window that holds one; their answer may then differ from --exact's")
    p.add_argument("--no-constant-windows", action="store_true",
                   help="compute every window of uniform voxels instead of once per value")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--batch", type=_positive,
                   help="network passes per forward call (default: planned from the patch, up to 8: a window's "
                        "mirrorings side by side; with --exact, windows per call, 2 on CPU, 4 on CUDA)")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE.npz with class probabilities")
    p.add_argument("--preview", action="store_true", help="also write CASE.png: three slices with the labels")
    p.add_argument("--dicom-seg", action="store_true",
                   help="DICOM input: also write CASE.dcm, a DICOM SEG referencing the series (needs unetrpp[dicom])")
    p.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    p.add_argument("--part-id", type=int, metavar="K",
                   help="predict only part K (0-based) of --num-parts: every N-th of the sorted cases, from the "
                        "K-th (one job per part; under torchrun each rank takes its part by itself)")
    p.add_argument("--num-parts", type=int, metavar="N", help="how many parts the cases are split into")
    p.set_defaults(run=run)


def _margin(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a probability margin between 0 and 1")
    return value


def _step(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a step between 0 (exclusive) and 1 patch")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def shortcuts_of(args):
    """The sliding window's shortcuts from ``--exact``, ``--mirror-margin``, ``--mirror-step`` and
    ``--no-constant-windows``."""
    from ..inference.sliding_window import DEFAULT_SHORTCUTS, EXACT, Shortcuts

    if args.exact:
        if args.mirror_margin is not None or args.no_constant_windows or args.mirror_step is not None:
            raise UserError("--exact computes everything; it cannot be combined with --mirror-margin, "
                             "--mirror-step or --no-constant-windows")
        return EXACT
    margin = DEFAULT_SHORTCUTS.mirror_margin if args.mirror_margin is None else args.mirror_margin
    return Shortcuts(constant_windows=not args.no_constant_windows,
                     mirror_margin=None if margin is None or margin >= 1 else margin,
                     mirror_step=args.mirror_step,
                     mirror_weight=DEFAULT_SHORTCUTS.mirror_weight if args.mirror_step is None else 0.05)


def _is_dicom_dir(path: Path) -> bool:
    from ..io import FILE_ENDINGS, split_ending

    files = [f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")]
    return bool(files) and not any(split_ending(f)[1] in FILE_ENDINGS for f in files)


def find_cases(path: Path, channels: int) -> list[tuple[str, list[Path], str]]:
    """``(case, channel files, ending)`` for a file, a DICOM folder or a folder of cases."""
    from ..io import FILE_ENDINGS, split_ending

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        stem, ending = split_ending(path.name)
        m = _CHANNEL.match(stem)
        return [(m.group("case") if m and channels == 1 else stem, [path], ending)]
    if _is_dicom_dir(path):
        return [(path.name, [path], ".nii.gz")]
    groups: dict[str, dict[int, Path]] = {}
    endings: dict[str, str] = {}
    subdirs = []
    for f in sorted(path.iterdir()):
        if f.name.startswith("."):
            continue
        if f.is_dir():
            subdirs.append(f)
            continue
        stem, ending = split_ending(f.name)
        if ending not in FILE_ENDINGS:
            continue
        m = _CHANNEL.match(stem)
        case, ch = (m.group("case"), int(m.group("ch"))) if m else (stem, 0)
        if not m and channels > 1:
            raise UserError(f"{f}: the model takes {channels} channels; name the files CASE_0000{ending}, "
                             f"CASE_0001{ending}, ...")
        if ch in groups.setdefault(case, {}):
            raise UserError(f"{f}: channel {ch} of case {case} is also {groups[case][ch].name}; one output would "
                             "serve two inputs; rename one of them")
        groups[case][ch] = f
        endings[case] = ending
    cases = []
    for case, chans in groups.items():
        if sorted(chans) != list(range(channels)):
            raise UserError(f"{path}: case {case} has channels {sorted(chans)}, the model takes 0..{channels - 1}")
        cases.append((case, [chans[c] for c in range(channels)], endings[case]))
    cases += [(d.name, [d], ".nii.gz") for d in subdirs if _is_dicom_dir(d)]
    if not cases:
        raise UserError(f"{path}: no images found ({', '.join(FILE_ENDINGS)} files or DICOM series)")
    return cases


def _same(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file or folder (symlinks and hard links included)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def refuse_overwriting_inputs(inp: Path, out: Path, targets=()) -> None:
    """One-line error when the output (folder or file) is the input, or any output file is an input file."""
    if _same(inp, out):
        raise UserError(f"{out}: the output is the input; give another output file or folder")
    inputs = [f for _, files, _ in targets for f in files]
    for _, _, outputs in targets:
        for o in outputs:
            for f in inputs:
                if _same(o, f):
                    raise UserError(f"{o}: this output would replace the input {f}; give another output folder")


def outputs_of(target: Path, save_probabilities: bool, preview: bool, dicom_seg: bool = False) -> list[Path]:
    """Every file a case's prediction writes: the label map, and the .npz / .png / .dcm when asked for."""
    from ..io import split_ending

    stem = split_ending(target.name)[0]
    extra = [f"{stem}.npz"] * save_probabilities + [f"{stem}.png"] * preview + [f"{stem}.dcm"] * dicom_seg
    return [target, *(target.with_name(e) for e in extra)]


def check_writable(folder: Path) -> None:
    """A read-only, missing or full output location fails before any case is computed."""
    from ..io.jsonio import check_writable as probe

    probe(folder, "predictions")


def run(args) -> int:
    import sys
    import time

    import numpy as np

    from ..inference import shard as sharding
    from ..inference.model import load_model
    from ..inference.postprocess import describe
    from ..inference.predictor import Predictor
    from ..io import FILE_ENDINGS, read_case, split_ending, write_image
    from ..io.jsonio import atomic_write

    shortcuts = shortcuts_of(args)
    part = sharding.shard_of(getattr(args, "part_id", None), getattr(args, "num_parts", None))
    tty = sys.stderr.isatty() and not (part.torchrun and part.parts > 1)  # one progress bar per terminal
    inp, out = Path(args.input), Path(args.output)
    refuse_overwriting_inputs(inp, out)  # before the checkpoint is loaded
    if args.dicom_seg:  # a NIfTI input or a missing highdicom fails before any work
        from ..io.dicom_seg import check_dicom_input

        check_dicom_input(inp)
    model = load_model(args.model, postprocessing=args.postprocessing)
    predictor = Predictor.from_model(model, device=sharding.configure(args.device, part), step=args.step,
                                     tta=not args.no_tta, batch=args.batch, progress=tty, shortcuts=shortcuts)
    from ..inference.sliding_window import planned_batch

    sizes = sorted({args.batch or planned_batch(m.network.config.img_size, predictor.device, shortcuts)
                    for m in model.members})
    print(f"{part.prefix}sliding window: {shortcuts.describe()}, {'no mirroring' if args.no_tta else 'mirroring'}, "
          f"{'/'.join(map(str, sizes))} {'windows' if args.exact else 'passes'} per forward call", flush=True)
    if len(model.members) > 1 or model.postprocessing:
        print(f"model: {len(model.members)} network(s)"
              + (f", postprocessing {describe(model.postprocessing)}" if model.postprocessing else ""), flush=True)
    cases = find_cases(inp, predictor.num_channels)
    single_file_out = split_ending(out.name)[1] in FILE_ENDINGS
    if single_file_out and len(cases) > 1:
        raise UserError(f"{out}: {len(cases)} cases to write; give an output folder")
    targets = [(c, files, out if single_file_out else out / f"{c}{ending}") for c, files, ending in cases]
    seen: dict[Path, list[Path]] = {}
    for _, files, target in targets:
        if target in seen:
            raise UserError(f"{target}: two inputs would write it ({seen[target][0]} and {files[0]}); "
                             "rename one of them")
        seen[target] = files
    outputs = {t[2]: outputs_of(t[2], args.save_probabilities, args.preview, args.dicom_seg) for t in targets}
    refuse_overwriting_inputs(inp, out, [(c, files, outputs[t]) for c, files, t in targets])
    check_writable(out.parent if single_file_out else out)  # before any case is computed
    targets = part.select(targets, key=lambda t: t[0])  # this process's share of all cases, whatever is done
    # a case is done only when every output asked for exists (a rerun with --preview adds the .png)
    todo = [t for t in targets if args.overwrite or not all(o.exists() for o in outputs[t[2]])]
    names = {v: k for k, v in predictor.labels.items()}
    bar = None
    if tty and len(todo) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="predict", unit="case")
    t0 = time.perf_counter()
    for case, files, target in todo:
        result = predictor.predict(files, return_probabilities=args.save_probabilities)
        stem = split_ending(target.name)[0]
        if args.dicom_seg:  # first: a series it cannot describe leaves no label map either
            from ..io.dicom_seg import write_dicom_seg

            write_dicom_seg(result.label, files[0], target.with_name(f"{stem}.dcm"), predictor.labels,
                            result.geometry)
        write_image(result.label, result.geometry, target)
        if args.save_probabilities:
            def save(f, probs=result.probabilities):
                np.savez_compressed(f, probabilities=probs.astype(np.float16),
                                    classes=np.array([names.get(i, str(i)) for i in range(probs.shape[0])]))
            atomic_write(target.with_name(f"{stem}.npz"), save)
        if args.preview:
            from ..viz import write_overlay

            image = read_case(files)[0][0]
            write_overlay(image, result.label, result.geometry.spacing_zyx, target.with_name(f"{stem}.png"),
                          names, title=case)
        if bar:
            bar.update()
        else:
            print(f"{case}: wrote {target}", flush=True)
    if bar:
        bar.close()
    skipped = len(targets) - len(todo)
    print(f"{part.prefix}predicted {len(todo)} case(s) in {time.perf_counter() - t0:.1f} s"
          + (f", skipped {skipped} with existing output (--overwrite to redo)" if skipped else ""))
    return 0
