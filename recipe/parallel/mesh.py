"""Parallel layout: five sizes -> one DeviceMesh with the views each concern needs.

Mesh dimensions, outermost first: ``(pp, dp_replicate, dp_shard, cp, tp)``. The paper
orders [TP, CP, PP, DP] innermost first: consecutive ranks (fastest links) form a TP
group, then CP, then DP. This layout keeps TP innermost and CP next; PP sits outermost,
as in torchtitan, because its point-to-point traffic is the lightest (size-1 axes cost
nothing, so a plain FSDP run is just ``dp_shard = world``).

Flattened views:
  ``dp``           dp_replicate x dp_shard     - the data loader's rank and size
  ``dp_shard_cp``  dp_shard x cp               - FSDP shards parameters over it
  ``dp_cp``        dp_replicate x dp_shard x cp - token counts and loss are summed over it
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from recipe.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    """Sizes of each parallel axis; ``dp_shard=-1`` takes whatever the world leaves."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1

    def resolved(self, world_size: int) -> ParallelDims:
        """A copy with ``dp_shard`` filled in, checked against ``world_size``."""
        for name in ("pp", "dp_replicate", "cp", "tp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel size {name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ConfigError(f"dp_shard={self.dp_shard} must be >= 1, or -1 for 'the rest of the world'")
        others = self.pp * self.dp_replicate * self.cp * self.tp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ConfigError(
                    f"world size {world_size} is not divisible by pp x dp_replicate x cp x tp = {others}; "
                    "change the parallel sizes or the number of devices"
                )
            dp_shard = world_size // others
        if others * dp_shard != world_size:
            raise ConfigError(
                f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={dp_shard} x cp={self.cp} x tp={self.tp}"
                f" = {others * dp_shard} but the world has {world_size} processes; make the product equal the "
                "device count (or set dp_shard: -1)"
            )
        return ParallelDims(self.pp, self.dp_replicate, dp_shard, self.cp, self.tp)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different batch shares are processed at once."""
        return self.dp_replicate * self.dp_shard

    def validate_model(self, n_layers: int, n_heads: int, n_kv_heads: int, vocab_size: int, dim: int,
                       stages_per_rank: int = 1) -> None:
        """Check that the model can be cut as asked; one-line errors name the fix."""
        if n_heads % self.tp or n_kv_heads % self.tp:
            raise ConfigError(
                f"tp={self.tp} must divide n_heads={n_heads} and n_kv_heads={n_kv_heads}; "
                f"choose tp among the common divisors"
            )
        if dim % self.tp:
            raise ConfigError(f"tp={self.tp} must divide the model dim {dim}")
        if self.pp * stages_per_rank > n_layers:
            raise ConfigError(
                f"pp={self.pp} x {stages_per_rank} stages per rank = {self.pp * stages_per_rank} stages exceed "
                f"the model's {n_layers} layers; lower pp or stages_per_rank"
            )

    def check_batch(self, batch_size: int, seq_len: int, micro_batch_size: int, pp_schedule: str = "1F1B",
                    stages_per_rank: int = 1) -> int:
        """The batch-layout rule: can this mesh cut a step of ``batch_size`` global sequences of
        ``seq_len`` tokens into micro-batches of ``micro_batch_size``?

        Returns the micro-batches per data-parallel rank; raises a one-line ``ConfigError``
        naming the fix otherwise. The one place the rule lives: the data stream, the config
        checks before launch and the run plan's layouts all go through it.
        """
        if self.dp_shard == -1:
            raise ValueError("check_batch needs resolved sizes: call resolved(world_size) first")
        dp = self.dp
        if batch_size < 1 or micro_batch_size < 1 or seq_len < 1 or dp < 1:
            raise ConfigError(
                f"global_batch_size={batch_size}, micro_batch_size={micro_batch_size}, seq_len={seq_len} and "
                f"dp_size={dp} must all be >= 1"
            )
        if batch_size % dp:
            raise ConfigError(
                f"global_batch_size={batch_size} is not divisible by the data-parallel size {dp}; "
                f"choose a global_batch_size that is a multiple of {dp}"
            )
        local = batch_size // dp
        if local % micro_batch_size:
            raise ConfigError(
                f"global_batch_size={batch_size} / dp_size={dp} = {local} sequences per rank is not a "
                f"multiple of micro_batch_size={micro_batch_size}; make global_batch_size a multiple of "
                f"dp_size x micro_batch_size = {dp * micro_batch_size}"
            )
        chunk = 2 * self.cp * self.tp
        if self.cp * self.tp > 1 and seq_len % chunk:
            raise ConfigError(
                f"seq_len={seq_len} must be divisible by 2 x cp x tp = {chunk} (context-parallel chunks, "
                "sequence-parallel shards); change seq_len or the parallel sizes"
            )
        n_micro = local // micro_batch_size
        if self.pp > 1:
            if pp_schedule.lower() != "gpipe" and n_micro < self.pp:
                raise ConfigError(
                    f"pipeline schedule {pp_schedule} needs at least pp={self.pp} micro-batches per step, got "
                    f"{n_micro} (global_batch_size / dp / micro_batch_size); raise global_batch_size or lower "
                    "micro_batch_size"
                )
            if stages_per_rank > 1 and n_micro % self.pp:
                raise ConfigError(
                    f"interleaved schedule {pp_schedule} with {self.pp * stages_per_rank} stages needs a micro-batch "
                    f"count divisible by pp={self.pp}, got {n_micro}; adjust global_batch_size or micro_batch_size"
                )
        return n_micro

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The 5-D mesh with the flattened views described in the module docstring."""
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
        mesh["dp_replicate", "dp_shard"]._flatten("dp")
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        return mesh

    def __str__(self) -> str:
        return f"pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} cp={self.cp} tp={self.tp}"
