"""Curation pipeline: each stage drops exactly its planted cases, with a counted reason, deterministically."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest

from recipe.data.cli import main as data_main
from recipe.data.curate.langid import identify_language
from recipe.data.curate.minhash import MinHasher, band_keys, lsh_clusters
from recipe.data.curate.pipeline import CurateConfig, curate, load_config
from recipe.data.curate.quality import QualityClassifier, train_classifier
from recipe.data.curate.record import Doc
from recipe.data.curate.safety import PiiMask, mask_pii
from recipe.data.curate.synthetic import low_quality_texts, reference_texts
from recipe.data.curate.tasks import tasks_dir
from recipe.data.curate.url_dedup import normalize_url, parse_date
from recipe.data.errors import DataError
from recipe.data.shards import ShardSet
from recipe.errors import ConfigError

COOKIE = "We use cookies to improve your experience on this site. By continuing you accept our cookie policy."
FRENCH = (
    "La ville est située au bord du fleuve et compte environ deux cent mille habitants. Son histoire remonte à "
    "l'époque romaine, lorsque les marchands y établirent un port. Au Moyen Âge, la cathédrale fut construite en "
    "plusieurs étapes pendant près de deux siècles. L'économie de la région repose aujourd'hui sur l'agriculture, "
    "le tourisme et les services. Le climat est tempéré, avec des hivers doux et des étés parfois très chauds."
)
GERMAN = (
    "Die Stadt liegt an einem großen Fluss und hat ungefähr zweihunderttausend Einwohner. Ihre Geschichte reicht "
    "bis in die Römerzeit zurück, als Händler hier einen Hafen gründeten. Im Mittelalter wurde der Dom in mehreren "
    "Abschnitten über fast zwei Jahrhunderte gebaut. Die Wirtschaft der Region beruht heute vor allem auf "
    "Landwirtschaft, Tourismus und Dienstleistungen. Das Klima ist gemäßigt, mit milden Wintern."
)
CODE = '''import os


def find_files(root, suffix=".py"):
    """Yield the paths under root that end with suffix, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffix):
                yield os.path.join(dirpath, name)


class Counter:
    def __init__(self):
        self.total = 0

    def add(self, value):
        self.total += value
        return self.total
