"""The one user-facing error type (the CLI prints it as a single ``error:`` line and exits 1)
and the did-you-mean hint its messages give for an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MtkitError(Exception):
    """Bad input or a failed precondition the user can fix (a file, key or value is named)."""


def did_you_mean(name: str, choices: Iterable[str], listing: str | None = "valid") -> str:
    """The hint after an unknown ``name``: ``; did you mean 'x'?`` with the closest of
    ``choices``, else ``; <listing>: a, b, c`` (``choices`` in the order given), or nothing
    when ``listing`` is None."""
    choices = list(choices)
    if close := difflib.get_close_matches(name, choices, n=1, cutoff=0.5):
        return f"; did you mean '{close[0]}'?"
    return f"; {listing}: {', '.join(choices)}" if listing is not None else ""


def unknown_name(what: str, name: str, choices: Iterable[str], listing: str = "valid") -> str:
    """``unknown <what> '<name>'`` and the :func:`did_you_mean` hint."""
    return f"unknown {what} '{name}'{did_you_mean(name, choices, listing)}"
