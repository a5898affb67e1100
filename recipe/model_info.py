"""What a config's model is: ``ModelArgs`` from a ``recipe fit`` YAML, and its shapes and sizes.

Shared by the commands that read a model from a config without training it (``recipe
info``, ``recipe plan``, ``recipe import``/``export``/``generate``), so none of them
imports another command's module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from recipe.config import ModelArgs, RopeScaling, read_yaml
from recipe.errors import ConfigError

__all__ = ["describe_model", "model_args_from_config", "training_summary"]


def _model_section(config: dict[str, Any]) -> dict[str, Any]:
    model = config.get("model") or {}
    if "init_args" in model:  # subclass-mode configs
        model = model["init_args"] or {}
    return model


def model_args_from_config(path: str | os.PathLike) -> ModelArgs:
    """``ModelArgs`` from the ``model.arch`` section of a ``recipe fit`` YAML config."""
    config = read_yaml(path)
    arch = dict(_model_section(config).get("arch") or {})
    if isinstance(arch.get("rope_scaling"), dict):
        arch["rope_scaling"] = RopeScaling(**arch["rope_scaling"])
    known = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(set(arch) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown model.arch keys {unknown}; valid keys are {sorted(known)}")
    return ModelArgs(**arch)


def describe_model(args: ModelArgs) -> str:
    """Shapes and exact parameter counts, built on the meta device (instant at 405B)."""
    from recipe.model import build_meta_model, count_parameters

    model = build_meta_model(args)
    total = count_parameters(model)
    embed = model.tok_embeddings.weight.numel()
    head = model.output.weight.numel()
    block = count_parameters(model.layers["0"])
    rows = [
        ("tok_embeddings", tuple(model.tok_embeddings.weight.shape), embed),
        (f"layers x {args.n_layers}", f"{block:,} each", block * args.n_layers),
        ("  attention.wq", tuple(model.layers["0"].attention.wq.weight.shape), None),
        ("  attention.wk / wv", tuple(model.layers["0"].attention.wk.weight.shape), None),
        ("  attention.wo", tuple(model.layers["0"].attention.wo.weight.shape), None),
        ("  feed_forward.w1 / w3", tuple(model.layers["0"].feed_forward.w1.weight.shape), None),
        ("  feed_forward.w2", tuple(model.layers["0"].feed_forward.w2.weight.shape), None),
        ("norm", tuple(model.norm.weight.shape), model.norm.weight.numel()),
        ("output (untied)", tuple(model.output.weight.shape), head),
    ]
    lines = [
        f"Llama 3 transformer: {args.n_layers} layers, dim {args.dim}, FFN {args.ffn_hidden_dim}, "
        f"{args.n_heads} heads / {args.n_kv_heads} KV heads (head dim {args.head_dim}), "
        f"vocab {args.vocab_size}, RoPE theta {args.rope_theta:g}"
        + (f" (3.1 scaling x{args.rope_scaling.factor:g})" if args.rope_scaling else "")
        + f", max seq {args.max_seq_len}",
        "",
        f"{'module':<24}{'shape':>24}{'parameters':>20}",
    ]
    for name, shape, count in rows:
        lines.append(f"{name:<24}{str(shape):>24}{'' if count is None else f'{count:,}':>20}")
    non_embedding = total - embed
    lines += [
        "",
        f"total parameters        {total:,} ({total / 1e9:.2f}B)",
        f"non-embedding           {non_embedding:,}",
        f"training FLOPs / token  {6 * non_embedding:,} (6N, matmuls without attention scores)",
    ]
    return "\n".join(lines)


def training_summary(args: ModelArgs, seq_lens: Sequence[int]) -> str:
    """Two lines for the start of training: exact parameter counts, and training FLOPs per token
    at each sequence length (``recipe.flops.flops_per_token``, the count behind ``train/mfu``)."""
    from recipe.flops import flops_per_token
    from recipe.model import build_meta_model, count_parameters

    model = build_meta_model(args)
    total = count_parameters(model)
    embed = model.tok_embeddings.weight.numel()
    lines = [
        f"model: Llama 3, {args.n_layers} layers, dim {args.dim}, {args.n_heads} / {args.n_kv_heads} heads, "
        f"vocab {args.vocab_size:,}: {total:,} parameters ({total / 1e6:,.1f} M; {total - embed:,} without "
        "the embedding)"
    ]
    if seq_lens:
        flops = ", ".join(f"{flops_per_token(args, n):.3g} at seq_len {n}" for n in sorted(set(seq_lens)))
        lines.append(f"training FLOPs per token: {flops} (6 x matmul weights + causal attention)")
    return "\n".join(lines)
