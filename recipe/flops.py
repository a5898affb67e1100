"""Training FLOPs per token of the Llama 3 transformer, and the peak they are compared with.

Convention (PaLM appendix B, torchtitan, Megatron): count the matrix multiplications only,
2 FLOPs per multiply-add, and training = 3 x forward (the backward pass computes the
gradients of both the activations and the weights: two matmuls of the forward's size).
Not counted: the embedding lookup (a gather), RMSNorm, RoPE, SiLU and the gate product,
softmax, the loss, the optimizer - all O(dim) per token, well under 1% at any real size.

Forward FLOPs per token::

    2 x P_matmul                                   weights: every token meets each weight once
  + 2 x 2 x n_layers x n_heads x head_dim x C      attention: scores Q K^T and weights x V

``P_matmul`` counts the weights of every matmul: per layer ``wq`` (dim x n_heads*head_dim),
``wk`` and ``wv`` (dim x n_kv_heads*head_dim each - grouped-query attention shrinks them),
``wo``, the SwiGLU ``w1``, ``w3`` (dim x ffn) and ``w2`` (ffn x dim); plus the output head
(dim x vocab). ``C`` is the number of keys a query attends to on average: ``seq_len`` for
full attention and ``seq_len / 2`` for causal attention (the exact causal mean is
``(seq_len + 1) / 2``; the half is the usual convention, and is what a causal kernel that
skips the masked blocks does). Query heads, not K/V heads, set the attention cost: under
GQA each query head still scores every key.

Relation to 6N: training FLOPs per token = ``6 x P_matmul + 12 x n_layers x dim x C``
(``n_heads x head_dim = dim`` here). Kaplan's / Chinchilla's ``6N`` with N = the
non-embedding parameters (norm gains included, output head included as in torchtitan) drops
the attention term and adds the 6 x norm-gain FLOPs; torchtitan's estimate is
``6N + 12 x n_layers x dim x seq_len`` (full attention, no causal halving). At Llama 3 8B,
seq 8192, causal: 6N is about 4.5e10 and the attention term 6.4e9 (about 14%).

Document masking: packed rows attend within their document only, so a query sees fewer
keys. Pass ``doc_lengths`` (the segment lengths of the packed rows) or ``mean_doc_len`` to
count only the useful attention (a token-weighted mean of the document lengths replaces
``seq_len``). The default, one document per row, is the convention MFU figures use; note
that the dense masked SDPA used on CPU computes the whole square whatever the mask.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from recipe.errors import ConfigError
from recipe.model import ModelArgs

# Dense (no sparsity) bf16 tensor-core peaks per device, in FLOP/s, from the vendors' data
# sheets. H200 has H100 SXM's compute and more / faster memory.
DEVICE_PEAK_FLOPS: dict[str, float] = {
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
}


def matmul_params(args: ModelArgs) -> dict[str, int]:
    """Weights that take part in a matmul, by kind (the embedding table does not)."""
    dim, hd, ffn = args.dim, args.head_dim, args.ffn_hidden_dim
    q_out, kv_out = args.n_heads * hd, args.n_kv_heads * hd
    return {
        "attention_q_o": args.n_layers * (dim * q_out + q_out * dim),  # wq, wo
        "attention_kv": args.n_layers * 2 * dim * kv_out,  # wk, wv (GQA: n_kv_heads)
        "mlp": args.n_layers * 3 * dim * ffn,  # w1, w2, w3
        "output": dim * args.vocab_size,
    }


def non_embedding_params(args: ModelArgs) -> int:
    """Every parameter except the token embedding: matmul weights plus the RMSNorm gains."""
    norms = (2 * args.n_layers + 1) * args.dim
    return sum(matmul_params(args).values()) + norms


def attended_keys(seq_len: int, causal: bool = True, doc_lengths: Sequence[int] | None = None,
                  mean_doc_len: float | None = None) -> float:
    """Mean number of keys per query, ``C`` in the module docstring.

    One document per row: ``seq_len`` (full) or ``seq_len / 2`` (causal). With documents of
    lengths d_i packed into rows, a token of document i sees d_i keys (full) or d_i / 2 on
    average (causal), so ``C = sum(d_i^2) / sum(d_i)`` (halved for causal); ``mean_doc_len``
    treats every document as that long (capped at ``seq_len``).
    """
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    if doc_lengths is not None and mean_doc_len is not None:
        raise ConfigError("pass doc_lengths or mean_doc_len, not both")
    if doc_lengths is not None:
        lengths = [int(d) for d in doc_lengths]
        if not lengths or min(lengths) <= 0 or max(lengths) > seq_len:
            raise ConfigError(f"doc_lengths must be segment lengths in 1..seq_len={seq_len}, got {lengths[:8]}")
        keys = sum(d * d for d in lengths) / sum(lengths)
    elif mean_doc_len is not None:
        if mean_doc_len <= 0:
            raise ConfigError(f"mean_doc_len must be positive, got {mean_doc_len}")
        keys = min(float(mean_doc_len), float(seq_len))
    else:
        keys = float(seq_len)
    return keys / 2 if causal else keys


def flops_breakdown(args: ModelArgs, seq_len: int, causal: bool = True,
                    doc_lengths: Sequence[int] | None = None,
                    mean_doc_len: float | None = None) -> dict[str, float]:
    """Training FLOPs per token by part (3 x forward each), with their sum under ``total``."""
    parts: dict[str, float] = {name: 3 * 2 * float(n) for name, n in matmul_params(args).items()}
    keys = attended_keys(seq_len, causal, doc_lengths, mean_doc_len)
    parts["attention_scores"] = 3 * 2 * 2 * args.n_layers * args.n_heads * args.head_dim * keys
    parts["total"] = sum(parts.values())
    return parts


def flops_per_token(args: ModelArgs, seq_len: int, causal: bool = True,
                    doc_lengths: Sequence[int] | None = None, mean_doc_len: float | None = None) -> float:
    """Training (forward + backward) FLOPs per trained token; see the module docstring.

    ``= 6 x matmul_params + 12 x n_layers x n_heads x head_dim x C`` with ``C = seq_len / 2``
    for causal attention (``seq_len`` for full), or the document-masked mean.
    """
    return flops_breakdown(args, seq_len, causal, doc_lengths, mean_doc_len)["total"]


def model_flops_per_token_6n(args: ModelArgs) -> float:
    """The 6N approximation: 6 x non-embedding parameters (no attention term)."""
    return 6.0 * non_embedding_params(args)


def measured_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of a square ``torch.mm`` on this process's CPU threads (best of ``repeats``).

    The practical peak of a machine without a published one (the CPU: fp32 GEMM). Counts
    ``2 x size^3`` FLOPs per product; one untimed warm-up product first.
    """
    if size <= 0 or repeats <= 0:
        raise ConfigError(f"size and repeats must be positive, got size={size}, repeats={repeats}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, caches, kernel choice
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / max(best, 1e-9)


def peak_flops(device: str) -> float:
    """The dense bf16 peak of a named device (a key of ``DEVICE_PEAK_FLOPS``)."""
    key = device.strip().lower()
    if key not in DEVICE_PEAK_FLOPS:
        raise ConfigError(f"unknown device {device!r}; known: {', '.join(sorted(DEVICE_PEAK_FLOPS))}, "
                         "or give the peak in FLOP/s")
    return DEVICE_PEAK_FLOPS[key]
