"""The recipe weights format shared by import, export, generation and checkpoint reading.

* the architecture record: ``model_args.json`` (and ``model.yaml``, a config snippet that
  trains on from the weights), read back by ``load_model_args`` from either file or from a
  ``recipe fit`` YAML;
* the checks of a set of tensors against a ``ModelArgs`` (names, shapes, vocabulary);
* ``WeightSource``, the read-a-few-tensors-at-a-time contract that every checkpoint reader
  implements (``recipe.interop.checkpoint`` for the recipe's own checkpoints,
  ``recipe.interop.hf`` for Hugging Face directories);
* writing a weights directory (``save_weights``): a DCP checkpoint of the full-model state
  dict, one tensor in memory at a time, that appears only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from recipe.config import ModelArgs, RopeScaling
from recipe.interop import CheckpointError, InteropError, VocabularyError
from recipe.model import build_meta_model

MODEL_ARGS_FILE = "model_args.json"
ARCH_YAML_FILE = "model.yaml"


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


# ----------------------------------------------------------------------------- model args


def model_args_to_dict(args: ModelArgs) -> dict[str, Any]:
    return dataclasses.asdict(args)


def model_args_from_dict(values: Mapping[str, Any], where: str) -> ModelArgs:
    values = dict(values)
    known = set(ModelArgs.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise InteropError(f"{where}: unknown model arch keys {unknown}; valid keys are {sorted(known)}")
    if isinstance(values.get("rope_scaling"), Mapping):
        values["rope_scaling"] = RopeScaling(**values["rope_scaling"])
    return ModelArgs(**values)


def load_model_args(path: str | os.PathLike) -> ModelArgs:
    """The architecture from a ``recipe fit`` YAML config (``model.arch``), a ``model_args.json``,
    or a directory holding one (an import directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_ARGS_FILE
    if path.suffix == ".json":
        if not path.is_file():
            raise InteropError(f"{path} not found; pass a recipe YAML config or a {MODEL_ARGS_FILE}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise InteropError(f"{path} is not valid JSON ({err.msg}, line {err.lineno}); fix the file") from None
        return model_args_from_dict(values, str(path))
    from recipe.model_info import model_args_from_config

    return model_args_from_config(path)


# ----------------------------------------------------------------------------- checks


def expected_tensors(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model with its shape, in the model's order (built on meta: free)."""
    return {name: tuple(p.shape) for name, p in build_meta_model(args).named_parameters()}


def check_weights(shapes: Mapping[str, Sequence[int]], args: ModelArgs, where: str, fix: str) -> None:
    """One-line errors for unknown, missing or mis-shaped tensors against ``args``."""
    expected = expected_tensors(args)
    unknown = [name for name in shapes if name not in expected]
    if unknown:
        raise CheckpointError(f"{where} holds {len(unknown)} tensors that are not model parameters "
                              f"(first: {unknown[0]}); pass a Llama 3 checkpoint of this recipe's layout")
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(f"{where} lacks {len(missing)} model tensors (first: {missing[0]}); {fix}")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(shapes[name])} but the model config gives "
                                  f"{list(shape)}; {fix}")


def check_vocabulary(args: ModelArgs, tokenizer: Any) -> None:
    """The model must have a row for every token id the tokenizer can produce.

    A larger ``vocab_size`` is allowed (vocabularies padded for tensor parallelism); the
    rows past the tokenizer are never produced by it.
    """
    if tokenizer.vocab_size > args.vocab_size:
        raise VocabularyError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{args.vocab_size}; pass --tokenizer with the file the model was trained with (or --no-tokenizer)"
        )


# ----------------------------------------------------------------------------- reading


class WeightSource(ABC):
    """Full-model tensors of one checkpoint by parameter name, read a few at a time."""

    def __init__(self, path: Path, description: str, args: ModelArgs | None) -> None:
        self.path = path
        self.description = description  # for messages: the path and, for an average, its name
        self.args = args  # the architecture recorded with the weights, if any

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Shape and dtype of every tensor (reads no tensor data)."""

    @abstractmethod
    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The full tensors ``names`` (CPU)."""


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP without a process group, without its warning that there is none (which is the point)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# ----------------------------------------------------------------------------- writing


def save_weights(out: str | os.PathLike, args: ModelArgs, infos: Mapping[str, TensorInfo],
                 produce: Callable[[str], torch.Tensor]) -> Path:
    """Write a recipe weights directory: DCP of the full state dict, plus the architecture.

    ``produce(name)`` makes each tensor only when the writer reaches it, and every tensor
    goes to its own file so the writer lets go of it at once: one tensor in memory at a
    time. The directory appears only when complete.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    out = Path(out)
    check_weights({n: i.shape for n, i in infos.items()}, args, "the converted weights",
                  "this is a bug in the conversion")

    class LazyPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):  # noqa: ANN001, ANN202 - DCP's signature
            name = write_item.index.fqn
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(infos[name].shape):
                raise CheckpointError(f"{name} came out as {list(tensor.shape)}, expected {list(infos[name].shape)}")
            return tensor.to(infos[name].dtype).contiguous()

    # Meta tensors: DCP plans the files from shapes and dtypes alone.
    state = {name: torch.empty(info.shape, dtype=info.dtype, device="meta") for name, info in infos.items()}
    with staged_output(out) as partial, quiet_single_process():
        dcp.save(state, storage_writer=FileSystemWriter(str(partial), single_file_per_rank=False),
                 planner=LazyPlanner(), no_dist=True)
        (partial / MODEL_ARGS_FILE).write_text(json.dumps(model_args_to_dict(args), indent=2) + "\n")
        (partial / ARCH_YAML_FILE).write_text(arch_yaml(args, out))
    return out


def check_new_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} already exists; choose a new output directory or remove it")


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A scratch directory beside ``out``, renamed to it on success and removed on failure,
    so ``out`` appears only complete."""
    check_new_output(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run: never trusted
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.is_dir():
        out.rmdir()  # empty, checked above
    partial.rename(out)


def arch_yaml(args: ModelArgs, weights: Path) -> str:
    """A config snippet that trains on from these weights: ``recipe fit -c BASE.yaml -c THIS``."""
    arch = model_args_to_dict(args)
    for key in ("depth_init", "init_std"):  # initialisation only: the weights replace it
        arch.pop(key)
    body = yaml.safe_dump({"model": {"init_weights_path": str(weights.resolve()), "arch": arch}}, sort_keys=False)
    return ("# The architecture of the imported weights. Use it as a second config:\n"
            f"#   recipe fit --config configs/llama3_8b.yaml --config {weights / ARCH_YAML_FILE}\n" + body)


def arch_flags(args: ModelArgs, weights: Path) -> str:
    """The same as command-line overrides."""
    arch = model_args_to_dict(args)
    flags = []
    for key, value in arch.items():
        if key in ("depth_init", "init_std"):
            continue
        if isinstance(value, dict):
            value = "'" + json.dumps(value) + "'"
        elif value is None:
            value = "null"
        flags.append(f"--model.arch.{key} {value}")
    flags.append(f"--model.init_weights_path {weights.resolve()}")
    return " ".join(flags)
