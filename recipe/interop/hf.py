"""The Hugging Face Llama format: parameter names, the q/k row order, ``config.json``; and import.

Two differences from Meta's layout, which this recipe keeps:

* names: ``model.layers.{i}.self_attn.q_proj.weight`` for ``layers.{i}.attention.wq.weight`` ...
* RoPE: Meta rotates adjacent pairs (x[2i], x[2i+1]) of each head; Hugging Face's
  ``rotate_half`` pairs x[i] with x[i + head_dim/2]. Its conversion script therefore
  reorders the rows of wq and wk within each head (evens first, then odds), which gives
  the same attention scores. ``to_hf_tensor`` applies that reorder, ``from_hf_tensor``
  undoes it; both are exact permutations, so a round trip is bit-equal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from recipe.interop import CheckpointError, InteropError
from recipe.interop.weights import TensorInfo, WeightSource, check_weights, expected_tensors, save_weights
from recipe.model import ModelArgs, RopeScaling

_BLOCK_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_FROM_BLOCK = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
_FROM_TOP = {hf: ours for ours, hf in _TOP_NAMES.items()}
# Buffers some older exports carry; derived from the config, so dropped.
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ----------------------------------------------------------------------------- names and tensors


def to_hf_name(name: str) -> str:
    """``layers.3.attention.wq.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    module, param = name.rsplit(".", 1)
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{param}"
    _, index, sub = module.split(".", 2)
    return f"model.layers.{index}.{_BLOCK_NAMES[sub]}.{param}"


def from_hf_name(hf_name: str) -> str | None:
    """The recipe's name of a Hugging Face parameter (None: not a Llama parameter)."""
    module, _, param = hf_name.rpartition(".")
    if module in _FROM_TOP:
        return f"{_FROM_TOP[module]}.{param}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _FROM_BLOCK:
        return f"layers.{parts[2]}.{_FROM_BLOCK[parts[3]]}.{param}"
    return None


