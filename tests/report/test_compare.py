"""``unetrpp compare``: two tiny real runs, their table's numbers against the models and summaries, the files."""

import csv
import io
import json
import re
import shutil
import struct

import pytest
import torch

from tests.volumes import planned_phantom
from unetrpp.checkpoint import Checkpoint, build_model
from unetrpp.cli.main import main
from unetrpp.errors import UserError
from unetrpp.network.analysis import count_macs
from unetrpp.report.compare import (
    NOT_MEASURED,
    Accuracy,
    RunSummary,
    compare_runs,
    comparison_png,
    read_accuracy,
    write_comparison,
)
from unetrpp.training.config import TrainConfig
from unetrpp.training.trainer import Trainer

TINY = {"feature_size": 8, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1], "proj_size": [16, 16, 16, 8],
        "decoder_proj_size": 16}  # fmt: skip
RUN_FILES = ("checkpoint_final.pt", "train_config.json", "progress.csv", "log.txt", "validation/summary.json")


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these tests run beside others on a few shared cores, where more threads only thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real runs of one epoch of two steps, with their final validation: width 8 and width 16."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    ds = planned_phantom(root / "ds", cases=3)
    out = {}
    for name, width in (("small", 8), ("wide", 16)):
        cfg = TrainConfig(preset="synapse", fold=0, epochs=1, iters_per_epoch=2, val_iters=1, workers=0,
                          device="cpu", model_overrides={**TINY, "feature_size": width}, final_validation=True,
                          final_validation_tta=False)
        Trainer(ds, cfg, out_dir=root / name, progress=False, echo=False).run()
        out[name] = root / name
    out["dataset"] = ds
    torch.set_num_threads(threads)
    return out


def _copy_run(src, dst):
    for name in RUN_FILES:
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, dst / name)
    return dst


def _summary(run):
    return json.loads((run / "validation" / "summary.json").read_text(encoding="utf-8"))


def _error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_rows_hold_the_models_and_summaries_numbers_in_the_given_order(runs):
    rows = compare_runs([runs["wide"], runs["small"]], measure=False)
    assert [r.label for r in rows] == ["unetrpp wide", "unetrpp small"]
    for row, name in zip(rows, ("wide", "small"), strict=True):
        ckpt = Checkpoint.load(runs[name] / "checkpoint_final.pt")
        model = build_model(ckpt)
        assert row.arch == "unetrpp" and row.checkpoint == str(runs[name] / "checkpoint_final.pt")
        assert row.params == sum(p.numel() for p in model.parameters())
        assert row.macs == count_macs(model)[0] > 0
        assert row.patch == [16, 32, 32] and row.batch == 2
        summary = _summary(runs[name])
        assert row.accuracy.source == "validation" and row.accuracy.cases == 1
        assert row.accuracy.file == str(runs[name] / "validation" / "summary.json")
        assert set(row.accuracy.dice) == set(summary["mean"])
        for region, m in summary["mean"].items():
            assert row.accuracy.dice[region] == m["dice"]
            assert row.accuracy.hd95[region] == m["hd95"]  # null (NaN) where no HD95: None
        assert row.mean_dice == summary["mean_dice"] and row.mean_hd95 == summary["mean_hd95"]
        # the training record: one epoch of two steps, its wall time as the checkpoint holds it
        assert row.epochs == 1 and row.steps == 2
        assert row.wall_s == ckpt.training.elapsed > 0 and row.wall_source == "checkpoint"
        assert not row.measured and row.step_status == NOT_MEASURED and row.step_s is None
    assert rows[0].params > rows[1].params and rows[0].macs > rows[1].macs  # width 16 against width 8
    assert [r.label for r in compare_runs([runs["small"], runs["wide"]], measure=False)] == \
        ["unetrpp small", "unetrpp wide"]


