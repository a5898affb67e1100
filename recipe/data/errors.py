"""The one exception type of the data pipeline.

Every data error is a ``DataError`` (a ``ValueError``) whose message is ONE line
that says what is wrong and how to fix it, so the CLI can print it to stderr
without a traceback and a user can act on it.
"""

from __future__ import annotations

from recipe.errors import RecipeError


class DataError(RecipeError):
    """Bad data input or on-disk state; the message names the problem and the fix."""

    def __init__(self, message: str) -> None:
        # Messages may quote user data (file names, JSON snippets): keep them on one line.
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))
