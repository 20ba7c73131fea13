"""The one exception type the data layer raises for problems with files on disk or their selection."""

from __future__ import annotations

from deeploc.errors import DeeplocError


class DatasetError(DeeplocError, ValueError):
    """A dataset is missing, incomplete, malformed or cannot provide the requested split.

    Messages name the paths involved and, where there is one, the fix.
    """
