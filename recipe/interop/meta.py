"""Import Meta's released Llama 3 format: ``params.json`` + ``consolidated.NN.pth``.

Meta saves one file per model-parallel rank, each holding that rank's slice of every
tensor under the same names this recipe uses. The slices are merged per tensor:

* column-parallel (``wq``, ``wk``, ``wv``, ``w1``, ``w3``, ``output``): along dim 0;
* row-parallel (``wo``, ``w2``): along dim 1;
* ``tok_embeddings``: dim 0 (VocabParallelEmbedding) or dim 1 (ParallelEmbedding, in
  some releases) - told apart by the shapes;
* norms: replicated, taken from the first file.

When there are more ranks than K/V heads (405B on 16 ranks), neighbouring ranks hold
copies of the same K/V head, which are kept once. Every file is memory-mapped and a
tensor is merged only when the writer reaches it, so memory holds one full tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recipe.interop import CheckpointError, InteropError
from recipe.interop.weights import TensorInfo, expected_tensors, save_weights
from recipe.model import ModelArgs, RopeScaling

_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
           "feed_forward.w3.weight", "output.weight")
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
# Llama 2 checkpoints store their RoPE table; this recipe derives it from params.json.
_DERIVED = ("rope.freqs",)
_SHARD = re.compile(r"consolidated\.(\d+)\.pth")


def model_args_from_params(params: Mapping[str, Any], where: str, vocab_size: int | None = None,
                           max_seq_len: int | None = None, rope_scaling_factor: float | None = None) -> ModelArgs:
    """``ModelArgs`` from Meta's ``params.json`` (``use_scaled_rope``: Llama 3.1's RoPE scaling)."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as err:
        raise InteropError(f"{where} lacks {err.args[0]!r}; pass the params.json of a Llama 3 release") from None
    scaling = None
    if params.get("use_scaled_rope"):
        # Meta's apply_scaling uses factor 8 (3.1); Llama 3.2's Hugging Face configs say 32, so the
        # factor can be given explicitly.
        factor = rope_scaling_factor or params.get("rope_scaling_factor") or 8.0
        scaling = RopeScaling(factor=float(factor), low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_seq_len=8192)
    if max_seq_len is None:
        max_seq_len = int(params.get("max_seq_len") or (131072 if scaling else 8192))
    vocab = int(params.get("vocab_size") or -1)
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
        vocab_size=vocab if vocab > 0 else int(vocab_size or 0), multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)), rope_scaling=scaling, max_seq_len=max_seq_len,
    )


def shard_files(src: Path) -> list[Path]:
    """``consolidated.00.pth`` ... in rank order; a gap in the numbers is a missing file."""
    found = {int(m.group(1)): p for p in src.iterdir() if (m := _SHARD.fullmatch(p.name))}
    if not found:
        raise InteropError(f"{src} has no consolidated.*.pth files; pass the directory of a Meta Llama 3 release")
    for rank in range(max(found) + 1):
        if rank not in found:
            raise CheckpointError(f"{src}: consolidated.{rank:02d}.pth is missing ({len(found)} of "
                                  f"{max(found) + 1} model-parallel shards found); download every shard")
    return [found[rank] for rank in range(len(found))]


def _merge_dim(name: str, shapes: list[tuple[int, ...]], full: tuple[int, ...], args: ModelArgs,
               files: list[Path]) -> int | str:
    """How the shards of ``name`` combine: a dim to concatenate, "replicated" or "kv_copies"."""
    n = len(shapes)
    for shape, file in zip(shapes, files):
        if shape != shapes[0]:
            raise CheckpointError(f"{file.name}: {name} has shape {list(shape)} but {files[0].name} has "
                                  f"{list(shapes[0])}; the shards come from different checkpoints")
    shape = shapes[0]
    if shape == full:
        return "replicated"
    if name == "tok_embeddings.weight":
        dims: tuple[int, ...] = (0, 1)
    elif name.endswith(_COLUMN):
        dims = (0,)
    elif name.endswith(_ROW):
        dims = (1,)
    else:
        dims = ()
    for dim in dims:
        if len(shape) == len(full) and shape[dim] * n == full[dim] and all(
                shape[d] == full[d] for d in range(len(full)) if d != dim):
            return dim
    if (name.endswith(("attention.wk.weight", "attention.wv.weight")) and n > args.n_kv_heads
            and n % args.n_kv_heads == 0 and shape == (args.head_dim, full[1])):
        return "kv_copies"
    raise _shape_error(name, shape, full, files, dims)


