"""The one exception type the data layer raises for problems with files on disk or their selection, and how its
messages list files."""

from __future__ import annotations

from collections.abc import Sequence

from deeploc.errors import DeeplocError

LIST_LIMIT = 20


class DatasetError(DeeplocError, ValueError):
    """A dataset is missing, incomplete, malformed or cannot provide the requested split.

    Messages name the paths involved and, where there is one, the fix.
    """


def format_list(items: Sequence[object], limit: int = LIST_LIMIT) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    if len(items) > limit:
        shown += f" (+{len(items) - limit} more)"
    return shown


def format_problems(problems: Sequence[str], limit: int | None = None) -> str:
    """One problem a line, each as ``  - problem`` after a newline (the first ``limit`` of them, and how many more)."""
    shown = "".join(f"\n  - {p}" for p in problems[:limit])
    return shown + (f"\n  (+{len(problems) - limit} more)" if limit is not None and len(problems) > limit else "")
