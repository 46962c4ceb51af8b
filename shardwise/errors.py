"""The one user-facing error type.

Anything a user can get wrong (a name, a file, a number, an impossible plan) raises
ShardwiseError with one line that says what is wrong and what to do. The CLI prints it
without a traceback and exits with code 2.
"""

from __future__ import annotations

import difflib


class ShardwiseError(Exception):
    """A user error: one line, what is wrong and how to fix it."""

    exit_code = 2


def closest(name: str, choices, n: int = 3) -> str:
    """'did you mean a, b?' text for an unknown name, or the list of valid names."""
    choices = sorted(choices)
    near = difflib.get_close_matches(name.lower(), choices, n=n, cutoff=0.4)
    if near:
        return "did you mean " + ", ".join(near) + "?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"known: {shown}"