def _shape_error(name: str, shape: tuple[int, ...], full: tuple[int, ...], files: list[Path],
                 dims: tuple[int, ...]) -> CheckpointError:
    n = len(files)
    hint = "params.json does not describe these weights; pass the params.json that came with them"
    for dim in dims:
        if len(shape) == len(full) and shape[dim] and full[dim] % shape[dim] == 0 and full[dim] // shape[dim] > n:
            hint = (f"the slices are 1/{full[dim] // shape[dim]} of the tensor but only {n} file(s) were found: "
                    f"consolidated.{n:02d}.pth and later are missing; download every shard")
            break
    return CheckpointError(f"{files[0].name}: {name} has shape {list(shape)} in each of {n} shard(s), which does "
                           f"not make the {list(full)} that params.json gives; {hint}")


def _load_shard(path: Path) -> Any:
    """One ``consolidated.NN.pth``, memory-mapped and weights-only: tensors and containers, nothing that runs."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds objects a Meta checkpoint never does (only tensors are allowed); "
                              "it was not loaded - download the release again from its source") from None
    except Exception as err:  # noqa: BLE001 - whatever torch cannot read is the same user error
        text = str(err).strip().splitlines()
        raise CheckpointError(f"{path} is not a checkpoint torch.load can read "
                              f"({text[0][:200] if text else type(err).__name__}); download the shard again") from None


def import_meta(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None,
                max_seq_len: int | None = None, rope_scaling_factor: float | None = None) -> ModelArgs:
    """Convert a Meta release in ``src`` into a recipe weights directory ``out``.

    ``dtype`` None keeps the stored precision (bf16 for the releases).
    """
    src, out = Path(src), Path(out)
    params_path = src / "params.json"
    if not params_path.is_file():
        raise InteropError(f"{src} has no params.json; pass the directory of a Meta Llama 3 release")
    files = shard_files(src)
    # mmap: opening every shard costs address space, not memory.
    shards = [_load_shard(f) for f in files]
    names = [k for k in shards[0] if k not in _DERIVED]
    for shard, file in zip(shards[1:], files[1:]):
        differ = sorted(set(shard) ^ set(shards[0]))
        if differ:
            raise CheckpointError(f"{file.name} and {files[0].name} differ in tensor {differ[0]}; "
                                  "the shards come from different checkpoints")

    vocab_hint = None
    if "tok_embeddings.weight" in shards[0]:
        rows, cols = shards[0]["tok_embeddings.weight"].shape
        vocab_hint = rows * len(files) if cols == int(json.loads(params_path.read_text())["dim"]) else rows
    args = model_args_from_params(json.loads(params_path.read_text()), str(params_path), vocab_hint, max_seq_len,
                                  rope_scaling_factor)
    expected = expected_tensors(args)
    unknown = [n for n in names if n not in expected]
    if unknown:
        raise CheckpointError(f"{files[0].name}: {unknown[0]} is not a Llama 3 parameter ({len(unknown)} unknown "
                              "tensors); pass a text-only Llama 3 release")
    missing = [n for n in expected if n not in shards[0]]
    if missing:
        raise CheckpointError(f"{files[0].name} lacks {missing[0]} ({len(missing)} model tensors missing); "
                              "params.json does not describe these weights")

    # Plan every merge from the shapes first: a bad checkpoint fails before anything is written.
    plan = {n: _merge_dim(n, [tuple(s[n].shape) for s in shards], full, args, files) for n, full in expected.items()}
    infos = {n: TensorInfo(full, dtype or shards[0][n].dtype) for n, full in expected.items()}

    def produce(name: str) -> torch.Tensor:
        how = plan[name]
        if how == "replicated":
            return shards[0][name]
        if how == "kv_copies":
            copies = len(shards) // args.n_kv_heads  # ranks r*copies ... hold K/V head r
            return torch.cat([s[name] for s in shards[::copies]], dim=0)
        return torch.cat([s[name] for s in shards], dim=how)

    save_weights(out, args, infos, produce)
    return args
