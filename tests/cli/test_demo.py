"""`unetrpp demo` end to end with a tiny budget: every output is there and the numbers are consistent."""

import json

from unetrpp.cli.main import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "25", "-o", str(out), "--cases", "3", "--test-cases", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(summary["per_organ_dice"]) == {"spleen", "right_kidney", "left_kidney", "gallbladder", "liver",
                                              "stomach", "aorta", "pancreas"}
    assert summary["mean_dice_synapse8"] == evaluation["mean_dice"]
    assert 0 <= summary["mean_dice_synapse8"] <= 1 and summary["epochs"] == 1 and summary["iterations"] == 25
    assert summary["minutes_total"] < 4
    assert (out / "predictions" / "phantom_003.nii.gz").exists()
    assert (out / "overlays" / "phantom_003_prediction.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "training" / "progress.png").exists() and (out / "training" / "checkpoint_final.pt").exists()
    printed = capsys.readouterr().out
    assert f"everything is in {out}" in printed
    assert main(["demo", "-o", str(out)]) == 2  # refuses to overwrite a previous demo