'''
MATH = """Problem: Solve 3x + 7 = 22 for x.

Solution:
- Subtract 7 from both sides: 3x = 22 - 7 = 15.
- Divide both sides by 3: x = 15 / 3 = 5.
- Check: 3 x 5 + 7 = 22, which equals 22.

Answer: x = 5
"""
SPAM = (
    "Are you looking for the best deals on the web? Click here and buy it now, this is the place to be! We have "
    "cheap watches and phones for you, with free shipping on all of your orders. Sign up today and you can win a "
    "free gift card. Do not miss out on the sale, it ends soon. Order now and save more than ever before, it is "
    "so easy to get the lowest prices near me. Check out our hot offers and subscribe for more of the top deals."
)
DIRTY = " ".join(random.Random(1).choices(["xxx", "porn", "nude", "sexy", "nsfw", "camgirls", "free", "hot", "videos",
                                           "girls", "live", "chat", "now", "best", "site", "watch", "new", "online"],
                                          k=90))  # fmt: skip
LOG = "\n".join(f"2024-03-0{1 + i % 9} 12:00:{i % 60:02d} ERROR worker could not connect to the database, retrying"
                for i in range(40))  # fmt: skip


def jaccard5(a: str, b: str) -> float:
    def shingles(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def edit_words(text: str, fraction: float, seed: int) -> str:
    """Replace ``fraction`` of the words by common ones (no outlier tokens)."""
    rng = random.Random(seed)
    ws = text.split(" ")
    for i in rng.sample(range(len(ws)), int(len(ws) * fraction)):
        ws[i] = rng.choice(["the", "a", "this", "that", "one", "new", "old", "some"])
    return " ".join(ws)


@pytest.fixture(scope="module")
def tok():
    from recipe.tokenizer import Tokenizer

    return Tokenizer()


@pytest.fixture(scope="module")
def refs() -> list[str]:
    """Real English prose (the Python reference topics) that passes every filter."""
    from recipe.data.curate.detect import code_score, math_score
    from recipe.data.curate.heuristics import Repetition

    rep = Repetition()
    texts = [t[:2500] for t in reference_texts()
             if code_score(t) < 0.15 and math_score(t) < 0.1 and len(t.split()) >= 120]  # fmt: skip
    texts = [t for t in texts if not rep.reason(t)]
    # pydoc_data ships with CPython; without it these tests have no real prose to plant.
    assert len(texts) >= 30, "pydoc_data (the standard library's reference topics) is missing from this Python"
    return texts


@pytest.fixture(scope="module")
def model_path(refs, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("classifier")
    (d / "pos.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in refs[16:]))
    (d / "neg.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in low_quality_texts(120, seed=3)))
    _, metrics = train_classifier(d / "pos.jsonl", d / "neg.jsonl", d / "quality.npz", dim=1 << 16)
    assert metrics["train_accuracy"] == 1.0
    return d / "quality.npz"


def planted_corpus(path: Path, refs: list[str]) -> tuple[dict[str, tuple[str, str]], int]:
    """Write the corpus; return {source: (stage, reason)} of the expected drops, and the expected kept count."""
    lines: list[str | bytes] = []
    expect: dict[str, tuple[str, str]] = {}
    kept = 0

    def add(record, drop: tuple[str, str] | None = None) -> None:
        nonlocal kept
        lines.append(record if isinstance(record, (str, bytes)) else json.dumps(record, ensure_ascii=False))
        if drop is None:
            kept += 1
        else:
            expect[f"corpus.jsonl:{len(lines)}"] = drop

    good = refs[:16]
    # Good documents; the first eight carry the same cookie banner (line dedup removes the line, keeps them).
    for i, text in enumerate(good[:10]):
        add({"text": f"{text}\n{COOKIE}" if i < 8 else text, "url": f"https://site.org/doc/{i}", "date": "2024-01-01"})
    add({"text": COOKIE + "\n" + COOKIE.upper(), "url": "https://site.org/cookies"},
        ("line_dedup", "all_lines_duplicated"))  # fmt: skip
    # URL dedup: an older crawl first, then the newest, then a spelling variant without a date.
    add({"text": good[10] + " (old version)", "url": "https://site.org/page", "date": "2023-01-01"},
        ("url_dedup", "url_duplicate"))  # fmt: skip
    add({"text": good[10], "url": "https://site.org/page", "date": "2024-06-01T10:00:00Z"})
    add({"text": good[10] + " mirror", "url": "HTTPS://WWW.site.org/page/?utm_source=x#top"},
        ("url_dedup", "url_duplicate"))  # fmt: skip
    # Exact and near duplicates; a distant edit stays.
    add({"text": good[11]})
    add({"text": good[11]}, ("near_dedup", "exact_duplicate"))
    add({"text": good[12]})
    add({"text": edit_words(good[12], 0.02, seed=1)}, ("near_dedup", "near_duplicate"))
    add({"text": good[13]})
    add({"text": edit_words(good[13], 0.25, seed=2)})
    # Heuristics, safety, quality.
    add({"text": LOG}, ("repetition", "top_3gram"))
    add({"text": DIRTY, "url": "https://videos.example.net/1"}, ("dirty_words", "dirty_words"))
    add({"text": good[14][:1200], "url": "https://sub.blocked.example/x"}, ("blocklist", "blocked_domain"))
    rng = random.Random(0)
    gib = " ".join("".join(rng.choices("bcdfghjklmnpqrstvwxz", k=rng.randint(4, 9))) for _ in range(60))
    # Random consonant strings: token_kl's character check drops them before their KL score is looked at.
    add({"text": gib}, ("token_kl", "random_chars"))
    add({"text": SPAM}, ("quality", "low_quality"))
    add({"text": good[15][:1500] + "\n\nContact: jane.doe@example.org, +1 (555) 010-2000, server 192.0.2.7."})
    add({"text": "# A Title\n\nSome **bold** words and a [link](https://x.org) in " + good[14][:900]})
    # Domains: code, math and other languages without a domain field, and record fields that win.
    add({"text": CODE})
    add({"text": MATH})
    add({"text": FRENCH})
    add({"text": GERMAN})
    add({"text": good[14][1000:2400], "domain": "Prose"})
    # Broken input: quarantined by the reader.
    add(b'{"text": "caf\xe9 latin-1", "url": "x"}', ("read", "invalid_utf8"))
    add('{"text": "unterminated', ("read", "malformed_json"))
    add({"body": "no text field"}, ("read", "missing_text"))
    add({"text": 42}, ("read", "text_not_string"))
    add({"text": "  \n "}, ("read", "empty"))
    add({"text": "word " * 20_000}, ("read", "too_large"))
    add(["not", "an", "object"], ("read", "not_an_object"))
    with open(path, "wb") as f:
        for rec in lines:
            f.write((rec if isinstance(rec, bytes) else rec.encode()) + b"\n")
    # The planted near-duplicates are what their names say.
    assert jaccard5(good[12], edit_words(good[12], 0.02, seed=1)) > 0.8
    assert jaccard5(good[13], edit_words(good[13], 0.25, seed=2)) < 0.3
    return expect, kept


def config(corpus: Path, out: Path, model: Path, **pack) -> CurateConfig:
    stages = [
        {"name": "clean"},
        {"name": "blocklist"},
        {"name": "url_dedup"},
        {"name": "near_dedup", "args": {"chunk_documents": 8}},
        {"name": "domains"},
        {"name": "line_dedup", "args": {"buckets": ["general", "multilingual"]}},
        {"name": "repetition", "args": {"buckets": ["general", "multilingual"]}},
        {"name": "dirty_words", "args": {"skip_buckets": ["code"]}},
        {"name": "token_kl", "args": {"max_kl": 7.0, "min_words": 50, "buckets": ["general"]}},
        {"name": "quality", "args": {"model": str(model), "buckets": ["general"]}},
        {"name": "pii"},
        {"name": "pack", "args": {"weights": None, "val_documents": 2, **pack}},
    ]
    return CurateConfig(input=[str(corpus)], output=str(out), stages=stages, workers=1, batch_documents=7,
                        max_document_chars=50_000, samples_per_reason=1000)  # fmt: skip


def drops_of(out: Path) -> dict[str, tuple[str, str]]:
    found = {}
    for f in sorted((out / "report" / "dropped").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            found[rec["source"]] = (f.name.split(".")[0], rec["reason"])
    for line in (out / "report" / "quarantine.jsonl").read_text().splitlines():
        rec = json.loads(line)
        found[rec["source"]] = ("read", rec["reason"])
    return found


@pytest.fixture(scope="module")
def curated(refs, model_path, tmp_path_factory):
    d = tmp_path_factory.mktemp("curate")
    expect, kept = planted_corpus(d / "corpus.jsonl", refs)
    report = curate(config(d / "corpus.jsonl", d / "out", model_path), log=lambda s: None, progress=False)
    return d, expect, kept, report


def test_each_stage_drops_exactly_its_planted_cases(curated):
    d, expect, kept, report = curated
    assert drops_of(d / "out") == expect
    assert report["documents_written"] == kept
    assert report["documents_read"] == len(expect) + kept


def test_nothing_is_dropped_without_a_counted_reason(curated):
    _, expect, _, report = curated
    stages = report["stages"]
    for s in stages:
        assert s["documents_in"] == s["documents_out"] + sum(r["documents"] for r in s["dropped"].values())
        assert s["bytes_out"] <= s["bytes_in"] or s["name"] == "read"
    for before, after in zip(stages, stages[1:]):
        assert after["documents_in"] == before["documents_out"]
    by_stage = {s["name"]: s["documents_dropped"] for s in stages}
    assert sum(by_stage.values()) == len(expect)


def test_text_stages_rewrite_without_dropping(curated, tok):
    d, _, _, report = curated
    counters = {s["name"]: s["counters"] for s in report["stages"]}
    assert counters["line_dedup"]["lines_removed"] == 8 + 2  # the banner in 8 documents, and the banner-only one
    assert counters["pii"] == {"documents_masked": 1, "emails_masked": 1, "phones_masked": 1, "ips_masked": 1}
    assert counters["domains"]["bucket:code"] == 1 and counters["domains"]["bucket:math"] == 1
    assert counters["domains"]["bucket:multilingual"] == 2
    texts = []
    for split in ("train", "val"):
        s = ShardSet(d / "out" / split)
        texts += [tok.decode(s.document(i)[1:-1]) for i in range(s.num_documents)]
    joined = "\n".join(texts)
    assert COOKIE not in joined and "[EMAIL]" in joined and "jane.doe" not in joined and "[PHONE]" in joined
    assert "A Title\n\nSome bold words and a link in" in joined  # Markdown markers gone, words kept
    assert "        for name in sorted(filenames):\n            if name.endswith(suffix):" in joined  # indentation


def test_shards_have_one_domain_per_bucket_and_load(curated, tok):
    d, _, kept, report = curated
    train, val = ShardSet(d / "out" / "train"), ShardSet(d / "out" / "val")
    assert val.num_documents == 2 and train.num_documents + val.num_documents == kept
    assert set(train.domains) | set(val.domains) == {"general", "code", "math", "multilingual"}
    assert train.vocab_size == tok.n_words and train.report["mix"]["code"]["documents_kept"] == 1
    for name in ("report.json", "report.md", "report.html"):
        assert (d / "out" / "report" / name).stat().st_size > 0
    assert "data:image/png;base64," in (d / "out" / "report" / "report.html").read_text()
    assert "| near_dedup |" in (d / "out" / "report" / "report.md").read_text()
    assert not (d / "out" / "work").exists()


def test_rerun_is_deterministic_with_worker_processes(curated, model_path):
    d, _, _, first = curated
    cfg = config(d / "corpus.jsonl", d / "again", model_path)
    cfg.workers = 2
    second = curate(cfg, log=lambda s: None, progress=False)
    for split in ("train", "val"):
        for f in sorted((d / "out" / split).glob("*.npy")):
            assert np.array_equal(np.load(f), np.load(d / "again" / split / f.name)), f.name

    def strip(r):
        return [{k: v for k, v in s.items() if k != "seconds"} for s in r["stages"]]

    assert strip(first) == strip(second) and first["mix"] == second["mix"]
    assert drops_of(d / "out") == drops_of(d / "again")


def test_interrupted_run_leaves_nothing_that_looks_complete(curated, model_path, monkeypatch):
    d, *_ = curated
    from recipe.data.curate.kl_filter import TokenKL

    def boom(self, docs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TokenKL, "process", boom)
    out = d / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        curate(config(d / "corpus.jsonl", out, model_path), log=lambda s: None, progress=False)
    # Only its finished tasks, which a rerun restores (tests/test_curate_restart.py).
    assert not out.exists() and [p.name for p in d.glob("interrupted.*")] == ["interrupted.tasks"]
    monkeypatch.undo()
    # A killed run (its pid is gone) leaves a temp folder: the next run removes it and publishes.
    stale = d / f"interrupted.tmp-{2**22 + 12345}"
    (stale / "train").mkdir(parents=True)
    curate(config(d / "corpus.jsonl", out, model_path), log=lambda s: None, progress=False)
    assert not stale.exists() and (out / "train" / "index.json").is_file() and not tasks_dir(out).exists()
    with pytest.raises(DataError, match="already exists"):
        curate(config(d / "corpus.jsonl", out, model_path), log=lambda s: None, progress=False)


def test_mix_downsamples_to_the_weights(curated, model_path):
    d, *_ = curated
    out = d / "mixed"
    report = curate(config(d / "corpus.jsonl", out, model_path,
                           weights={"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08}),
                    log=lambda s: None, progress=False)  # fmt: skip
    mix = report["mix"]
    # The smallest bucket for its weight limits the budget; the others are cut to their share.
    assert mix["math"]["documents_kept"] == 1 and mix["general"]["documents_kept"] < mix["general"]["documents"]
    assert abs(mix["general"]["target_tokens"] - 2 * mix["math"]["tokens"]) <= 1
    # Documents are taken whole, in order of a hash of their text, until the target is reached.
    assert mix["general"]["documents_kept"] == 1 and mix["general"]["tokens_kept"] >= mix["general"]["target_tokens"]
    dropped = {s["name"]: s["dropped"] for s in report["stages"]}["pack"]
    assert dropped["mix_downsample"]["documents"] == sum(m["documents"] - m["documents_kept"] for m in mix.values())


# ----------------------------------------------------------------------------- stage units


def test_minhash_estimates_jaccard_and_lsh_keeps_the_first(refs):
    base = refs[:6]
    near = [edit_words(t, 0.01, seed=i) for i, t in enumerate(base)]  # Jaccard about 0.9: far above the S-curve
    sig, has = MinHasher(num_perm=128).signatures(base + near + [""])
    assert has[:12].all() and not has[12]
    for i in range(6):
        assert abs(float((sig[i] == sig[6 + i]).mean()) - jaccard5(base[i], near[i])) < 0.15
    rep = lsh_clusters(band_keys(sig, 16, 8), sig, has, threshold=0.7)
    assert rep.tolist() == list(range(6)) * 2 + [12]
    sig2, _ = MinHasher(num_perm=128).signatures(near[::-1])  # no dependence on batch composition
    assert np.array_equal(sig2[::-1], sig[6:12])


def test_url_normalization_and_dates():
    assert normalize_url("HTTPS://WWW.Site.org:443/a/b/?utm_source=x&b=2&a=1#frag") == "https://site.org/a/b?a=1&b=2"
    assert parse_date("2024-06-01T10:00:00Z") > parse_date("2024-06-01") > parse_date("2023/12/31")
    assert parse_date("last tuesday") is None and parse_date(None) is None


def test_pii_masking_and_its_false_positives():
    text, counts = mask_pii("write to a.b+c@mail.example.com, call 020 7946 0958 or +1 (555) 123-4567; host 10.0.0.1")
    assert text == "write to [EMAIL], call [PHONE] or [PHONE]; host [IP]"
    assert counts == {"emails": 1, "phones": 2, "ips": 1}
    clean = "On 2024-01-15 Python 3.11.7 computed 1,234 + 567 = 1,801 and x[1::2]; see @property."
    assert mask_pii(clean) == (clean, {"emails": 0, "phones": 0, "ips": 0})


def test_pii_in_code_masks_only_the_kinds_configured_for_code():
    stage = PiiMask(kinds_by_bucket={"code": ["emails"]})
    line = 'ADMIN = "ops@example.com"; HOST = "10.0.0.1"; MAGIC = "555-123-4567"'
    code, prose = Doc(line, "t", bucket="code"), Doc(line, "t", bucket="general")
    stage.process([code, prose])
    assert code.text == 'ADMIN = "[EMAIL]"; HOST = "10.0.0.1"; MAGIC = "555-123-4567"'
    assert prose.text == 'ADMIN = "[EMAIL]"; HOST = "[IP]"; MAGIC = "[PHONE]"'
    with pytest.raises(ConfigError, match="names phone; choose from emails, phones, ips"):
        PiiMask(kinds_by_bucket={"code": ["phone"]})


def test_language_identification():
    samples = (FRENCH, GERMAN, MATH, "Это простой текст на русском языке.", "这是中文")
    assert [identify_language(t) for t in samples] == ["fr", "de", "en", "ru", "zh"]


def test_classifier_saves_without_pickle_and_cli_trains(tmp_path, refs):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in refs[:20]))
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in low_quality_texts(100)))
    assert data_main(["train-classifier", "--positives", str(tmp_path / "p.jsonl"), "--negatives",
                      str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "m.npz"), "--dim", "4096"]) == 0  # fmt: skip
    model = QualityClassifier.load(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as z:
        assert z["weights"].dtype == np.float32 and z["weights"].shape == (4096,)
    scores = model.score([refs[25], SPAM, *low_quality_texts(5, seed=7)])
    assert scores[0] > 0.5 > scores[1:].max()
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a quality classifier"):
        QualityClassifier.load(tmp_path / "bad.npz")


def test_cli_curate_and_config_errors(tmp_path, refs, model_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": "prose"}) + "\n" for t in refs[:6]))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"input: {corpus}\noutput: {tmp_path / 'out'}\nworkers: 1\nstages:\n  - clean\n"
                   f"  - name: near_dedup\n  - name: pack\n"
                   f"    args: {{weights: null, val_documents: 1}}\n")  # fmt: skip
    assert data_main(["curate", "--config", str(cfg), "--no-progress"]) == 0
    assert ShardSet(tmp_path / "out" / "train").num_documents == 5
    assert data_main(["info", str(tmp_path / "out")]) == 0
    bad = tmp_path / "bad.yaml"
    for body, message in [(f"input: {corpus}\noutput: x\nstages: [{{name: nope}}]\n", "unknown stage 'nope'"),
                          (f"input: {corpus}\noutput: x\nshards: 3\n", "unknown key(s) shards"),
                          ("output: x\n", "missing 'input'"),
                          (f"input: {corpus}\noutput: x\nstages: [{{name: near_dedup, args: {{bands: 99}}}}]\n",
                           "exceeds num_perm")]:  # fmt: skip
        bad.write_text(body)
        with pytest.raises(ConfigError, match=re.escape(message)) as e:
            load_config(bad)
        assert "\n" not in str(e.value)
    capsys.readouterr()
    assert data_main(["curate", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not os.path.exists("x")
