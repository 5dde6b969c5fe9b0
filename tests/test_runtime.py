"""runtime: device, mixed precision and autocast resolved in one place."""

from __future__ import annotations

import contextlib

import pytest
import torch

from unetrpp.errors import UserError
from unetrpp.runtime import AMP_MODES, autocast, peak_memory_mb, resolve_amp, resolve_device, synchronizer

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("spec", ["auto", None])
def test_auto_is_cuda_where_available_else_the_cpu(spec):
    assert resolve_device(spec) == torch.device("cuda" if CUDA else "cpu")


def test_named_devices_are_kept():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("cpu", kinds=("cpu", "cuda")).type == "cpu"


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", "cpu cpu"])
def test_a_name_torch_does_not_know_is_a_user_error(spec):
    with pytest.raises(UserError, match=r"device must be cpu, cuda, cuda:N or auto"):
        resolve_device(spec)


def test_a_device_type_outside_the_allowed_kinds_is_a_user_error():
    with pytest.raises(UserError, match=r"^device must be cpu, cuda, cuda:N or auto, got 'meta'$"):
        resolve_device("meta", kinds=("cpu", "cuda"))


@pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_user_error(spec):
    with pytest.raises(UserError, match="no CUDA device is available"):
        resolve_device(spec)


@pytest.mark.parametrize("amp", ["auto", None])
def test_auto_amp_is_off_on_the_cpu(amp):
    assert resolve_amp(amp, "cpu") == "off"
    assert resolve_amp(amp, torch.device("cpu")) == "off"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_auto_amp_on_cuda_is_bf16_where_supported():
    assert resolve_amp("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert resolve_amp("fp16", "cuda") == "fp16"


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_explicit_amp_modes_are_kept_on_the_cpu(amp):
    assert amp in AMP_MODES and resolve_amp(amp, "cpu") == amp


def test_fp16_on_the_cpu_and_unknown_modes_are_user_errors():
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(UserError, match=r"amp must be one of off, bf16, fp16 or auto, got 'fp8'"):
        resolve_amp("fp8", "cpu")


def test_autocast_off_is_a_null_context_and_bf16_casts_matmuls():
    assert isinstance(autocast("cpu", "off"), contextlib.nullcontext)
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    assert (a @ a).dtype == torch.float32


def test_autocast_refuses_fp16_on_the_cpu_and_unknown_modes():
    with pytest.raises(UserError, match="fp16 autocast needs a CUDA device"):
        autocast("cpu", "fp16")
    with pytest.raises(UserError, match="amp must be off, bf16 or fp16, got 'auto'"):
        autocast("cpu", "auto")


def test_cpu_needs_no_synchronizer_and_reports_the_peak_resident_set():
    assert synchronizer("cpu") is None
    assert peak_memory_mb("cpu") > 1.0


@pytest.mark.parametrize("spec", ["mps", "meta", "xla"])
def test_devices_the_package_does_not_run_on_are_refused_by_default(spec):
    with pytest.raises(UserError, match="device must be cpu, cuda, cuda:N or auto"):
        resolve_device(spec)
