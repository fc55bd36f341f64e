"""`ctp2mri` command line: a thin wrapper, one subcommand per core function.

This module builds the top-level parser from the command modules beside it (each adds its
subcommands with an ``add_*`` function) and runs the chosen command.

Every failure the user can act on, a usage error included, is printed as one line without a
traceback (`ctp2mri.errors.user_message`); Ctrl-C and SIGTERM end a command cleanly (see
`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

from ctp2mri.cli.bench import add_bench
from ctp2mri.cli.cases import add_cases
from ctp2mri.cli.doctor import add_doctor
from ctp2mri.cli.evaluation import add_evaluate
from ctp2mri.cli.importing import add_import
from ctp2mri.cli.perfusion import add_perfusion
from ctp2mri.cli.recipes import add_recipes
from ctp2mri.cli.synthesis import add_synthesize
from ctp2mri.cli.training import add_training
from ctp2mri.errors import Cancelled, InputError, user_message
from ctp2mri.interrupts import exit_code, handle_interrupts
from ctp2mri.progress import CancelToken
from ctp2mri.settings import SAMPLER_STEPS, sampler_steps


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the CLI (argparse adds the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ctp2mri",
        description="Synthesise diffusion MRI (DWI, ADC) from CT perfusion with a lesion-aware "
        "latent diffusion model.")
    from ctp2mri import __version__

    parser.add_argument("--version", action="version", version=f"ctp2mri {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_recipes, add_cases, add_training, add_synthesize, add_perfusion, add_import, add_evaluate,
                add_bench, add_doctor):
        add(sub)
    return parser


# running a command ---------------------------------------------------------------------------
#: Commands whose first Ctrl-C/SIGTERM lets the current training step finish and saves a checkpoint,
#: with the flag that continues them (None: the same command again continues).
_RESUMABLE = {"train-autoencoder": "--resume", "train-ldm": "--resume", "post-train": "--resume",
              "train-pix2pix": "--resume", "ablate": None, "train-demo": None,
              "import-isles24": None, "import-bids": None}


def _claimed_output(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The command's --out, held for the whole run, so that a second run into the same place is
    refused at once instead of overwriting this one's result. Under torchrun only rank 0 writes."""
    out = getattr(args, "out", None)
    if out is None or getattr(args, "plan", False) or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    from ctp2mri.io.atomic import claim_output

    return claim_output(out)


def _saved_step(folder: Path | None) -> int | None:
    """Step of the resumable checkpoint in ``folder``, or None (read without importing torch)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        return int(config["provenance"]["steps"]) if "training_state" in config else None
    except (OSError, TypeError, ValueError, KeyError):
        return None


def _again(command: str, argv: list[str]) -> str:
    """The command line that continues an interrupted run."""
    flag = _RESUMABLE[command]
    words = ["ctp2mri", *argv] + ([flag] if flag and flag not in argv else [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return shlex.join(words) + (f" (under torchrun with {world} processes, as before)" if world > 1 else "")


def _interrupted(args: argparse.Namespace, argv: list[str], exc: BaseException) -> str:
    """What an interrupted command says: what was kept, and for training how to continue."""
    if args.command not in _RESUMABLE:
        return "interrupted; no partial output was kept"
    if isinstance(exc, Cancelled) and exc.checkpoint is not None:
        where, step = exc.checkpoint, exc.step
    else:
        where = getattr(args, "out", None)
        step = _saved_step(where) if _RESUMABLE[args.command] else None
    if step is None and _RESUMABLE[args.command]:
        return "interrupted before the first checkpoint; nothing to resume (run the command again to start over)"
    saved = f"the checkpoint in {where} (step {step}) keeps the run" if step is not None else \
        "finished runs and checkpoints are kept"
    return f"interrupted; {saved}. Continue with: {_again(args.command, argv)}"


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    name = f"ctp2mri {args.command}"
    args.cancel = CancelToken() if args.command in _RESUMABLE else None
    received: list[int] = []

    def finishing(signum: int) -> None:
        received.append(signum)
        print(f"\n{name}: stopping after the current step to save a checkpoint (interrupt again to stop at once, "
              "losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    try:
        with handle_interrupts(args.cancel, finishing), _claimed_output(args):
            return int(args.func(args) or 0)
    except (Cancelled, KeyboardInterrupt) as exc:
        print(f"{name}: {_interrupted(args, argv, exc)}", file=sys.stderr)
        return exit_code(exc) if isinstance(exc, KeyboardInterrupt) else 128 + (received or [2])[0]
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise  # a bug: its traceback is the useful report
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, InputError) else 1


def main(argv: list[str] | None = None) -> int:
    """Run one ``ctp2mri`` command line; returns the exit status.

    0: done. 2: an error the user can fix (bad input, options or usage); 1: the system refused
    (full disk, no permission, out of memory); both print one line on stderr, no traceback.
    130 (Ctrl-C) or 143 (SIGTERM): interrupted; temporary files are removed, a training run
    first saves a checkpoint and says how to resume it. Any other error is a bug and keeps its
    traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return 130  # Ctrl-C while starting up: nothing ran, nothing to report
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "sampler", None) in SAMPLER_STEPS and getattr(args, "steps", 0) is None:
        args.steps = sampler_steps(args.sampler)  # a sampling command without --steps
    try:
        return _run(args, argv)
    except KeyboardInterrupt as exc:  # a second signal while the first was being reported
        return exit_code(exc)