def test_cli_writes_the_table_csv_and_png(runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["small"]), str(runs["wide"]), "-o", str(out), "--no-measure"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'comparison.md'}" in printed
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text(encoding="utf-8"))))
    assert [r["label"] for r in rows] == ["unetrpp small", "unetrpp wide"]
    for r, name in zip(rows, ("small", "wide"), strict=True):
        model = build_model(Checkpoint.load(runs[name] / "checkpoint_final.pt"))
        summary = _summary(runs[name])
        assert int(r["params"]) == sum(p.numel() for p in model.parameters())
        assert int(r["macs"]) == count_macs(model)[0]
        assert float(r["mean_dice"]) == summary["mean_dice"]
        for region, m in summary["mean"].items():
            assert float(r[f"dice_{region}"]) == m["dice"]
            assert r[f"hd95_{region}"] == ("" if m["hd95"] is None else repr(m["hd95"]))
        assert r["step_s"] == r["peak_memory_mb"] == r["forward_s"] == NOT_MEASURED
        assert r["accuracy_source"] == "validation" and int(r["steps"]) == 2 and int(r["epochs"]) == 1
    md = (out / "comparison.md").read_text(encoding="utf-8")
    table = [ln for ln in md.splitlines() if ln.startswith("| unetrpp")]
    assert [ln.split(" | ")[0] for ln in table] == ["| unetrpp small", "| unetrpp wide"]
    assert all(ln.count("not measured") == 2 for ln in table)
    small = rows[0]
    assert f"| {int(small['params']) / 1e6:.2f} | {int(small['macs']) / 1e9:.2f} | 16x32x32 | 2 |" in table[0]
    assert f"| {float(small['mean_dice']):.4f} |" in table[0]
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100 and len(png) > 1000
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_evaluation_replaces_a_runs_accuracy_and_says_so(runs, tmp_path, capsys):
    # a real test-set evaluation of the small run's validation prediction, on the synapse8 protocol
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(runs["dataset"] / "labelsTr" / "phantom_000.nii.gz", ref)
    pred = runs["small"] / "validation"
    ev = tmp_path / "pred" / "evaluation.json"
    assert main(["evaluate", str(ref), str(pred), "--protocol", "synapse8", "-o", str(ev), "--workers", "1"]) == 0
    evaluation = json.loads(ev.read_text(encoding="utf-8"))
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", str(runs["small"]), str(runs["wide"]), "-o", str(out), "--no-measure",
                 "--evaluation", f"small={ev.parent}"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text(encoding="utf-8"))))
    small, wide = rows
    assert small["accuracy_source"] == "evaluation" and small["accuracy_file"] == str(ev)
    assert wide["accuracy_source"] == "validation"
    assert float(small["mean_dice"]) == evaluation["mean_dice"]
    assert float(small["dice_right_kidney"]) == evaluation["mean"]["right_kidney"]["dice"]
    # the protocols differ in names ("right kidney" / "right_kidney"): the union, blank where not scored
    assert small["dice_right kidney"] == "" and wide["dice_right_kidney"] == ""
    assert float(wide["dice_right kidney"]) == _summary(runs["wide"])["mean"]["right kidney"]["dice"]
    md = (out / "comparison.md").read_text(encoding="utf-8")
    assert "evaluation (evaluation.json), 1 case |" in md and "validation, 1 case |" in md
    assert "scored on different regions" in md and f"accuracy {ev}" in md

    # the same evaluation named by the path of the run as given
    rows = compare_runs([runs["small"]], [f"{runs['small']}={ev}"], measure=False)
    assert rows[0].accuracy.source == "evaluation" and rows[0].mean_dice == evaluation["mean_dice"]


def test_problems_are_one_line_naming_the_file(runs, tmp_path, capsys):
    bad = _copy_run(runs["small"], tmp_path / "bad")
    summary = bad / "validation" / "summary.json"
    summary.write_text("{not json")
    out = str(tmp_path / "cmp")
    err = _error_line(capsys, ["compare", str(runs["wide"]), str(bad), "-o", out, "--no-measure"])
    assert f"{summary}: not valid JSON" in err
    # a NaN, a negative or a boolean figure
    good = _summary(runs["small"])
    region = next(iter(good["mean"]))
    for value, says in (("NaN", "is nan"), ("-0.5", "between 0 and 1"), ("true", "must be a number")):
        text = json.dumps(good).replace(f'"{region}": {{"dice": {json.dumps(good["mean"][region]["dice"])}',
                                        f'"{region}": {{"dice": {value}', 1)
        assert value in text
        summary.write_text(text)
        err = _error_line(capsys, ["compare", str(bad), "-o", out, "--no-measure"])
        assert f"{summary}: mean.{region}.dice" in err and says in err, err
        with pytest.raises(UserError, match=re.escape(str(summary))):
            read_accuracy(summary)
    summary.write_text(json.dumps({**good, "mean_hd95": -1}))
    assert "mean_hd95 must be >= 0" in _error_line(capsys, ["compare", str(bad), "-o", out, "--no-measure"])
    summary.write_text(json.dumps({"cases": []}))
    assert "not an evaluation summary" in _error_line(capsys, ["compare", str(bad), "-o", out, "--no-measure"])

    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error_line(capsys, ["compare", str(runs["small"]), str(empty), "-o", out, "--no-measure"])
    assert f"{empty}: no checkpoint" in err
    err = _error_line(capsys, ["compare", str(runs["small"]), str(runs["small"]) + "/", "-o", out, "--no-measure"])
    assert "given twice" in err
    err = _error_line(capsys, ["compare", str(runs["small"]), "-o", out, "--no-measure", "--evaluation",
                               f"elsewhere={summary}"])
    assert "none of the runs given" in err
    # HD95 in voxels and in millimetres do not share a column
    official = tmp_path / "official.json"
    official.write_text(json.dumps({**good, "compat": "official"}))
    err = _error_line(capsys, ["compare", str(runs["small"]), str(runs["wide"]), "-o", out, "--no-measure",
                               "--evaluation", f"wide={official}"])
    assert "HD95 in voxels" in err
    assert not (tmp_path / "cmp" / "comparison.md").exists()


