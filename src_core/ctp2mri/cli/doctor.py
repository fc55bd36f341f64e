"""``ctp2mri doctor``: the command-line wrapper of `ctp2mri.doctor`."""

from __future__ import annotations

import argparse


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ctp2mri.doctor import diagnose, format_doctor

    report = diagnose()
    if args.json:
        from ctp2mri.io.jsonfile import strict_json

        print(strict_json(report), end="")
    else:
        print(format_doctor(report))
    return 0


def add_doctor(sub: argparse._SubParsersAction) -> None:
    """Register the ``doctor`` subcommand."""
    p = sub.add_parser("doctor", help="torch, CUDA/MPS, GPUs, free memory, bf16: is this machine ready?",
                       description="What to know before a long run: the torch version and its build (CPU-only, "
                       "CUDA, cuDNN), whether CUDA and Apple MPS are available, every CUDA device with its free "
                       "and total memory and bf16 support, the NVIDIA driver, the device --device auto takes and "
                       "why, and the problems found (the CPU build of torch on a machine with an NVIDIA GPU, a "
                       "driver too old for torch's CUDA, hidden or busy GPUs) with what to do. Always exits 0.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_doctor)
