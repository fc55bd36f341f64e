"""``ctp2mri doctor`` on this machine, with a mocked list of CUDA devices, and the torch-build traps."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

from ctp2mri.cli import main
from ctp2mri.doctor import bf16_peak_tflops, diagnose, format_doctor

GiB = 1024**3
SMI_QUERY = "NVIDIA H100 80GB HBM3, 550.54.15, 81559 MiB\nTesla T4, 550.54.15, 15360 MiB\n"
SMI_PLAIN = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |\n"


def _fake_smi(query: str = SMI_QUERY, plain: str = SMI_PLAIN):
    def run(argv, **_):
        out = query if any(a.startswith("--query-gpu") for a in argv) else plain
        return subprocess.CompletedProcess(argv, 0, stdout=out, stderr="")
    return (lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None), run


@pytest.fixture
def two_gpus(monkeypatch):
    """torch sees an H100 (60 of 80 GiB free) and a T4 (no bf16, 1 of 15 GiB free)."""
    props = [SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * GiB,
                             multi_processor_count=132),
             SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * GiB, multi_processor_count=40)]
    free = [60 * GiB, 1 * GiB]
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (free[i], props[i].total_memory))


def test_doctor_on_this_machine(capsys):
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "--device auto → " in text and "problems:" in text
    if not torch.cuda.is_available():
        assert "CUDA: not available" in text and "bf16: not used here" in text
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert report["torch"]["version"] == torch.__version__
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert report["cpu"]["cores"] >= 1 and report["auto"]["device"]


def test_mocked_cuda_devices_are_listed_with_memory_bf16_and_the_auto_choice(two_gpus):
    which, run = _fake_smi()
    report = diagnose(which=which, run=run)
    h100, t4 = report["cuda"]["devices"]
    assert report["cuda"]["available"] and report["cuda"]["device_count"] == 2
    assert h100["free_bytes"] == 60 * GiB and h100["total_bytes"] == 80 * GiB and h100["bf16"]
    assert h100["bf16_peak_tflops"] == 989.0 and not t4["bf16"] and t4["bf16_peak_tflops"] is None
    assert report["auto"]["device"] == "cuda:0" and "H100" in report["auto"]["why"]
    assert "torchrun --nproc_per_node 2" in report["auto"]["why"]
    assert report["nvidia_smi"]["driver"] == "550.54.15" and report["nvidia_smi"]["cuda"] == "12.4"
    problems = " | ".join(report["problems"])
    assert "CPU build" not in problems
    assert "cuda:1 (Tesla T4, compute capability 7.5) has no bf16" in problems
    assert "cuda:1 has only 1.0 GiB free of 15.0 GiB" in problems and "cuda:0 has only" not in problems
    text = format_doctor(report)
    assert "cuda:0: NVIDIA H100 80GB HBM3, compute capability 9.0, 60.0 GiB free of 80.0 GiB, bf16 yes" in text
    assert "cuda:1: Tesla T4" in text and "bf16 no" in text
    assert "bf16: supported on cuda:0" in text and "--device auto → cuda:0" in text


def test_cpu_build_of_torch_on_a_gpu_machine_is_called_out(monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    which, run = _fake_smi()
    monkeypatch.setattr("shutil.which", which)
    monkeypatch.setattr("subprocess.run", run)
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    base = torch.__version__.split("+")[0]
    assert "you installed the CPU build of torch" in text and "driver 550.54.15, CUDA 12.4" in text
    assert f"--force-reinstall torch=={base} --index-url https://download.pytorch.org/whl/cu124" in text
    assert "NVIDIA H100 80GB HBM3 (81559 MiB)" in text


def test_a_driver_older_than_torchs_cuda_and_hidden_gpus(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    which, run = _fake_smi(plain=SMI_PLAIN.replace("12.4", "12.2"))
    problems = diagnose(which=which, run=run)["problems"]
    assert len(problems) == 1 and "needs a newer NVIDIA driver" in problems[0] and "whl/cu122" in problems[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "hides every GPU" in diagnose(which=which, run=run)["problems"][0]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    problems = diagnose(which=lambda name: None, run=run)["problems"]  # no driver at all
    assert len(problems) == 1 and "no NVIDIA driver answers" in problems[0]


def test_datasheet_bf16_peaks_by_name():
    assert bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bf16_peak_tflops("NVIDIA L4") == 121.0 and bf16_peak_tflops("NVIDIA L40S") == 362.0
    assert bf16_peak_tflops("Tesla T4") is None
