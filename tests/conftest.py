"""Shared test setup."""

from __future__ import annotations

import pytest
import torch

from unetrpp.network.dual import reference_enabled


@pytest.fixture(autouse=True)
def _no_leaked_global_state():
    """Fail a test that leaves process-wide torch or unetrpp state changed (it would leak into others)."""
    threads = torch.get_num_threads()
    yield
    assert torch.is_grad_enabled(), "the test (or the code under test) left autograd disabled"
    assert not reference_enabled(), "the test left reference_math() switched on"
    torch.set_num_threads(threads)
