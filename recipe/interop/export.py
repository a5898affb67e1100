"""Export a recipe checkpoint of any kind and layout to the Hugging Face Llama format.

Writes ``config.json``, ``generation_config.json``, ``model-0000k-of-0000n.safetensors``
with ``model.safetensors.index.json``, and the tokenizer files. The shards are planned
from the tensor shapes alone, then each is read, converted and written before the next
is touched, so memory holds one shard (``max_shard_bytes``) however large the model.
Nothing here imports ``transformers``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from recipe.interop.weights import WeightSource, check_vocabulary, check_weights, expected_tensors, staged_output
from recipe.interop.hf import hf_config, to_hf_name, to_hf_tensor
from recipe.model import ModelArgs
from recipe.tokenizer import Tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass
class ExportSummary:
    out: Path
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def export_hf(source: WeightSource, args: ModelArgs, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
              tokenizer: Tokenizer | None = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> ExportSummary:
    """Write ``source``'s weights for ``args`` as a Hugging Face ``LlamaForCausalLM`` directory ``out``.

    The directory appears only once complete.
    """
    from safetensors.torch import save_file

    from recipe.interop.hf_tokenizer import write_tokenizer_files

    out = Path(out)
    check_weights({n: i.shape for n, i in source.infos().items()}, args, source.description,
                  "pass --config with the model.arch the checkpoint was trained with")
    if tokenizer is not None:
        check_vocabulary(args, tokenizer)
    summary = ExportSummary(out)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: itemsize * torch.Size(shape).numel() for name, shape in expected_tensors(args).items()}
    shards = plan_shards(sizes, max_shard_bytes)
    with staged_output(out) as partial:
        weight_map: dict[str, str] = {}
        for k, names in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {to_hf_name(name): to_hf_tensor(name, tensor, args).to(dtype).contiguous()
                       for name, tensor in source.read(names).items()}
            save_file(tensors, str(partial / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            summary.files.append(file)
            summary.tensors += len(tensors)
            summary.bytes += sum(sizes[n] for n in names)
            del tensors  # before the next shard is read

        index = {"metadata": {"total_size": summary.bytes}, "weight_map": weight_map}
        bos = tokenizer.bos_id if tokenizer is not None else None
        eos = tokenizer.eos_id if tokenizer is not None else None
        generation = {"bos_token_id": bos, "eos_token_id": [eos, tokenizer.eot_id] if tokenizer else eos,
                      "do_sample": True, "temperature": 0.6, "top_p": 0.9}
        for name, content in {"model.safetensors.index.json": index, "config.json": hf_config(args, dtype, bos, eos),
                              "generation_config.json": {k: v for k, v in generation.items() if v is not None}}.items():
            (partial / name).write_text(json.dumps(content, indent=2) + "\n")
            summary.files.append(name)
        if tokenizer is not None:
            summary.files += write_tokenizer_files(tokenizer, partial, args.max_seq_len)
    return summary
