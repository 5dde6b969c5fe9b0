"""``unetrpp report``: the page's table, escaping, refused paths, size bound, and the viewer in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.volumes import GEOMETRIES
from unetrpp.cli.main import main
from unetrpp.errors import UserError
from unetrpp.evaluation import evaluate_pairs
from unetrpp.io import write_image, write_json
from unetrpp.report.html import MAX_CASE_BYTES, MAX_CASE_VOXELS, load_section, write_report

SHAPE = (8, 14, 12)
GEOMETRY = GEOMETRIES["lps"]  # spacing z, y, x = 2.5, 0.75, 0.8 mm: coronal and sagittal slices are stretched
HOSTILE = "<img src=x onerror=alert(1)>"
REGION = "</script><script>alert(2)</script>"
REGIONS = {"a": [1], REGION: [2]}


def _reference() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 2:7, 2:6] = 1
    lab[4:7, 7:12, 5:10] = 2
    return lab


def _predictions() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(reference, prediction) per case: perfect, bad (a shifted, b missed), medium, and both empty."""
    ref = _reference()
    bad = np.zeros(SHAPE, np.uint8)
    bad[1:4, 2:7, 4:8] = 1
    medium = ref.copy()
    medium[4:7, 7:12, 8:10] = 0
    empty = np.zeros(SHAPE, np.uint8)
    return {"good": (ref, ref), "bad": (ref, bad), HOSTILE: (ref, medium), "empty": (empty, empty)}


def _write_cases(root: Path, labels: str, images: str, preds: Path, seed: int = 0) -> list[tuple[str, Path, Path]]:
    rng = np.random.default_rng(seed)
    pairs = []
    for name, (ref, pred) in _predictions().items():
        img = (rng.normal(100, 10, SHAPE) + 40 * ref).astype(np.float32)
        write_image(img, GEOMETRY, root / images / f"{name}_0000.nii.gz")
        write_image(ref, GEOMETRY, root / labels / f"{name}.nii.gz")
        write_image(pred, GEOMETRY, preds / f"{name}.nii.gz")
        pairs.append((name, root / labels / f"{name}.nii.gz", preds / f"{name}.nii.gz"))
    return pairs


def make_evaluation(root: Path) -> Path:
    """DATASET/{imagesTs,labelsTs,pred}, and pred/evaluation.json as `unetrpp evaluate` writes it."""
    pairs = _write_cases(root, "labelsTs", "imagesTs", root / "pred")
    summary = evaluate_pairs(pairs, REGIONS)
    summary["protocol"] = "labels"
    write_json(summary, root / "pred" / "evaluation.json")
    return root / "pred"


def make_run(root: Path) -> Path:
    """DATASET/results/unetrpp_fold0 with progress.csv, a log, a config, and its validation of labelsTr."""
    run = root / "results" / "unetrpp_fold0"
    pairs = _write_cases(root, "labelsTr", "imagesTr", run / "validation", seed=1)
    summary = evaluate_pairs(pairs, REGIONS)
    summary.update(seconds=1.0, tta=False, cases_validated=len(pairs), cases_in_fold=len(pairs))
    write_json(summary, run / "validation" / "summary.json")
    (run / "progress.csv").write_text(
        "epoch,train_loss,val_loss,pseudo_dice,ema_dice,lr,dice_a,elapsed_s\n"
        "0,-0.1,-0.3,0.5,0.5,0.01,0.4,10\n1,-0.4,-0.5,0.7,0.52,0.007,0.6,20\n2,-0.6,,0.8,0.55,0.003,0.75,30\n")
    (run / "log.txt").write_text("epoch 0 started\n<script>alert(3)</script> in the log\n")
    (run / "train_config.json").write_text(json.dumps({"fold": 0, "recipe": "<b>short</b>"}))
    return run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "ds"
    make_evaluation(root)
    make_run(root)
    return root


