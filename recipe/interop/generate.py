"""Sample text from a checkpoint: greedy (temperature 0) or temperature + top-p, with a KV cache.

The prompt runs through the model once, filling the cache; each new token then costs one
single-position forward pass (``Transformer.forward(..., cache=...)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from recipe.interop import InteropError
from recipe.interop.checkpoint import open_weights
from recipe.interop.weights import check_weights, load_model_args
from recipe.model import KVCache, ModelArgs, Transformer


def load_model(ckpt: str | os.PathLike, config: str | os.PathLike | None = None,
               averaged: str | None = None) -> Transformer:
    """A ``Transformer`` (fp32, CPU, eval mode) holding the weights of any recipe checkpoint."""
    source = open_weights(ckpt, averaged)
    args = load_model_args(config) if config is not None else source.args
    if args is None:
        raise InteropError(f"{ckpt} records no model architecture; pass --config with the run's YAML config "
                           "(model.arch) or a model_args.json")
    infos = source.infos()
    check_weights({n: i.shape for n, i in infos.items()}, args, source.description,
                  "pass --config with the model.arch the checkpoint was trained with")
    with torch.device("meta"):
        model = Transformer(args)
    state = {name: tensor.float() for name, tensor in source.read(list(infos)).items()}
    model.load_state_dict(state, strict=True, assign=True)  # assign: no second copy of the weights
    model.init_buffers(torch.device("cpu"))
    return model.eval()


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token id from ``[vocab]`` logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        pick = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (),
             vocab_limit: int | None = None) -> list[int]:
    """Up to ``max_new_tokens`` ids after ``prompt``, stopping after any of ``stop_ids``.

    ``vocab_limit`` keeps sampling inside the tokenizer when the model's vocabulary is padded.
    """
    args: ModelArgs = model.args
    if not prompt:
        raise InteropError("the prompt is empty; pass some text with --prompt")
    total = len(prompt) + max_new_tokens
    if total > args.max_seq_len:
        raise InteropError(f"the prompt ({len(prompt)} tokens) plus --max-new-tokens {max_new_tokens} exceed the "
                           f"model's max_seq_len {args.max_seq_len}; ask for fewer new tokens")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(args, batch_size=1, max_len=total, device=device, dtype=next(model.parameters()).dtype)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        if vocab_limit is not None:
            logits = logits[:vocab_limit]
        token = sample(logits.cpu(), temperature, top_p, generator)
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return out
