"""The `ctp2mri` command line: a thin wrapper over the core."""

from ctp2mri.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
