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

    def validate_batch(self, seq_len: int, global_batch_size: int, micro_batch_size: int) -> None:
        chunk = 2 * self.cp * self.tp
        if seq_len % chunk:
            raise ConfigError(
                f"seq_len={seq_len} must be divisible by 2 x cp x tp = {chunk} (context-parallel chunks, "
                "sequence-parallel shards); change seq_len or the parallel sizes"
            )
        if global_batch_size % (self.dp * micro_batch_size):
            raise ConfigError(
                f"global_batch_size={global_batch_size} must be a multiple of dp ({self.dp}) x micro_batch_size "
                f"({micro_batch_size}) = {self.dp * micro_batch_size}"
            )

    def validate_pipeline(self, n_microbatches: int, schedule: str, stages_per_rank: int) -> None:
        """Micro-batch counts the pipeline schedules can take (checked before the first step)."""
        if self.pp == 1:
            return
        stages = self.pp * stages_per_rank
        if schedule.lower() != "gpipe" and n_microbatches < self.pp:
            raise ConfigError(
                f"pipeline schedule {schedule} needs at least pp={self.pp} micro-batches per step, got "
                f"{n_microbatches} (global_batch_size / dp / micro_batch_size); raise global_batch_size or lower "
                "micro_batch_size"
            )
        if stages_per_rank > 1 and n_microbatches % self.pp:
            raise ConfigError(
                f"interleaved schedule {schedule} with {stages} stages needs a micro-batch count divisible by "
                f"pp={self.pp}, got {n_microbatches}; adjust global_batch_size or micro_batch_size"
            )

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
