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
    from unetrpp import create_model

    quoted = re.search(r"ValueError: (.*)\n", README.read_text()).group(1)
    with pytest.raises(ValueError, match="does not fit stem_stride") as info:
        create_model("synapse", img_size=(60, 128, 128))
    assert str(info.value) == quoted
