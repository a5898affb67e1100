"""Check a whole training config before any process starts.

A distributed run that fails after launching N processes, loading data and building the
model wastes minutes (or a cluster allocation) and scatters the error over N logs. The
``recipe`` command runs these checks in the launching process, right after the config
is parsed: the mesh against the world size and the model, the run plan
(``recipe.plan``: the schedules of the recipe callbacks together) and every batch layout
it can produce against the mesh's batch-layout rule and the model's RoPE table, the data
directory and its vocabulary, the tokenizer file, and the data-mix domains. The first
problem found is raised as a one-line ``RecipeError``.

The module builds the same plan again in ``setup`` and checks it against the layout it
actually runs; this module only moves the failures to the front.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.errors import ModelConfigError


def check_fit(trainer: Any, module: Any, data: Any) -> None:
    """Raise the first problem of a ``fit`` config (one line), or return."""
    from recipe.parallel.mesh import ParallelDims
    from recipe.plan import build_run_plan

    from recipe.parallel.step import check_strategy

    check_strategy(trainer.strategy)
    arch = module.arch
    world = int(trainer.num_devices) * int(trainer.num_nodes)
    dims = _mesh(trainer, arch, world)
    if not hasattr(data, "global_batch_size"):
        return  # not the recipe's data module: nothing more to know
    # The run plan refuses settings that cannot run together and lengths beyond the RoPE
    # table; then every layout it can produce goes through the mesh's batch-layout rule.
    plan = build_run_plan(trainer, module, data)
    if dims is not None:
        strategy = trainer.strategy
        plan.check_layout(lambda batch, seq_len: dims.check_batch(
            batch, seq_len, data.micro_batch_size, strategy.pp_schedule, strategy.pp_stages_per_rank))
    else:  # one process or plain data parallelism: every rank a data-parallel rank
        plain = ParallelDims(dp_shard=world)
        plan.check_layout(lambda batch, seq_len: plain.check_batch(batch, seq_len, data.micro_batch_size))
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
    from recipe.data.build import check_data_source, is_built
    from recipe.data.shards import index_domains

    tokenizer = getattr(data, "tokenizer_path", None)
    if tokenizer and not Path(tokenizer).is_file():
        raise ConfigError(f"data.tokenizer_path {tokenizer} does not exist; pass a tiktoken BPE file or leave it "
                          "unset for Llama 3's")
    data_dir = Path(data.data_dir)
    if not is_built(data_dir):
        # Curated or built on first use (its vocabulary is then the tokenizer's), or a
        # one-line error naming the missing directory and the commands that build it.
        check_data_source(data_dir, getattr(data, "curate_config", None), data.build_demo)
        return
    index = json.loads((data_dir / "train" / "index.json").read_text())
    if int(index["vocab_size"]) > arch.vocab_size:
        raise ModelConfigError(f"{data_dir} was tokenized with a {index['vocab_size']}-token vocabulary but "
                               f"model.arch.vocab_size={arch.vocab_size}; set vocab_size to at least "
                               f"{index['vocab_size']}")
    from recipe.plan import MixSettings

    mixes = [s for s in (getattr(cb, "run_plan_settings", None) for cb in trainer.callbacks)
             if isinstance(s, MixSettings)]
    active_mix = getattr(data, "active_mix", None)
    mix = mixes[0] if mixes else None
    if mix is not None and callable(active_mix):  # the data's `mix` setting may turn it off
        mix = active_mix(mix)
    if mix is not None:
        domains = index_domains(data_dir / "train")
        unknown = [d for d in mix.domains if d not in domains]
        if unknown:
            raise ConfigError(f"the data mix names domain {unknown[0]!r} but {data_dir} has {', '.join(domains)}; "
                              "fix the mix weights, rebuild the data with that domain, or turn the mix off with "
                              "--data.mix false")
