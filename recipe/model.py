"""The Llama 3 dense transformer, readable top to bottom.

Parameter names follow Meta's release (``tok_embeddings``, ``layers.{i}.attention.wq`` ...),
so a released checkpoint loads with ``strict=True``. The model knows nothing about
parallelism: tensor, context and pipeline parallelism are applied from outside
(``recipe/parallel``), which is why the blocks live in an ``nn.ModuleDict`` keyed by the
global layer index (a pipeline stage keeps a subset, names and checkpoints unchanged) and
why the embedding, final norm and output head may be ``None`` on stages that do not own them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recipe.attention import AttentionPlan, attend, document_causal_mask
from recipe.config import ModelArgs, RopeScaling
from recipe.errors import ModelConfigError

__all__ = ["ModelArgs", "RopeScaling", "Transformer", "AttentionPlan", "document_causal_mask"]


# ----------------------------------------------------------------------------- RoPE


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies, with the optional 3.1 scaling for long context."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return freqs.float()
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    # Long wavelengths are stretched by `factor`, short ones kept; in between, interpolate.
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    scaled = torch.where(mid, (1 - smooth) * freqs / s.factor + smooth * freqs, scaled)
    return scaled.float()


def rope_cache(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """``[max_seq_len, head_dim // 2, 2]`` table of (cos, sin) per position and pair."""
    freqs = rope_frequencies(args).to(device)
    positions = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head - Meta's interleaved layout.

    x: [batch, seq, heads, head_dim]; rope: [batch or 1, seq, head_dim // 2, 2].
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations keep their precision, as Meta does.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    """Grouped-query attention: ``n_kv_heads`` K/V heads shared by groups of query heads."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.backend = args.attention
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: AttentionPlan,
                cache: LayerCache | None = None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # -1 instead of n_heads: under tensor parallelism each rank holds a slice of heads.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:  # decoding: the new queries also attend to every earlier position
            k, v = cache.append(k, v)
        return self.wo(self.attend(q, k, v, plan).reshape(bsz, seqlen, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        """Causal same-document attention on ``[batch, seq, heads, head_dim]`` tensors.

        A separate method so context parallelism can all-gather K/V first. GQA needs no K/V
        copies: every backend maps query-head groups onto their K/V head itself.
        """
        return attend(q, k, v, plan, self.backend)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: AttentionPlan,
                cache: LayerCache | None = None) -> torch.Tensor:
        # `cache` by keyword: the tensor-parallel plan lays out the positional inputs only.
        h = x + self.attention(self.attention_norm(x), rope, plan, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- KV cache


class LayerCache:
    """One block's keys and values (after RoPE) of the positions decoded so far."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.keys = torch.zeros(batch_size, max_len, n_kv_heads, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' ``[batch, seq, n_kv_heads, head_dim]`` K/V; all cached K/V."""
        end = self.length + k.shape[1]
        self.keys[:, self.length:end] = k
        self.values[:, self.length:end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


class KVCache:
    """Keys and values of every block, for incremental decoding (inference only).

    ``Transformer.forward(new_tokens, cache=cache)`` places the new tokens after the cached
    ones; training never builds a cache, so its path is unchanged.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        if max_len > args.max_seq_len:
            raise ModelConfigError(f"a cache of {max_len} positions exceeds model.max_seq_len={args.max_seq_len}; "
                                   "shorten the prompt or the number of new tokens")
        self.max_len = max_len
        self.layers = {str(i): LayerCache(batch_size, max_len, args.n_kv_heads, args.head_dim, device, dtype)
                       for i in range(args.n_layers)}

    @property
    def length(self) -> int:
        """Positions cached so far."""
        return next(iter(self.layers.values())).length


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Token ids (+ optional document ids and positions) -> next-token logits."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        # Not persistent: derived from args, so checkpoints carry weights only.
        self.register_buffer("rope", rope_cache(args), persistent=False)

    def init_buffers(self, device: torch.device | None = None) -> None:
        """Recompute the derived (non-persistent) RoPE table, e.g. after ``to_empty``."""
        self.rope = rope_cache(self.args, device=device or self.rope.device)

    def init_weights(self, buffer_device: torch.device | None = None,
                     generator_for: Callable[[str], torch.Generator | None] | None = None) -> None:
        """(Re)initialise every parameter; call after ``to_empty`` when built on meta.

        ``generator_for(name)`` may give each parameter its own random stream (None: the
        global one); the parallel code uses it to make the initial weights independent of
        the layout.
        """
        self.init_buffers(buffer_device)
        with torch.no_grad():
            for name, param in self.named_parameters():
                init_parameter(self.args, name, param, generator_for(name) if generator_for else None)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, attention: AttentionPlan | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens: [batch, seq] ids (or hidden states on a later pipeline stage).

        attention: the micro-batch's ``AttentionPlan`` (document layout and query positions,
            built on the host); training passes one so that no forward waits on the device.
        doc_ids, positions: the direct-call alternative - ``[batch, seq]`` document of each
            token (None: one document per row) and the queries' RoPE positions (None:
            ``0..seq-1``); a plan is built from them (device tensors are copied to the host).
        cache: inference only - the new tokens follow the cached positions and attend to them
            (one document).
        """
        bsz, seqlen = tokens.shape[:2]
        if cache is not None:
            start = cache.length
            if start + seqlen > cache.max_len:
                raise ModelConfigError(f"{start + seqlen} positions exceed the KV cache's {cache.max_len}")
            attention = AttentionPlan(torch.zeros(bsz, start + seqlen, dtype=torch.long),
                                      np.arange(start, start + seqlen))
        elif attention is None:
            if positions is None and seqlen > self.args.max_seq_len:
                raise ModelConfigError(
                    f"sequence length {seqlen} exceeds model.max_seq_len={self.args.max_seq_len}; "
                    "raise max_seq_len or shorten the data's seq_len"
                )
            attention = AttentionPlan.from_inputs(bsz, seqlen, doc_ids, positions)
        if attention.kv_len > self.args.max_seq_len:
            raise ModelConfigError(f"sequence length {attention.kv_len} exceeds model.max_seq_len="
                                   f"{self.args.max_seq_len}; raise max_seq_len or shorten the data's seq_len")
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        rope = self.rope[attention.positions(self.rope.device)].unsqueeze(0)
        for key, layer in self.layers.items():
            h = layer(h, rope, attention, cache=None if cache is None else cache.layers[key])
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h


def init_parameter(args: ModelArgs, name: str, tensor: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """The initial value of parameter ``name`` (torchtitan's scheme), written into ``tensor``.

    Embedding N(0, 1); output head truncated N(0, dim^-0.5); norms 1; the input projections
    (wq, wk, wv, w1) truncated N(0, init_std); the projections that write into the residual
    stream (wo, w2, w3) truncated N(0, init_std / sqrt(2 * (layer + 1))) with ``depth_init``.
    """
    parts = name.split(".")
    if name.endswith("norm.weight"):
        nn.init.ones_(tensor)
    elif name == "tok_embeddings.weight":
        nn.init.normal_(tensor, generator=generator)
    elif name == "output.weight":
        std = args.dim ** -0.5
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
    elif parts[0] == "layers" and parts[-1] == "weight":
        if parts[-2] in ("wo", "w2", "w3"):
            depth = int(parts[1]) + 1 if args.depth_init else args.n_layers
            std = args.init_std / math.sqrt(2 * depth)
        else:
            std = args.init_std
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, generator=generator)
    else:
        raise ModelConfigError(f"no initialisation rule for parameter {name}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_meta_model(args: ModelArgs) -> Transformer:
    """The model with shapes only: instant at any size, for counting and planning."""
    with torch.device("meta"):
        return Transformer(args)