class _Tables(HTMLParser):
    """Rows of the case tables: ``{table id: [[(data-v, text), ...], ...]}``."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[tuple[str | None, str]]]] = {}
        self._table = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "cases" in (a.get("class") or ""):
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None and "data-case" in a:
            self._table.append([])
        elif tag == "td" and self._table is not None and self._table:
            self._cell = [a.get("data-v"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def _case_rows(page: str, table: str = "t0") -> list[list[tuple[str | None, str]]]:
    p = _Tables()
    p.feed(page)
    return p.tables[table]


def test_table_lists_cases_worst_first_with_their_dice(dataset, tmp_path):
    out = write_report([dataset / "pred"], tmp_path / "report.html")
    page = out.read_text(encoding="utf-8")
    summary = json.loads((dataset / "pred" / "evaluation.json").read_text(encoding="utf-8"))
    expected = {}
    for c in summary["cases"]:
        d = [m["dice"] for m in c["regions"].values() if m["dice"] is not None]
        expected[c["case"]] = float(np.mean(d)) if d else math.nan
    rows = _case_rows(page)
    names = [r[1][1] for r in rows]
    assert names == ["bad", HOSTILE, "good", "empty"]  # both-empty (no Dice at all) last
    for row in rows:
        name, mean = row[1][1], row[2][0]
        if math.isnan(expected[name]):
            assert mean == "" and row[2][1] == "–"
        else:
            assert float(mean) == pytest.approx(expected[name]) and row[2][1] == f"{expected[name]:.4f}"
    # the per-region Dice of the bad case: a overlaps half, b is missed (0)
    bad = summary["cases"][[c["case"] for c in summary["cases"]].index("bad")]["regions"]
    assert float(rows[0][3][0]) == pytest.approx(bad["a"]["dice"]) and float(rows[0][4][0]) == 0.0
    assert rows[0][3][1] == f"{bad['a']['dice']:.4f}"
    assert [r[0][0] for r in rows] == ["1", "2", "3", "4"]
    # one viewer per case, in the table's order
    assert re.findall(r'<div class="viewer" id="(v0-\d+)"', page) == ["v0-0", "v0-1", "v0-2", "v0-3"]


def test_names_from_files_are_escaped_and_scripts_cannot_be_ended(dataset, tmp_path):
    write_report([dataset / "pred", dataset / "results" / "unetrpp_fold0"], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert HOSTILE not in page and REGION not in page and "<script>alert(3)" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;/script&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "&lt;b&gt;short&lt;/b&gt;" in page and "<b>short</b>" not in page
    # every <script> element ends where it should: the JSON inside has no "<" at all
    assert page.count("<script") == page.count("</script>") == 3
    for block in re.findall(r'<script type="application/json" id="data-\d+">(.*?)</script>', page, re.S):
        assert "<" not in block and ">" not in block
        data = json.loads(block)
        assert len(data["cases"]) == 4 and all(c["image"] for c in data["cases"])
    assert "<img" not in page


def test_a_case_name_with_a_folder_is_refused_in_one_line(dataset, tmp_path):
    pred = tmp_path / "pred"
    shutil.copytree(dataset / "pred", pred)
    summary = json.loads((pred / "evaluation.json").read_text(encoding="utf-8"))
    summary["cases"][0]["case"] = "../../etc/passwd"
    (pred / "evaluation.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match=r"evaluation\.json: case name '\.\./\.\./etc/passwd' is not a plain name"):
        load_section(pred)
    out = tmp_path / "r.html"
    assert main(["report", str(pred), "-o", str(out), "--workers", "1"]) == 2
    assert not out.exists()


def test_a_missing_prediction_is_one_line_and_the_old_page_is_kept(dataset, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(dataset / "pred", pred)
    (pred / "good.nii.gz").unlink()
    out = tmp_path / "r.html"
    out.write_text("old page")
    with pytest.raises(UserError, match=re.escape(f"{pred / 'good.nii.gz'}: no such file (the prediction of case")):
        write_report([pred], out, references=dataset / "labelsTs")
    assert main(["report", str(pred), "-o", str(out), "--references", str(dataset / "labelsTs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "good.nii.gz: no such file" in err
    assert out.read_text(encoding="utf-8") == "old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "r.html"]  # no temporary left


def test_folders_not_recorded_are_found_beside_the_predictions_or_given(dataset, tmp_path):
    root = tmp_path / "moved"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("results", "imagesTr", "labelsTr"))
    # the JSON records the old dataset's labelsTs, which still holds the files: a path read from a file that
    # leads out of this dataset is not followed
    assert (dataset / "labelsTs").is_dir()
    s = load_section(root / "pred" / "evaluation.json")
    assert "(recorded)" not in s.note and f"references {root / 'labelsTs'} (the dataset's)" in s.note
    assert "(recorded)" in load_section(dataset / "pred").note  # inside its own dataset it is
    summary = json.loads((root / "pred" / "evaluation.json").read_text(encoding="utf-8"))
    for c in summary["cases"]:
        c["reference"] = str(tmp_path / "gone" / Path(c["reference"]).name)
    (root / "pred" / "evaluation.json").write_text(json.dumps(summary))
    s = load_section(root / "pred")
    assert f"references {root / 'labelsTs'} (the dataset's)" in s.note
    assert f"images {root / 'imagesTs'} (beside the references)" in s.note
    assert [f[1] for f in s.files] == [root / "labelsTs" / f"{c.name}.nii.gz" for c in s.cases]
    shutil.rmtree(root / "imagesTs")
    s = load_section(root / "pred")
    assert "no images" in s.note and all(f[0] is None for f in s.files)
    shutil.move(root / "labelsTs", tmp_path / "refs")
    with pytest.raises(UserError, match=r"no reference file of case 'bad' in .*give --references DIR"):
        load_section(root / "pred")
    s = load_section(root / "pred", references=tmp_path / "refs")
    assert f"references {tmp_path / 'refs'} (given)" in s.note
    with pytest.raises(UserError, match="no such folder"):
        load_section(root / "pred", references=tmp_path / "refs", images=tmp_path / "nothing")


def test_page_size_is_bounded_for_big_noisy_cases(tmp_path):
    rng = np.random.default_rng(3)
    shape = (40, 96, 112)  # 430k voxels of noise: more than MAX_CASE_VOXELS, and incompressible
    cases = []
    for i in range(3):
        ref = np.zeros(shape, np.uint8)
        ref[10:30, 20:70, 30:90] = 1
        write_image(rng.integers(0, 4000, shape).astype(np.int16), GEOMETRY,
                    tmp_path / "imagesTs" / f"big{i}_0000.nii.gz")
        write_image(ref, GEOMETRY, tmp_path / "labelsTs" / f"big{i}.nii.gz")
        write_image((rng.random(shape) < 0.3).astype(np.uint8), GEOMETRY, tmp_path / "pred" / f"big{i}.nii.gz")
        cases.append({"case": f"big{i}", "regions": {"fg": {"dice": 0.3, "hd95": 9.0, "status": "ok"}}})
    write_json({"regions": {"fg": [1]}, "cases": cases}, tmp_path / "pred" / "evaluation.json")  # no paths recorded
    out = write_report([tmp_path / "pred"], tmp_path / "r.html", workers=1)
    page = out.read_text(encoding="utf-8")
    block = re.search(r'<script type="application/json" id="data-0">(.*?)</script>', page, re.S).group(1)
    cases = json.loads(block)["cases"]
    per_case = math.ceil(MAX_CASE_BYTES / 3) * 4  # base64 of the compressed bytes
    for c in cases:
        assert math.prod(c["dims"]) <= MAX_CASE_VOXELS
        assert len(c["data"]) <= per_case
        assert c["dims"][1] < shape[1] and c["dims"][2] < shape[2]  # subsampled in-plane (the finer axes) first
        for n, d, spacing, orig in zip(shape, c["dims"], c["spacing"], (2.5, 0.75, 0.8), strict=True):
            stride = round(spacing / orig)  # the shown spacing is the stride's: the aspect ratio stays true
            assert spacing == pytest.approx(stride * orig) and d == math.ceil(n / stride)
    assert len(page.encode()) <= len(cases) * per_case + 100_000


def test_a_run_folder_gives_curves_and_its_validation(dataset, tmp_path):
    run = dataset / "results" / "unetrpp_fold0"
    s = load_section(run)
    assert s.kind == "run" and len(s.cases) == 4 and s.progress["epoch"] == [0.0, 1.0, 2.0]
    assert math.isnan(s.progress["val_loss"][2])
    assert f"references {dataset / 'labelsTr'} (recorded)" in s.note
    write_report([s], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    for title in ("Loss", "Validation Dice (pseudo, EMA)", "Validation Dice per class", "Learning rate"):
        assert f"<b>{title}</b>" in page
    loss = re.search(r'<path d="([^"]*)"[^>]*><title>val_loss</title>', page).group(1)
    assert loss.count("M") == 1 and loss.count("L") == 1  # the NaN of epoch 2 is left out
    assert "best EMA Dice</span><b>0.5500" in page and "training time</span><b>0.5 min" in page


def test_bad_progress_and_bad_output_are_one_line(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.csv").write_text("epoch,train_loss\n0,0.5\n1,lots\n")
    with pytest.raises(UserError, match=r"progress\.csv: line 3, column 'train_loss': 'lots' is not a number"):
        load_section(run)
    assert main(["report", str(dataset / "pred"), "-o", str(tmp_path / "r.json")]) == 2
    assert "r.json: the report must be an .html file" in capsys.readouterr().err
    with pytest.raises(UserError, match="neither an evaluation"):
        load_section(tmp_path)


def test_cli_writes_one_page_for_several_inputs(dataset, tmp_path, capsys):
    out = tmp_path / "sub" / "report.html"
    assert main(["report", str(dataset / "pred"), str(dataset / "results" / "unetrpp_fold0"), "-o", str(out),
                 "--workers", "1", "--title", "Hippo & co"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ds/pred: 4 case(s) from ") and lines[1].startswith("ds/unetrpp_fold0: run ")
    assert lines[2].startswith(f"wrote {out} (2 section(s), 8 case(s), ")
    page = out.read_text(encoding="utf-8")
    assert "<title>Hippo &amp; co</title>" in page
    assert 'id="t0"' in page and 'id="t1"' in page and "v1-3" in page


# ------------------------------------------------------------------------------------------ headless Chromium

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _browser(tmp_path):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        why = f"headless browser test needs {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI installs them)")
        pytest.skip(why)
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1300,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


def test_page_in_headless_chromium_viewers_move_and_table_sorts(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium manager: never download a driver or browser
    out = write_report([dataset / "pred", dataset / "results" / "unetrpp_fold0"], tmp_path / "report.html")
    driver = _browser(tmp_path)
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import WebDriverWait

        driver.get(out.as_uri())
        viewers = driver.find_elements(By.CSS_SELECTOR, "div.viewer")
        assert len(viewers) == 8
        canvas = "return arguments[0].querySelector('canvas.pred').toDataURL()"
        for v in viewers:
            driver.execute_script("arguments[0].scrollIntoView()", v)
            WebDriverWait(driver, 20).until(lambda d, v=v: v.get_attribute("data-ready") == "1")
            label, before = v.find_element(By.CSS_SELECTOR, "output.idx").text, driver.execute_script(canvas, v)
            driver.execute_script(
                "const s = arguments[0].querySelector('input.slice');"
                "s.value = (+s.value + 1) % (+s.max + 1); s.dispatchEvent(new Event('input'));", v)
            assert v.find_element(By.CSS_SELECTOR, "output.idx").text != label
            assert driver.execute_script(canvas, v) != before, v.get_attribute("id")
        # keys: up moves one slice; C shows coronal slices, stretched by the 2.5 mm / 0.8 mm spacing
        v = viewers[0]
        driver.execute_script("arguments[0].scrollIntoView()", v)
        v.click()
        idx = v.find_element(By.CSS_SELECTOR, "output.idx")
        k = int(idx.text.split()[1])
        v.send_keys(Keys.ARROW_UP)
        assert idx.text == f"axial {k + 1} / {SHAPE[0]}"
        v.send_keys("c")
        assert idx.text.startswith("coronal ") and idx.text.endswith(f"/ {SHAPE[1]}")
        ratio = driver.execute_script("return arguments[0].querySelector('canvas.ref').style.getPropertyValue('--r')",
                                      v)
        assert float(ratio) == pytest.approx(SHAPE[2] * 0.8 / (SHAPE[0] * 2.5), abs=1e-3)
        # the case table sorts on a click, missing values last either way
        rows = "return Array.from(document.querySelectorAll('#t0 tbody tr')).map(r => r.cells[1].textContent)"
        assert driver.execute_script(rows) == ["bad", HOSTILE, "good", "empty"]
        header = driver.find_elements(By.CSS_SELECTOR, "#t0 thead th")[2]  # mean Dice
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", header)
        header.click()
        assert driver.execute_script(rows) == ["bad", HOSTILE, "good", "empty"]  # ascending: as it was
        header.click()
        assert driver.execute_script(rows) == ["good", HOSTILE, "bad", "empty"]
        driver.find_elements(By.CSS_SELECTOR, "#t0 thead th")[1].click()
        assert driver.execute_script(rows) == sorted([HOSTILE, "bad", "empty", "good"])
        assert driver.execute_script("return document.querySelectorAll('img, script:not([type])').length") == 1
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
    finally:
        driver.quit()