def test_a_damaged_checkpoint_stops_before_anything_is_measured(runs, tmp_path, monkeypatch):
    from unetrpp.report import compare

    measured = []
    monkeypatch.setattr(compare, "measure_in_child", lambda *a: measured.append(a) or {})
    damaged = _copy_run(runs["small"], tmp_path / "damaged")
    (damaged / "checkpoint_final.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(UserError, match=re.escape(f"{damaged / 'checkpoint_final.pt'}: not a loadable")):
        compare_runs([runs["small"], damaged], measure=True, device="cpu")
    assert measured == []


def test_a_run_whose_network_does_not_build_keeps_its_row(runs, tmp_path, capsys):
    legacy = _copy_run(runs["wide"], tmp_path / "legacy")
    ckpt = Checkpoint.load(legacy / "checkpoint_final.pt")
    ckpt.state_dict = {f"other.{k}": v for k, v in ckpt.state_dict.items()}  # a hand-made network's weights
    ckpt.save(legacy / "checkpoint_final.pt")
    (legacy / "validation" / "summary.json").unlink()
    out = tmp_path / "cmp"
    assert main(["compare", str(runs["small"]), str(legacy), "-o", str(out), "--no-measure"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert f"{legacy}: network not built (missing key" in captured.out
    rows = list(csv.DictReader(io.StringIO((out / "comparison.csv").read_text(encoding="utf-8"))))
    assert rows[1]["label"] == "unetrpp legacy" and rows[1]["params"] == rows[1]["macs"] == ""
    assert rows[1]["mean_dice"] == "" and rows[1]["accuracy_source"] == "" and int(rows[1]["steps"]) == 2
    assert "network not built" in rows[1]["notes"]
    assert (out / "comparison.png").stat().st_size > 0


def test_markdown_cells_do_not_break_on_a_pipe(runs, tmp_path):
    odd = _copy_run(runs["small"], tmp_path / "a|b <b>x")
    rows = compare_runs([odd, runs["wide"]], measure=False)
    paths = write_comparison(rows, tmp_path / "cmp")
    md = paths["md"].read_text(encoding="utf-8")
    line = next(ln for ln in md.splitlines() if ln.startswith("| unetrpp a"))
    header = next(ln for ln in md.splitlines() if ln.startswith("| Run"))
    cells = re.split(r"(?<!\\)\|", line)
    assert len(cells) == len(re.split(r"(?<!\\)\|", header))
    assert cells[1].strip() == r"unetrpp a\|b &lt;b&gt;x" and "<b>" not in md
    back = list(csv.DictReader(io.StringIO(paths["csv"].read_text(encoding="utf-8"))))
    assert back[0]["label"] == "unetrpp a|b <b>x"


def test_measured_step_has_time_and_the_childs_peak_memory(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring process's threads
    (row,) = compare_runs([runs["small"]], measure=True, device="cpu", amp="off")
    assert row.measured and row.step_s > 0 and row.forward_s > 0 and row.peak_memory_mb > 0
    assert row.device == "cpu" and row.amp == "off"
    paths = write_comparison([row], tmp_path / "cmp", {"machine": "test machine"})
    (back,) = csv.DictReader(io.StringIO(paths["csv"].read_text(encoding="utf-8")))
    assert float(back["step_s"]) == row.step_s and float(back["peak_memory_mb"]) == row.peak_memory_mb
    md = paths["md"].read_text(encoding="utf-8")
    assert NOT_MEASURED not in md and f"| {row.step_s:.3f} | {row.peak_memory_mb:.0f} |" in md
    assert "test machine" in md


def test_plot_spreads_on_a_log_axis_and_survives_runs_it_cannot_place():
    def row(label, params, macs, dice):
        acc = Accuracy("evaluation", "e.json", {"a": [1]}, {"a": dice}, {"a": 1.0}, dice, 1.0)
        return RunSummary(label, "x", label, "c.pt", params=params, macs=macs, accuracy=acc)

    spread = comparison_png([row("$small$", 10**6, 10**9, 0.8), row("big", 10**8, 10**12, 0.9),
                             row("no cost", None, None, 0.85)])
    nothing = comparison_png([row("no cost", None, None, 0.85)])
    for png in (spread, nothing):
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
