"""How the benchmark words a failure: one line, whatever the exception."""

from __future__ import annotations


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line (whitespace collapsed), for results and error exits."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"
