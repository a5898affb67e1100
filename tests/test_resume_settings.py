"""Settings against a checkpoint's on resume (``recipe.resume``): what must match, what may change."""

import json

import pytest

from recipe.config import ModelArgs, OptimizerConfig, RopeScaling
from recipe.resume import (
    SETTINGS_KEY,
    SettingsMismatchError,
    check_settings,
    compare,
    data_identity,
    flatten,
    saved_settings,
)


def shards(tmp_path, checksum: str = "crc32:0000abcd", vocab: int = 128256):
    index = {"vocab_size": vocab, "bos_id": 1, "eos_id": 2, "num_tokens": 100,
             "shards": [{"name": "shard_00000", "num_tokens": 100, "domain": "default",
                         "checksum": {"tokens": checksum, "docs": "crc32:00000001"}}]}
    (tmp_path / "train").mkdir(parents=True, exist_ok=True)
    (tmp_path / "train" / "index.json").write_text(json.dumps(index))
    return tmp_path


def settings(arch: ModelArgs, lr: float = 3e-4, data: dict | None = None) -> dict:
    return {**flatten({"arch": arch, "optimizer": OptimizerConfig(lr=lr)}, "model"), **(data or {})}


def test_the_data_is_identified_by_content_not_by_path(tmp_path):
    a = data_identity(shards(tmp_path / "a"))
    assert a == data_identity(shards(tmp_path / "moved"))
    assert a["data.content"] != data_identity(shards(tmp_path / "b", checksum="crc32:ffff0000"))["data.content"]
    assert data_identity(tmp_path / "missing") == {}


def test_architecture_and_data_must_match_while_training_settings_may_change(tmp_path):
    arch = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    before = settings(arch, data=data_identity(shards(tmp_path / "a")))
    after = settings(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=1), lr=1e-3,
                     data=data_identity(shards(tmp_path / "b", checksum="crc32:ffff0000", vocab=256)))
    mismatched, changed = compare(before, after)
    assert [m.split()[0] for m in mismatched] == ["data.content", "data.tokenizer", "data.vocab_size",
                                                  "model.arch.n_kv_heads"]
    assert changed == ["model.optimizer.lr 0.0003 -> 0.001"]
    with pytest.raises(SettingsMismatchError, match=r"must match to resume it: data\.content .*n_kv_heads 2 -> 1"):
        check_settings({SETTINGS_KEY: before}, after, "ckpt")


def test_a_rope_scaling_added_on_resume_is_a_listed_change(caplog):
    before = settings(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
    after = settings(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_scaling=RopeScaling(factor=8.0)))
    mismatched, changed = compare(before, after)
    assert not mismatched and "model.arch.rope_scaling.factor unset -> 8.0" in changed
    check_settings({SETTINGS_KEY: before}, after, "ckpt")
    assert any("with changed settings" in r.getMessage() and "rope_scaling.factor" in r.getMessage()
               for r in caplog.records)


def test_checkpoints_without_a_settings_record_compare_their_hyperparameters():
    # Older checkpoints saved the RoPE a context stage had set: not compared, nor missing keys.
    arch = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    old = {"hyper_parameters": {"arch": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, rope_theta=1e6)},
           "datamodule_hyper_parameters": {"seq_len": 128}}
    saved = saved_settings(old)
    assert "model.arch.rope_theta" not in saved and saved["data.seq_len"] == 128
    check_settings(old, {**settings(arch), "data.seq_len": 128}, "ckpt")
    with pytest.raises(SettingsMismatchError, match=r"model\.arch\.dim 64 -> 32"):
        check_settings(old, settings(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2)), "ckpt")
