"""User-facing errors: bad config, data, tokenizer or checkpoint input.

The ``recipe`` command reports any ``RecipeError`` as one line naming the problem and the fix.
"""

from __future__ import annotations


class RecipeError(ValueError):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(RecipeError):
    """A configuration value that cannot work."""


class ModelConfigError(ConfigError):
    """A model configuration that cannot be built."""


USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError,)
