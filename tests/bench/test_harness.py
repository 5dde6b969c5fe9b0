"""The child-process result protocol: a child prints one ``RESULT`` line, the parent reads it back,
and a failing child is one line naming it and its error."""

import sys

import pytest

from unetrpp.bench import ChildError, run_child

PY = [sys.executable, "-c"]


def test_result_line_comes_back_whatever_else_the_child_prints():
    code = ("import sys\nfrom unetrpp.bench.harness import emit_result\nprint('warming up')\n"
            "print('noise', file=sys.stderr)\nemit_result({'median_s': 0.25, 'times_s': [0.25, 0.5], 'ok': True})\n"
            "print('done')")
    assert run_child([*PY, code], "demo child") == {"median_s": 0.25, "times_s": [0.25, 0.5], "ok": True}


def test_failing_child_is_one_line_naming_it_and_its_error():
    code = "import sys\nprint('hint: check the spec', file=sys.stderr)\nraise ValueError('bad spec: 3')"
    with pytest.raises(ChildError) as info:
        run_child([*PY, code], "benchmark forward")
    assert str(info.value) == "benchmark forward failed: ValueError: bad spec: 3"
    assert "Traceback" in info.value.stderr  # all it wrote, for whoever wants it


def test_the_error_line_wins_over_a_hint_printed_after_it():
    code = ("import sys\nprint('RuntimeError: out of memory', file=sys.stderr)\n"
            "print('(try a smaller batch)', file=sys.stderr)\nsys.exit(1)")
    with pytest.raises(ChildError, match=r"^sweep failed: RuntimeError: out of memory$"):
        run_child([*PY, code], "sweep")


def test_child_without_a_result_line_fails():
    with pytest.raises(ChildError, match=r"^quiet failed: \(no output\)$"):
        run_child([*PY, "print('no result here')"], "quiet")
    with pytest.raises(ChildError, match=r"^killed failed: exit status 3$"):
        run_child([*PY, "import sys; sys.exit(3)"], "killed")
