"""deeploc's own error type: a problem the user can fix, reported as one message without a traceback."""

from __future__ import annotations


class DeeplocError(Exception):
    """Base of every error deeploc raises for bad input; the message names the file or key and the fix."""
