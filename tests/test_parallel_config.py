"""Layouts that cannot work fail early with one line naming the constraint (no process group needed)."""

import pytest
import torch

from recipe.errors import ConfigError
from recipe.model import ModelArgs, Transformer
from recipe.parallel.activation_checkpoint import apply_activation_checkpointing
from recipe.parallel.mesh import ParallelDims


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_dp_shard_fills_the_world():
    dims = ParallelDims(pp=2, cp=2, tp=2).resolved(16)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp, dims.dp) == (2, 1, 2, 2, 2, 2)


@pytest.mark.parametrize("dims,world,needle", [
    (ParallelDims(dp_shard=2, tp=2), 8, "= 4 but the world has 8"),
    (ParallelDims(tp=3), 8, "not divisible by pp x dp_replicate x cp x tp = 3"),
    (ParallelDims(tp=0), 8, "tp=0 must be >= 1"),
])
def test_sizes_must_multiply_to_the_world(dims, world, needle):
    with pytest.raises(ConfigError) as err:
        dims.resolved(world)
    assert needle in one_line(err)


def test_model_constraints():
    with pytest.raises(ConfigError) as err:
        ParallelDims(tp=4).validate_model(n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=100, dim=64)
    assert "n_kv_heads=2" in one_line(err)
    with pytest.raises(ConfigError) as err:
        ParallelDims(pp=4).validate_model(n_layers=6, n_heads=8, n_kv_heads=8, vocab_size=100, dim=64,
                                          stages_per_rank=2)
    assert "exceed the model's 6 layers" in one_line(err)


def test_batch_constraints():
    assert ParallelDims(dp_shard=2, cp=2, tp=2).check_batch(batch_size=8, seq_len=32, micro_batch_size=2) == 2
    with pytest.raises(ConfigError) as err:
        ParallelDims(dp_shard=1, cp=2, tp=2).check_batch(batch_size=8, seq_len=36, micro_batch_size=1)
    assert "2 x cp x tp = 8" in one_line(err)
    with pytest.raises(ConfigError) as err:
        ParallelDims(dp_shard=4).check_batch(batch_size=6, seq_len=32, micro_batch_size=1)
    assert "not divisible by the data-parallel size 4" in one_line(err)
    with pytest.raises(ConfigError) as err:
        ParallelDims(dp_shard=2).check_batch(batch_size=6, seq_len=32, micro_batch_size=2)
    assert "multiple of dp_size x micro_batch_size = 4" in one_line(err)


def test_pipeline_micro_batch_constraints():
    assert ParallelDims(pp=2, dp_shard=1).check_batch(1, 8, 1, "GPipe") == 1
    with pytest.raises(ConfigError) as err:
        ParallelDims(pp=4, dp_shard=1).check_batch(2, 8, 1, "1F1B")
    assert "at least pp=4 micro-batches" in one_line(err)
    with pytest.raises(ConfigError) as err:
        ParallelDims(pp=2, dp_shard=1).check_batch(3, 8, 1, "Interleaved1F1B", stages_per_rank=2)
    assert "divisible by pp=2" in one_line(err)


def test_activation_checkpointing_keeps_names_and_gradients():
    args = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                     ffn_dim_multiplier=None, max_seq_len=32)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    checkpointed = Transformer(args)
    checkpointed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(checkpointed, "selective", every_n=2) == 2
    assert apply_activation_checkpointing(Transformer(args), "full") == 4
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    tokens = torch.randint(0, 50, (2, 16))
    for model in (plain, checkpointed):
        model(tokens).logsumexp(-1).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    with pytest.raises(ConfigError):
        apply_activation_checkpointing(plain, "sometimes")
