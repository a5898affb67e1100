"""Interoperability with the released Llama 3 formats.

* ``recipe import meta|hf SRC OUT`` (``meta.py``, ``hf.py``): Meta's ``consolidated.*.pth``
  shards or a Hugging Face Llama checkpoint -> a recipe weights directory that
  ``--model.init_weights_path`` loads under any parallel layout.
* ``recipe export CKPT OUT`` (``export.py``): any recipe checkpoint (``checkpoint.py`` reads
  every kind) -> Hugging Face safetensors, config and tokenizer files.
* ``recipe generate`` (``generate.py``): greedy or top-p sampling with a KV cache.

This package imports no submodule on import, so each command pulls in only what it uses
(``transformers`` is never needed at runtime).
"""

from __future__ import annotations

from recipe.errors import RecipeError


class InteropError(RecipeError):
    """A checkpoint, config or tokenizer that cannot be converted as given."""


class CheckpointError(InteropError):
    """Tensors missing, unknown, or shaped differently from the model config."""


class VocabularyError(InteropError):
    """A tokenizer whose vocabulary the model cannot represent."""


__all__ = ["InteropError", "CheckpointError", "VocabularyError"]
