"""parallel.parallel_map: the package's one pool-or-loop."""

from __future__ import annotations

import os

import pytest

from unetrpp.errors import UserError
from unetrpp.parallel import parallel_map


def _square_and_pid(x: int, delay: float) -> tuple[int, int]:
    import time

    time.sleep(delay)
    return x * x, os.getpid()


def _fails_on(x: int, bad: int) -> int:
    if x >= bad:
        raise UserError(f"case {x}: unreadable")
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_results_keep_the_order_of_the_jobs(workers):
    # later jobs finish first: the order is still the jobs'
    jobs = [(x, 0.05 * (4 - x)) for x in range(5)]
    out = parallel_map(_square_and_pid, jobs, workers)
    assert [r for r, _ in out] == [0, 1, 4, 9, 16]
    pids = {pid for _, pid in out}
    if workers == 1:
        assert pids == {os.getpid()}  # in this process, no pool
    else:
        assert os.getpid() not in pids


@pytest.mark.parametrize("workers", [1, 2])
def test_the_first_failing_job_ends_the_call_with_its_error(workers):
    with pytest.raises(UserError, match=r"^case 2: unreadable$"):
        parallel_map(_fails_on, [(x, 2) for x in range(5)], workers, chunksize=2)


def test_one_job_or_none_runs_here(capsys):
    assert parallel_map(_square_and_pid, [(3, 0.0)], workers=4) == [(9, os.getpid())]
    assert parallel_map(_square_and_pid, [], workers=4) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_counts_the_cases_done_before_and_now(workers, capsys):
    parallel_map(_square_and_pid, [(x, 0.0) for x in range(3)], workers, progress=True, desc="preprocess", done=2)
    err = capsys.readouterr().err
    assert "preprocess" in err and "5/5" in err


@pytest.mark.parametrize("workers", [1, 2])
def test_jobs_without_arguments_run_once_each(workers):
    assert parallel_map(os.cpu_count, [(), (), ()], workers=workers) == [os.cpu_count()] * 3
