"""The step path: one process gives the module's own loss and gradients; unsupported strategies stop early."""

import pytest
import torch

from recipe.config import ModelArgs
from recipe.errors import ConfigError
from recipe.module import LlamaLightningModule
from recipe.parallel.step import check_strategy, step_path_for

ARCH = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, ffn_dim_multiplier=None,
            max_seq_len=16)


def test_a_strategy_the_step_cannot_run_under_is_refused_in_one_line():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    with pytest.raises(ConfigError, match="Parallel4DStrategy") as err:
        check_strategy(FSDPStrategy())
    assert "\n" not in str(err.value)
    check_strategy(DDPStrategy())
    check_strategy(SingleDeviceStrategy(device=torch.device("cpu")))
    with pytest.raises(ConfigError, match="Parallel4DStrategy"):
        step_path_for(FSDPStrategy(), torch.device("cpu"))


def test_one_process_path_gives_the_global_mean_gradient():
    torch.manual_seed(0)
    module = LlamaLightningModule(arch=ModelArgs(**ARCH))
    module.manual_backward = lambda loss: loss.backward()  # no trainer attached
    module.configure_model()
    tokens = torch.randint(0, 64, (3, 2, 9))  # 3 micro-batches of 2 rows, 8 targets each
    doc_ids = torch.zeros_like(tokens)
    doc_ids[..., 5:] = 1
    path = module.step_path
    loss = path.train(module, {"tokens": tokens, "doc_ids": doc_ids})
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad()
    rows, docs = tokens.flatten(0, 1), doc_ids.flatten(0, 1)
    logits = module.model(rows[:, :-1], doc_ids=docs[:, :-1])
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), atol=1e-6, rtol=1e-6)
    for name, param in module.model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-7, rtol=1e-5)
    norm = path.clip_grad_norm(module.model.parameters(), max_norm=None)
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.model.parameters()]))
    torch.testing.assert_close(norm, expected, atol=1e-6, rtol=1e-5)
    total, count = path.eval_sums(module, {"tokens": tokens, "doc_ids": doc_ids})
    assert int(count) == 48
    torch.testing.assert_close(path.mean_loss(total, count).float(), reference.detach(), atol=1e-6, rtol=1e-6)