def _heads_of(name: str, args: ModelArgs) -> int | None:
    """Heads whose rows RoPE rotates (wq, wk), else None."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Meta's interleaved rows of wq / wk -> Hugging Face's half-split rows (others unchanged)."""
    heads = _heads_of(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_tensor(name: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of ``to_hf_tensor``."""
    heads = _heads_of(name, args)
    if heads is None:
        return tensor
    rows, cols = tensor.shape
    return tensor.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ----------------------------------------------------------------------------- config


def hf_config(args: ModelArgs, dtype: torch.dtype, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict[str, Any]:
    """``config.json`` of ``LlamaForCausalLM`` for ``args``."""
    rope_scaling = None
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_seq_len}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": args.max_seq_len,
        "vocab_size": args.vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if bos_token_id is not None:
        config["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        config["eos_token_id"] = eos_token_id
    return config


def ffn_arguments(dim: int, hidden: int) -> tuple[int, float | None]:
    """``(multiple_of, ffn_dim_multiplier)`` that give SwiGLU width ``hidden`` for ``dim``.

    Meta's released settings first (8B/70B: 1.3; 405B: 1.2; 3.2: 1.5 or 1.0), then a
    setting that reproduces any width.
    """
    candidates = [(1024, 1.3), (4096, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0)]
    base = int(2 * 4 * dim / 3)
    candidates.append((hidden, None if base <= hidden else hidden / base))
    for multiple_of, multiplier in candidates:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=1,
                         multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == hidden:
            return multiple_of, multiplier
    raise InteropError(f"no (multiple_of, ffn_dim_multiplier) gives intermediate_size {hidden} for hidden_size {dim}")


def _rope_settings(config: Mapping[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes rope_parameters; earlier versions rope_theta + rope_scaling.
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise InteropError(f"{where}: RoPE scaling {rope_type!r} is not supported (only Llama 3.1's 'llama3'); "
                           "pass a Llama 3 checkpoint")
    return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_seq_len=int(params["original_max_position_embeddings"]))


def model_args_from_hf_config(config: Mapping[str, Any], where: str, max_seq_len: int | None = None) -> ModelArgs:
    """``ModelArgs`` for a Hugging Face ``LlamaConfig`` dict; one-line errors for what Llama 3 lacks."""
    if config.get("model_type", "llama") != "llama":
        raise InteropError(f"{where}: model_type {config.get('model_type')!r} is not 'llama'; pass a Llama checkpoint")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise InteropError(f"{where}: {key}=true is not a Llama 3 architecture (this recipe has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise InteropError(f"{where}: hidden_act {config['hidden_act']!r} is not SwiGLU's 'silu'")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        hidden = int(config["intermediate_size"])
        n_layers, vocab = int(config["num_hidden_layers"]), int(config["vocab_size"])
    except KeyError as err:
        raise InteropError(f"{where} lacks {err.args[0]!r}; pass the config.json of a Llama checkpoint") from None
    if config.get("head_dim") not in (None, dim // heads):
        raise InteropError(f"{where}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                           f"= {dim // heads}, which this recipe's attention assumes")
    theta, scaling = _rope_settings(config, where)
    multiple_of, multiplier = ffn_arguments(dim, hidden)
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=int(config.get("num_key_value_heads") or heads),
        vocab_size=vocab, multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=max_seq_len or int(config.get("max_position_embeddings", 8192)),
    )


# ----------------------------------------------------------------------------- import


def _inside(file: Any, name: str, index: Path) -> str:
    """``file`` of the index's ``weight_map``, if it names a file inside the checkpoint's folder.

    An absolute path or a ``..`` would read (and with a symlink, also reveal) files anywhere;
    the check is on the name as written, so a Hub cache's symlinked shards still load.
    """
    parts = Path(file).parts if isinstance(file, str) else ()
    if not parts or Path(file).is_absolute() or ".." in parts or "\\" in file or ":" in parts[0]:
        raise CheckpointError(f"{index} maps {name} to {file!r}, outside the checkpoint's folder; pass a checkpoint "
                              "whose index names only its own shard files")
    return file


def _weight_files(src: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = {name: src / _inside(file, name, index) for name, file in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise CheckpointError(f"{index.name} maps {name} to {file.name}, which is missing from {src}; "
                                      "download every shard of the checkpoint")
        return files
    single = src / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if list(src.glob("*.bin")):
        raise InteropError(f"{src} holds PyTorch .bin weights; this import reads safetensors (the format of every "
                           "Llama 3 release on the Hub): download the .safetensors files")
    raise InteropError(f"{src} has neither model.safetensors.index.json nor model.safetensors; "
                       "pass a Hugging Face Llama checkpoint directory")


class HfSource(WeightSource):
    """A Hugging Face Llama checkpoint directory, read as recipe tensors (names mapped, q/k rows restored).

    safetensors files are memory-mapped, so reading a tensor touches only its bytes.
    """

    def __init__(self, src: Path, max_seq_len: int | None = None) -> None:
        from safetensors import safe_open

        config_path = src / "config.json"
        if not config_path.is_file():
            raise InteropError(f"{src} has no config.json; pass a Hugging Face Llama checkpoint directory")
        config = json.loads(config_path.read_text())
        super().__init__(src, str(src), model_args_from_hf_config(config, str(config_path), max_seq_len))
        files = _weight_files(src)
        self._handles = {file: safe_open(file, framework="pt") for file in set(files.values())}
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, HF name)
        self._infos: dict[str, TensorInfo] = {}
        for hf_name, file in files.items():
            if hf_name.endswith(_DERIVED_SUFFIXES):
                continue
            name = from_hf_name(hf_name)
            if name is None:
                raise CheckpointError(f"{file.name}: {hf_name} is not a Llama parameter; pass a plain "
                                      "LlamaForCausalLM checkpoint (no adapters or extra heads)")
            view = self._handles[file].get_slice(hf_name)
            if view.get_dtype() not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file.name}: {hf_name} is stored as {view.get_dtype()}; "
                                      "only float checkpoints can be imported")
            self._where[name] = (file, hf_name)
            self._infos[name] = TensorInfo(tuple(view.get_shape()), _SAFETENSORS_DTYPES[view.get_dtype()])
        tied = config.get("tie_word_embeddings") and "tok_embeddings.weight" in self._infos
        if tied and "output.weight" not in self._infos:
            # Tied head (Llama 3.2 1B/3B): this recipe keeps an untied output, starting as the embedding.
            self._where["output.weight"] = self._where["tok_embeddings.weight"]
            self._infos["output.weight"] = self._infos["tok_embeddings.weight"]

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            file, hf_name = self._where[name]
            out[name] = from_hf_tensor(name, self._handles[file].get_tensor(hf_name), self.args)
        return out


def import_hf(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None,
              max_seq_len: int | None = None) -> ModelArgs:
    """Convert a Hugging Face Llama checkpoint in ``src`` into a recipe weights directory ``out``.

    One tensor in memory at a time; ``dtype`` None keeps the stored precision.
    """
    source = HfSource(Path(src), max_seq_len)
    args = source.args
    infos = source.infos()
    check_weights({n: i.shape for n, i in infos.items()}, args, str(src),
                  "the checkpoint does not match its config.json")
    order = {n: TensorInfo(infos[n].shape, dtype or infos[n].dtype) for n in expected_tensors(args)}
    save_weights(out, args, order, lambda name: source.read([name])[name])
    return args
