"""Shard checksums and token-range checks: at open, and by ``recipe data verify``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recipe.cli import main as recipe_main
from recipe.data import shards as shards_mod
from recipe.data.cli import main as data_main
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet, ShardWriter, file_checksum
from recipe.data.stream import TokenStream

VOCAB = 50


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    # Each test builds its own files; never let one test's verified shards skip another's checks.
    monkeypatch.setattr(shards_mod, "_VERIFIED", set())


def make_set(path: Path, docs: int = 12, shard_tokens: int = 40) -> Path:
    rng = np.random.default_rng(0)
    with ShardWriter(path, vocab_size=VOCAB, bos_id=1, eos_id=2, shard_tokens=shard_tokens) as w:
        for _ in range(docs):
            w.add([1, *rng.integers(3, VOCAB, size=int(rng.integers(3, 12))).tolist(), 2],
                  domain="code" if _ % 3 == 0 else "prose")  # fmt: skip
    return path


def make_data_dir(root: Path) -> Path:
    make_set(root / "train")
    make_set(root / "val", docs=4)
    return root


def one_line(msg: str) -> str:
    assert "\n" not in msg.strip() and "Traceback" not in msg
    return msg


def rewrite_tokens(path: Path, name: str, fn, keep_checksum_valid: bool) -> Path:
    """Change a shard's tokens in place (same shape and dtype); optionally re-record its checksum."""
    f = path / f"{name}.tokens.npy"
    a = np.load(f)
    fn(a)
    np.save(f, a)
    if keep_checksum_valid:
        index = json.loads((path / "index.json").read_text())
        for s in index["shards"]:
            if s["name"] == name:
                s["checksum"]["tokens"] = file_checksum(f)
        (path / "index.json").write_text(json.dumps(index))
    return f


def test_index_records_a_checksum_per_file(tmp_path):
    s = ShardSet(make_set(tmp_path / "s"))
    assert len(s.shard_names) > 2 and s.has_checksums
    for name, c in zip(s.shard_names, s.shard_checksums):
        assert c == {"tokens": file_checksum(s.path / f"{name}.tokens.npy"),
                     "docs": file_checksum(s.path / f"{name}.docs.npy")}  # fmt: skip
        assert c["tokens"].startswith("crc32:")


def test_clean_set_reads_and_verifies(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d")
    s = ShardSet(root / "train")
    tokens, _ = s.window(0, s.num_tokens * 2)
    assert tokens.max() < VOCAB
    assert next(iter(TokenStream(s, 5, 4, 2, num_steps=1)))["tokens"].shape[-1] == 6
    assert data_main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK,") == 2 and "checksums match" in out


def test_out_of_vocabulary_ids_give_one_line_error_naming_the_file(tmp_path, capsys):
    path = make_set(tmp_path / "s")
    # A valid checksum over wrong ids: a shard built with another (bigger) tokenizer.
    bad = rewrite_tokens(path, "shard_00001", lambda a: a.__setitem__(3, 5000), keep_checksum_valid=True)
    s = ShardSet(path)  # the index and shapes are fine: the error comes when the tokens are opened
    with pytest.raises(DataError) as e:
        s.window(0, 8)
    msg = one_line(str(e.value))
    assert str(bad) in msg and "5000" in msg and "recipe data build" in msg
    with pytest.raises(DataError, match="outside the vocabulary"):
        next(iter(TokenStream(ShardSet(path), 5, 4, 2, num_steps=1)))  # not an IndexError from the embedding
    assert data_main(["verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "FAILED" in captured.out


def test_zeroed_bytes_give_checksum_mismatch_on_open_and_in_verify(tmp_path, capsys):
    root = make_data_dir(tmp_path / "d")
    # Zeros are in-vocabulary ids: only the checksum can tell.
    bad = rewrite_tokens(root / "train", "shard_00002", lambda a: a.__setitem__(slice(2, 10), 0),
                         keep_checksum_valid=False)  # fmt: skip
    s = ShardSet(root / "train")
    with pytest.raises(DataError) as e:
        s.window(0, 8)
    msg = one_line(str(e.value))
    assert str(bad) in msg and "checksum mismatch" in msg
    # The view of one domain opens (and checks) only that domain's shards.
    bad_domain = s.shard_domains[s.shard_names.index("shard_00002")]
    with pytest.raises(DataError, match="checksum mismatch"):
        ShardSet(root / "train").domain(bad_domain).window(0, 4)

    assert data_main(["verify", str(root)]) == 2
    captured = capsys.readouterr()
    assert str(bad) in captured.err and "checksum mismatch" in captured.err
    assert ": OK," in captured.out  # val is still fine
    assert recipe_main(["data", "verify", str(root / "train")]) == 2  # through the top-level command
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_old_index_without_checksums_loads_and_verify_says_skipped(tmp_path, capsys):
    path = make_set(tmp_path / "s")
    index = json.loads((path / "index.json").read_text())
    for s in index["shards"]:
        del s["checksum"]
    (path / "index.json").write_text(json.dumps(index))
    rewrite_tokens(path, "shard_00000", lambda a: a.__setitem__(1, 7), keep_checksum_valid=False)
    s = ShardSet(path)
    assert not s.has_checksums
    assert s.window(0, s.num_tokens)[0].shape == (s.num_tokens,)
    assert data_main(["verify", str(path)]) == 0
    assert "checksum check SKIPPED" in capsys.readouterr().out
    # The token range is still checked for an old index.
    rewrite_tokens(path, "shard_00000", lambda a: a.__setitem__(1, VOCAB), keep_checksum_valid=False)
    with pytest.raises(DataError, match="outside the vocabulary"):
        ShardSet(path).window(0, 4)


def test_verification_runs_once_per_process(tmp_path, monkeypatch):
    path = make_set(tmp_path / "s")
    ShardSet(path).window(0, 4)
    calls = []
    monkeypatch.setattr(ShardSet, "verify_shard", lambda self, i, tokens=None: calls.append(i))
    ShardSet(path).window(0, 4)
    assert calls == []
    ShardSet(path, verify=False).window(0, 4)
    assert calls == []


def test_fit_on_out_of_vocabulary_shard_stops_with_one_line(tmp_path, capsys):
    import yaml
    from cli_runs import tiny_fit_config

    root = make_data_dir(tmp_path / "d")
    # Id 1000 with a 64-token model: this used to end in the embedding's "IndexError: index out of range in self".
    bad = rewrite_tokens(root / "train", "shard_00000", lambda a: a.__setitem__(2, 1000), keep_checksum_valid=True)
    config = tiny_fit_config(tmp_path, root, "oov", 2, [], seed=0, checkpoint_every=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["arch"]["vocab_size"] = 64
    config.write_text(yaml.safe_dump(cfg))
    assert recipe_main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(bad) in lines[0] and "outside the vocabulary" in lines[0], err
    assert "IndexError" not in err and "Traceback" not in err
