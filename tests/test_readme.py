"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)  # it saves "my-model"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert tuple(namespace["full"].shape) == (1, 14, 64, 128, 128)
    assert (tmp_path / "my-model" / "model.safetensors").is_file()


def test_quoted_error_message_is_the_real_one():
    from unetrpp import UserError, create_model

    kind, quoted = re.search(r"\n(\w+Error): (.*)\n", README.read_text()).groups()
    with pytest.raises(UserError, match="does not fit stem_stride") as info:
        create_model("synapse", img_size=(60, 128, 128))
    assert (type(info.value).__name__, str(info.value)) == (kind, quoted)


def _commands(section: str) -> list[list[str]]:
    """The ``unetrpp`` command lines of the first bash block under ``## section``, comments removed."""
    import shlex

    text = README.read_text().split(f"## {section}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [shlex.split(line.split("#", 1)[0]) for line in block.splitlines() if line.strip()]
    assert all(words[0] == "unetrpp" for words in lines), lines
    return [words[1:] for words in lines]


def test_share_a_model_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from tests.inference.test_model import _dataset_with_runs, _volume
    from unetrpp.cli.main import main

    _dataset_with_runs(tmp_path / "D")
    _volume(tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)
    commands = _commands("Share a model")
    assert [c[0] for c in commands] == ["find-best", "export-model", "show-model", "predict"]
    for words in commands:
        assert main(words) == 0, words
    assert (tmp_path / "D" / "results" / "postprocessing.json").is_file()
    assert (tmp_path / "seg.nii.gz").is_file() and "networks: 2" in capsys.readouterr().out


def test_official_weights_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from tests.inference.test_official_import import _tiny, _volume, v1_info, write_official
    from unetrpp.cli.main import main
    from unetrpp.io import Geometry, read_image, write_image

    write_official(tmp_path, _tiny(out_channels=14, feature_size=16), v1_info((2.0, 1.5, 1.5)))
    write_image(_volume((10, 48, 48)), Geometry.identity((3.0, 1.0, 1.0)), tmp_path / "scan.nii.gz")
    monkeypatch.chdir(tmp_path)
    commands = _commands("Official weights on your scans")
    assert [c[0] for c in commands] == ["import-official", "show-model", "predict"]
    for words in commands:
        assert main(words) == 0, words
    assert "liver" in capsys.readouterr().out  # show-model names the official labels
    assert read_image(tmp_path / "seg.nii.gz")[0].shape == (10, 48, 48)


def test_public_names_the_readme_uses_import():
    from unetrpp.inference import Predictor, load_model
    from unetrpp.training import TrainConfig, Trainer

    assert "unetrpp.training.TrainConfig" in README.read_text()
    assert TrainConfig().recipe == "auto" and Trainer.__name__ == "Trainer"
    assert callable(load_model) and callable(Predictor.from_model)


@pytest.mark.parametrize("package", ["unetrpp", "unetrpp.network", "unetrpp.io", "unetrpp.data", "unetrpp.training",
                                     "unetrpp.inference", "unetrpp.evaluation", "unetrpp.bench"])
def test_every_public_name_of_every_package_resolves(package):
    import importlib

    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj is not None, (package, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
