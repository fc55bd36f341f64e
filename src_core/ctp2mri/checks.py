"""Validation of numeric settings, shared by the core functions and the CLI's option types.

A NaN passes every ``<``/``>`` comparison as False, so ``if eta < 0`` lets it through and a
NaN setting silently turns every output voxel into NaN. Every numeric setting therefore goes
through `number` (finite, in range) or `whole` (an integer, in range) before use.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

from ctp2mri.errors import InputError

__all__ = ["cli_number", "cli_whole", "number", "optional_number", "settings_with", "whole"]

_Settings = TypeVar("_Settings")


def _bound(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _range_text(minimum: float | None, maximum: float | None, above: float | None) -> str:
    parts = []
    if above is not None:
        parts.append(f"> {_bound(above)}")
    if minimum is not None:
        parts.append(f"≥ {_bound(minimum)}")
    if maximum is not None:
        parts.append(f"≤ {_bound(maximum)}")
    return " and ".join(parts)


def number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> float:
    """``value`` as a finite float within the bounds (``above`` is exclusive), else `InputError`."""
    wanted = _range_text(minimum, maximum, above)
    try:
        if isinstance(value, (bool, str)) or value is None:
            raise TypeError
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    ok = (math.isfinite(x) and (minimum is None or x >= minimum) and (maximum is None or x <= maximum)
          and (above is None or x > above))
    if not ok:
        raise InputError(f"{name} must be a finite number{' ' + wanted if wanted else ''}, got {value!r}")
    return x


def optional_number(value: Any, name: str, **bounds: float | None) -> float | None:
    """`number`, with None passed through (an unset option)."""
    return None if value is None else number(value, name, **bounds)


def whole(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int within the bounds; floats only when they are whole (3.0, not 2.5)."""
    wanted = _range_text(minimum, maximum, None)
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
        ok = math.isfinite(float(value)) and float(value).is_integer()
    if ok:
        n = int(value)
        ok = (minimum is None or n >= minimum) and (maximum is None or n <= maximum)
    if not ok:
        raise InputError(f"{name} must be a whole number{' ' + wanted if wanted else ''}, got {value!r}")
    return int(value)


# argparse option types: the same checks, reported as argparse's one-line "argument --x: …" -----
def cli_number(**bounds: float | None) -> Callable[[str], float]:
    """An argparse ``type`` accepting a finite number within ``bounds`` (see `number`)."""
    def parse(text: str) -> float:
        try:
            return number(float(text), "the value", **bounds)
        except ValueError:  # float() of a word, or InputError (a ValueError) from `number`
            wanted = _range_text(bounds.get("minimum"), bounds.get("maximum"), bounds.get("above"))
            raise argparse.ArgumentTypeError(
                f"expected a finite number{' ' + wanted if wanted else ''}, got {text!r}") from None

    parse.__name__ = "number"
    return parse


def cli_whole(**bounds: int | None) -> Callable[[str], int]:
    """An argparse ``type`` accepting a whole number within ``bounds`` (see `whole`)."""
    def parse(text: str) -> int:
        try:
            return whole(int(text.strip()), "the value", **bounds)
        except ValueError:
            wanted = _range_text(bounds.get("minimum"), bounds.get("maximum"), None)
            raise argparse.ArgumentTypeError(
                f"expected a whole number{' ' + wanted if wanted else ''}, got {text!r}") from None

    parse.__name__ = "whole number"
    return parse


def settings_with(cls: type[_Settings], settings: _Settings | None, options: dict[str, Any],
                  caller: str) -> _Settings:
    """What a function called as ``caller(…, settings, **options)`` is asked to do: ``settings``
    (``cls()`` when None), a frozen settings dataclass, with the fields named in ``options``
    replaced and checked again.

    Raises
    ------
    TypeError
        ``settings`` is not a ``cls``, or a key of ``options`` is not one of its fields (as for
        any unexpected keyword of ``caller``).
    InputError
        The result holds a bad value.
    """
    if settings is not None and not isinstance(settings, cls):
        raise TypeError(f"{caller}() takes a {cls.__name__}, got a {type(settings).__name__}")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments: {', '.join(unknown)}")
    return dataclasses.replace(settings or cls(), **options)
