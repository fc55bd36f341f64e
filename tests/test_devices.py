"""Device resolution: clear errors for absent accelerators, a notice when auto falls back."""

import pytest
import torch

from ctp2mri.devices import available_devices, resolve_device, resolve_device_with_notice
from ctp2mri.errors import InputError


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    device, notice = resolve_device_with_notice("auto")
    if torch.cuda.is_available():
        assert device.type == "cuda" and notice is None
    elif device.type == "cpu":
        assert "CPU" in notice
    assert resolve_device(None) == device


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_a_clear_error(spec):
    with pytest.raises(InputError) as err:
        resolve_device(spec)
    message = str(err.value)
    assert spec in message and "no usable CUDA GPU" in message
    assert "--device cpu" in message and "--device auto" in message and "cpu" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_falls_back_to_cpu_with_a_notice_and_lists_devices():
    if resolve_device("auto").type == "mps":
        pytest.skip("Apple GPU present")
    device, notice = resolve_device_with_notice("auto")
    assert device == torch.device("cpu") and "no CUDA or MPS GPU" in notice
    assert available_devices() == ["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_gpus_is_refused():
    with pytest.raises(InputError, match="only"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_mps_absent_and_unknown_specs():
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(InputError, match="--device cpu"):
            resolve_device("mps")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(InputError, match="unknown device"):
            resolve_device(bad)
