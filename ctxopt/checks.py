"""Checks of user-supplied values, raising :class:`ctxopt.errors.InputError` with a message that says what
to pass instead."""
from __future__ import annotations

import numbers
from typing import Any

from .errors import InputError


def _describe(minimum: int | None, maximum: int | None, odd: bool) -> str:
    kind = "an odd int" if odd else "an int"
    if minimum is not None and maximum is not None:
        return f"{kind} in {minimum}..{maximum}"
    if minimum is not None:
        return f"{kind} >= {minimum}"
    if maximum is not None:
        return f"{kind} <= {maximum}"
    return kind


def _example(value: Any, minimum: int | None, maximum: int | None, odd: bool) -> int | None:
    """A valid value near ``value`` (or the smallest valid one) to suggest; None when no int is valid."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value and abs(value) < 1e18:
        guess = round(value)
    else:
        guess = minimum if minimum is not None else maximum if maximum is not None else 1
    if minimum is not None:
        guess = max(guess, minimum)
    if maximum is not None:
        guess = min(guess, maximum)
    if odd and guess % 2 == 0:
        guess += 1 if maximum is None or guess + 1 <= maximum else -1
    if (minimum is not None and guess < minimum) or (maximum is not None and guess > maximum):
        return None
    return guess


def require_int(value: Any, what: str, minimum: int | None = None, maximum: int | None = None,
                odd: bool = False) -> int:
    """``value`` as an ``int`` when it is a whole number (a bool is not one) within ``minimum``..``maximum``
    (each bound optional, inclusive) and odd if ``odd``; otherwise an InputError naming ``what`` (the option or
    argument, e.g. "gemfilter: kernel"), the values it takes and a valid example."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
        if ((minimum is None or number >= minimum) and (maximum is None or number <= maximum)
                and (not odd or number % 2 == 1)):
            return number
    example = _example(value, minimum, maximum, odd)
    suggestion = f" (e.g. {example})" if example is not None else ""
    raise InputError(f"{what} must be {_describe(minimum, maximum, odd)}{suggestion}; got {value!r}.")


def parse_budget(text: str | None) -> int | float | None:
    """A ``--budget`` as typed: '512' -> 512 tokens; '0.25' -> a ratio of the context; None -> None."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise InputError(f"--budget must be a token count (512) or a ratio (0.25); got {text!r}.") from None
