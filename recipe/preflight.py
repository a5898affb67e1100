"""Check a whole training config before any process starts.

A distributed run that fails after launching N processes, loading data and building the
model wastes minutes (or a cluster allocation) and scatters the error over N logs. The
``recipe`` command runs these checks in the launching process, right after the config
is parsed: the mesh against the world size and the model, every batch layout the
schedules will use (data, batch-size ramp, context stages) against the mesh and the
model's RoPE table, the data directory and its vocabulary, the tokenizer file, and the
data-mix domains. The first problem found is raised as a one-line ``RecipeError``.

Checks that need the running world (the callbacks' own ``setup`` checks) still run
there too: this module only moves the common failures to the front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.errors import ModelConfigError


def layouts(trainer: Any, data: Any) -> list[tuple[int, int, str]]:
    """Every ``(global batch in sequences, seq_len, where)`` the run's schedules can produce."""
    from callbacks.batch_ramp import BatchSizeRamp
    from callbacks.context_stages import ContextLengthStages

    found = [(data.global_batch_size, data.seq_len, "data")]
    ramp = next((cb for cb in trainer.callbacks if isinstance(cb, BatchSizeRamp)), None)
    if ramp is not None:
        found = [(s.batch_tokens // s.seq_len, s.seq_len, f"ramp stage at {s.tokens:,} tokens") for s in ramp.stages]
    stages = next((cb for cb in trainer.callbacks if isinstance(cb, ContextLengthStages)), None)
    if stages is not None:
        base_tokens = stages.base_batch_tokens(ramp, data)
        for i, s in enumerate(stages.stages):
            for tokens in [s.batch_tokens] if s.batch_tokens else sorted(base_tokens):
                if tokens % s.seq_len:
                    raise ConfigError(f"context stage {i}: {tokens:,} tokens per step are not a multiple of its "
                                      f"seq_len={s.seq_len}; set the stage's batch_tokens")
                found.append((tokens // s.seq_len, s.seq_len, f"context stage {i}"))
    return found


def check_fit(trainer: Any, module: Any, data: Any) -> None:
    """Raise the first problem of a ``fit`` config (one line), or return."""
    from recipe.data.stream import check_batch_layout

    arch = module.arch
    world = int(trainer.num_devices) * int(trainer.num_nodes)
    dims = _mesh(trainer, arch, world)
    dp = dims.dp if dims is not None else world
    if not hasattr(data, "global_batch_size"):
        return  # not the recipe's data module: nothing more to know
    for batch, seq_len, where in layouts(trainer, data):
        if seq_len > arch.max_seq_len:
            raise ModelConfigError(f"{where}: seq_len={seq_len} exceeds model.arch.max_seq_len={arch.max_seq_len}; "
                                   "raise max_seq_len or shorten the sequences")
        try:
            check_batch_layout(batch, data.micro_batch_size, dp)
            if dims is not None:
                dims.validate_batch(seq_len, batch, data.micro_batch_size)
                dims.validate_pipeline(batch // dims.dp // data.micro_batch_size, trainer.strategy.pp_schedule,
                                       trainer.strategy.pp_stages_per_rank)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    _check_data(data, arch, trainer)


def _mesh(trainer: Any, arch: Any, world: int):
    from recipe.parallel.strategy import Parallel4DStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, Parallel4DStrategy):
        return None
    dims = strategy.requested_dims.resolved(world)
    if strategy.compile:
        from recipe.parallel.compile import check_compile_layout

        check_compile_layout(dims.tp)
    dims.validate_model(arch.n_layers, arch.n_heads, arch.n_kv_heads, arch.vocab_size, arch.dim,
                        strategy.pp_stages_per_rank)
    return dims


def _check_data(data: Any, arch: Any, trainer: Any) -> None:
    from recipe.data.build import is_built
    from recipe.data.errors import DataError

    tokenizer = getattr(data, "tokenizer_path", None)
    if tokenizer and not Path(tokenizer).is_file():
        raise ConfigError(f"data.tokenizer_path {tokenizer} does not exist; pass a tiktoken BPE file or leave it "
                          "unset for Llama 3's")
    data_dir = Path(data.data_dir)
    if not is_built(data_dir):
        if getattr(data, "curate_config", None):
            from recipe.data.build import check_curation_output

            check_curation_output(data.curate_config, data_dir)
            return  # curated on first use
        if not data.build_demo:
            raise DataError(f"{data_dir} has no complete train/val shard sets; build them with "
                            f"`recipe data build <corpus> {data_dir}` (or set data.build_demo: true)")
        return  # built on first use; its vocabulary is the tokenizer's
    index = json.loads((data_dir / "train" / "index.json").read_text())
    if int(index["vocab_size"]) > arch.vocab_size:
        raise ModelConfigError(f"{data_dir} was tokenized with a {index['vocab_size']}-token vocabulary but "
                               f"model.arch.vocab_size={arch.vocab_size}; set vocab_size to at least "
                               f"{index['vocab_size']}")
    from callbacks.data_mix import DataMixSchedule

    mix = next((cb for cb in trainer.callbacks if isinstance(cb, DataMixSchedule)), None)
    if mix is not None:
        domains = sorted({shard.get("domain") or "default" for shard in index["shards"]})
        named = sorted({d for stage in mix.stages for d in stage.weights} | set(mix.anneal_weights or {}))
        unknown = [d for d in named if d not in domains]
        if unknown:
            raise ConfigError(f"the data mix names domain {unknown[0]!r} but {data_dir} has {', '.join(domains)}; "
                              "fix the mix weights or rebuild the data with that domain")
