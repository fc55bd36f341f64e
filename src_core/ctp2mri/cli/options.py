"""Option types and arguments shared by the ``ctp2mri`` commands.

Every number is checked (finite, in range) by its type before a command starts, so a NaN or an
out-of-range value is refused with a usage error instead of failing mid-run.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ctp2mri.checks import cli_number, cli_whole
from ctp2mri.settings import PRECISIONS, SAMPLER_STEPS

if TYPE_CHECKING:
    from ctp2mri.synthesis.sample_settings import SampleSettings

STEPS_HELP = "denoising steps (default: " + ", ".join(f"{k} {v}" for k, v in SAMPLER_STEPS.items()) + ")"

COUNT = cli_whole(minimum=1)
SEED = cli_whole(minimum=0, maximum=2**63 - 1)
FRAMES = cli_whole(minimum=2)
POSITIVE = cli_number(above=0.0)
NONNEGATIVE = cli_number(minimum=0.0)
FRACTION = cli_number(minimum=0.0, maximum=1.0)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """``--device`` as the commands that run a network document it."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")


def add_precision_argument(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """``--precision``: one of the autocast precisions, fp32 unless given."""
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help=help_text)


def sample_settings(args: argparse.Namespace) -> SampleSettings:
    """``synthesize``'s sampling options as a `SampleSettings` (one CTP and a cohort alike)."""
    from ctp2mri.synthesis.sample_settings import SampleSettings

    return SampleSettings(sampler=args.sampler, steps=args.steps, eta=args.eta, samples=args.samples,
                          seed=args.seed, batch_size=args.batch_size, precision=args.precision,
                          core_threshold=args.core_threshold)
