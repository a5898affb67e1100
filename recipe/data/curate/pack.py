"""Stage 9: mix buckets by weight, tokenize, pack into train/val shards (one domain per bucket).

Tokenizing happens once, as documents arrive: tiktoken's BPE core on threads (straight
to uint32 buffers) turns a batch into ``[bos] + ids + [eos]``, appended per bucket to a
flat uint32 spill file. The mix needs every bucket's token
count before it can choose, so choosing waits for the end: with the default
(exact proportions) the largest token budget whose split by ``weights`` every present
bucket can fill; with ``total_tokens``, that budget split by the weights (a bucket
too small for its share is kept whole and the shortfall reported). Within a bucket
the documents with the smallest hash of their text are taken until its share is
reached (``mix_downsample`` for the rest), so the choice is deterministic and
order-free. Survivors go to ``train``/``val`` by the same text-hash rule as
``recipe data build``, each bucket into shards of its own domain (renamed by
``shard_domains``, e.g. ``general: prose`` for a training config that names prose).
The write is partitioned by shard: each full shard is written and checksummed by one of
``write_threads`` threads while the next fills (``ShardWriter``). All of it runs on the
driver's node under either executor: the spills and the output are local files there.
"""

from __future__ import annotations

import inspect
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from recipe.data.curate.record import Doc, hash01_pair
from recipe.data.curate.stage import Stage, register
from recipe.data.errors import DataError
from recipe.data.packing import Splitter, load_tokenizer
from recipe.data.shards import DEFAULT_SHARD_TOKENS, ShardWriter
from recipe.errors import ConfigError

__all__ = ["DEFAULT_WEIGHTS", "NothingSurvived", "Pack", "mix_targets"]

# The Llama 3 final mix (paper section 3.1.2): general knowledge, math and reasoning, code, multilingual.
DEFAULT_WEIGHTS = {"general": 0.50, "math": 0.25, "code": 0.17, "multilingual": 0.08}
_MIX_SALT = b"mix-sample"
_ENCODE_CHARS = 1_000_000  # characters per tokenizer call; two calls are in flight at most
_ENCODE_DOCS = 4096


def mix_targets(tokens: dict[str, int], weights: dict[str, float], total: int | None) -> dict[str, float]:
    """Token target per bucket. Buckets absent from ``weights`` keep everything (target = their tokens)."""
    present = {b: float(weights[b]) for b, n in tokens.items() if n > 0 and float(weights.get(b, 0.0)) > 0}
    norm = sum(present.values())
    targets = {b: float(n) for b, n in tokens.items() if b not in weights}
    if not present:
        return targets | {b: 0.0 for b in tokens if b in weights}
    share = {b: w / norm for b, w in present.items()}
    budget = float(total) if total is not None else min(tokens[b] / s for b, s in share.items())
    targets |= {b: (share[b] * budget if b in share else 0.0) for b in tokens if b in weights}
    return targets


class NothingSurvived(DataError):
    """Every document was dropped before packing: there is nothing to write."""


@register
class Pack(Stage):
    """Mix, tokenize and write ``<output>/train`` and ``<output>/val``; always the last stage.

    Args:
        weights: {bucket: mix weight}; null keeps every document (no mixing).
        total_tokens: token budget of the mix (default: the largest exact mix).
        shard_domains: {bucket: shard domain name} (default: the bucket name).
        val_fraction / val_documents: the validation split (as in ``recipe data build``).
        shard_tokens: tokens per shard file.
        tokenizer: a tiktoken BPE file (default: Llama 3's).
        threads: tokenizer threads.
        write_threads: shards written at once (the final write is partitioned by shard; the files are
            the same bytes for any count).
    """

    name = "pack"

    def __init__(self, weights: dict[str, float] | None = DEFAULT_WEIGHTS, total_tokens: int | None = None,
                 shard_domains: dict[str, str] | None = None, val_fraction: float = 0.01,
                 val_documents: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 tokenizer: str | None = None, threads: int = 8, write_threads: int = 4,
                 **kw) -> None:  # fmt: skip
        super().__init__(**kw)
        if weights is not None:
            bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or v < 0}
            if bad or not weights or sum(weights.values()) <= 0:
                raise ConfigError(f"pack: weights must be numbers >= 0 with a positive sum, got {weights}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"pack: val_fraction must be in [0, 1), got {val_fraction}")
        if total_tokens is not None and total_tokens <= 0:
            raise ConfigError(f"pack: total_tokens must be > 0, got {total_tokens}")
        self.weights = None if weights is None else {str(k): float(v) for k, v in weights.items()}
        self.total_tokens, self.shard_domains = total_tokens, dict(shard_domains or {})
        self.val_fraction, self.val_documents, self.shard_tokens = val_fraction, val_documents, shard_tokens
        if write_threads < 1:
            raise ConfigError(f"pack: write_threads must be >= 1, got {write_threads}")
        self.tokenizer_path, self.threads, self.write_threads = tokenizer, threads, write_threads
        self.tok: Any = None
        self._files: dict[str, Any] = {}
        self._meta: dict[str, dict[str, list]] = {}
        self._buffer: list[Doc] = []
        self._buffered_chars = 0
        self._pending: tuple[list[Doc], Future] | None = None
        self.summary: dict[str, Any] = {}

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.tok = load_tokenizer(self.tokenizer_path)
        params = inspect.signature(self.tok.encode_batch).parameters
        self._thread_kw = {"num_threads": self.threads} if "num_threads" in params else {}
        from recipe.tokenizer import MAX_RUN_CHARS, Tokenizer

        self._fast = MAX_RUN_CHARS if isinstance(self.tok, Tokenizer) else None
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pack-encode")
        self._workers = ThreadPoolExecutor(max_workers=max(1, self.threads), thread_name_prefix="pack-bpe")

    @staticmethod
    def bucket_of(doc: Doc) -> str:
        return doc.bucket or doc.domain or "general"

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text (no BOS/EOS) as uint32 arrays."""
        if self._fast is None:
            return [np.asarray(ids, dtype=np.uint32) for ids in self.tok.encode_batch(texts, **self._thread_kw)]
        # Texts shorter than the tokenizer's longest safe run cannot hold an over-long run
        # (openai/tiktoken#195), so they skip Tokenizer.encode_batch's scan for one. They go
        # straight to tiktoken's BPE core, which releases the GIL and hands back a uint32
        # buffer: no Python list of ints is built and converted again (an empty allowed
        # set makes it encode special-token text as ordinary text, as encode_ordinary does).
        bpe = self.tok._enc._core_bpe
        out: list[np.ndarray] = [np.empty(0, np.uint32)] * len(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= self._fast]
        buffers = self._workers.map(lambda t: bpe.encode_to_tiktoken_buffer(t, set()), [texts[i] for i in short],
                                    chunksize=64)
        for i, buffer in zip(short, buffers):
            out[i] = np.frombuffer(buffer, dtype=np.uint32)
        rest = [i for i, t in enumerate(texts) if len(t) > self._fast]
        for i, ids in zip(rest, self.tok.encode_batch([texts[i] for i in rest], **self._thread_kw)):
            out[i] = np.asarray(ids, dtype=np.uint32)
        return out

    def process(self, docs: list[Doc]) -> None:
        """Tokenize ``docs`` in the background and spill the batch before it (tokenizing runs
        outside the GIL, so the spilling overlaps it)."""
        future = self._encoder.submit(self._encode, [d.text for d in docs])
        self._drain()
        self._pending = (docs, future)

    def _drain(self) -> None:
        if self._pending is not None:
            docs, future = self._pending
            self._pending = None
            self._spill(docs, future.result())

    def _spill(self, docs: list[Doc], encoded: list[np.ndarray]) -> None:
        bos = np.array([self.tok.bos_id], dtype=np.uint32)
        eos = np.array([self.tok.eos_id], dtype=np.uint32)
        lengths = np.fromiter((a.size for a in encoded), dtype=np.int64, count=len(encoded)) + 2
        flat = np.concatenate([part for ids in encoded for part in (bos, ids, eos)]) if encoded else \
            np.empty(0, np.uint32)
        buckets = [self.bucket_of(d) for d in docs]
        names = sorted(set(buckets))
        bucket_ids = np.array([names.index(b) for b in buckets], dtype=np.int64)
        token_bucket = np.repeat(bucket_ids, lengths)
        for b, bucket in enumerate(names):
            idx = np.flatnonzero(bucket_ids == b).tolist()
            if bucket not in self._files:
                self._files[bucket] = (open(self._path(bucket, "u32"), "wb"), open(self._path(bucket, "jsonl"), "w"))
                self._meta[bucket] = {"length": [], "split": [], "sample": [], "bytes": []}
            tokens_file, meta_file = self._files[bucket]
            meta = self._meta[bucket]
            # One write per bucket and batch: the bucket's documents, in batch order.
            tokens_file.write(flat[token_bucket == b].tobytes())
            for i in idx:
                doc = docs[i]
                meta["length"].append(int(lengths[i]))
                split, sample = hash01_pair(doc.text, _MIX_SALT)
                meta["split"].append(split)
                meta["sample"].append(sample)
                meta["bytes"].append(doc.nbytes)
                # What the drop samples and the fate log need once the mix is chosen (the text itself is gone).
                meta_file.write(json.dumps({"source": doc.source, "head": doc.text[:300], "url": doc.url,
                                            "date": doc.date, "edited_by": doc.edited_by}, ensure_ascii=False) + "\n")

    def _path(self, bucket: str, ext: str) -> Path:
        assert self.ctx is not None
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in bucket)
        return self.ctx.work_dir / f"pack.{safe}.{ext}"

    def write(self, root: Path, report: dict[str, Any]) -> dict[str, Any]:
        """Choose the mix and write the shard sets under ``root``; return the mix and shard summary."""
        t0 = time.perf_counter()
        self._flush()
        self._drain()
        self._encoder.shutdown()
        self._workers.shutdown()
        self.stats.seconds += time.perf_counter() - t0
        for f, g in self._files.values():
            f.close()
            g.close()
        tokens = {b: int(sum(m["length"])) for b, m in sorted(self._meta.items())}
        if not tokens or sum(tokens.values()) == 0:
            raise NothingSurvived("no document survived curation; loosen the filters (see the drop counts per stage) "
                                  "or check the input")  # fmt: skip
        targets = mix_targets(tokens, self.weights, self.total_tokens) if self.weights else dict(tokens)
        tok = self.tok
        meta = dict(vocab_size=tok.n_words, bos_id=tok.bos_id, eos_id=tok.eos_id,
                    tokenizer=str(getattr(tok, "path", "") or type(tok).__name__))  # fmt: skip
        train = ShardWriter(root / "train", shard_tokens=self.shard_tokens, write_threads=self.write_threads, **meta)
        val = ShardWriter(root / "val", shard_tokens=self.shard_tokens, write_threads=self.write_threads, **meta)
        mix: dict[str, dict[str, Any]] = {}
        try:
            splitter = Splitter(train, val, self.val_fraction, self.val_documents)
            for bucket in sorted(tokens):
                keep = self._choose(bucket, targets[bucket])
                domain = self.shard_domains.get(bucket, bucket)
                m = self._meta[bucket]
                lengths = np.asarray(m["length"], dtype=np.int64)
                starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
                flat = np.memmap(self._path(bucket, "u32"), dtype=np.uint32, mode="r") if lengths.sum() else None
                fate = self.ctx.fate if self.ctx is not None else None
                with open(self._path(bucket, "jsonl")) as heads:
                    for i, line in enumerate(heads):
                        if keep[i]:
                            doc_tokens = np.array(flat[starts[i] : starts[i] + lengths[i]])
                            splitter.add(m["split"][i], doc_tokens, domain)
                            if fate is not None:
                                fate(self.label, self._doc(json.loads(line), bucket), "kept", None)
                        else:
                            self.drop(self._doc(json.loads(line), bucket), "mix_downsample",
                                      f"{bucket} over its mix share", nbytes=m["bytes"][i])  # fmt: skip
                del flat
                kept_tokens = int(lengths[keep].sum())
                mix[bucket] = {
                    "shard_domain": domain, "documents": int(keep.size), "documents_kept": int(keep.sum()),
                    "tokens": tokens[bucket], "tokens_kept": kept_tokens, "weight": (self.weights or {}).get(bucket),
                    "target_tokens": round(targets[bucket]),
                }  # fmt: skip
            splitter.finish()
            kept_total = sum(v["tokens_kept"] for v in mix.values()) or 1
            for v in mix.values():
                v["share"] = round(v["tokens_kept"] / kept_total, 4)
            self.stats.documents_out = train.num_documents + val.num_documents
            self.stats.bytes_out = self.stats.bytes_in - sum(d["bytes"] for d in self.stats.dropped.values())
            self.summary = {
                "mix": mix,
                "shards": {"train": {"documents": train.num_documents, "tokens": train.num_tokens},
                           "val": {"documents": val.num_documents, "tokens": val.num_tokens}},
                "tokenizer": meta["tokenizer"],
            }  # fmt: skip
            report = {**report, **self.summary}
            train.close(report)
            val.close(report)
        except BaseException:
            train.abort()
            val.abort()
            raise
        return self.summary

    @staticmethod
    def _doc(rec: dict[str, Any], bucket: str) -> Doc:
        return Doc(rec["head"], rec["source"], url=rec.get("url"), date=rec.get("date"), bucket=bucket,
                   edited_by=rec.get("edited_by") or [])  # fmt: skip

    def _choose(self, bucket: str, target: float) -> np.ndarray:
        m = self._meta[bucket]
        lengths = np.asarray(m["length"], dtype=np.int64)
        if target >= lengths.sum():
            return np.ones(lengths.size, dtype=bool)
        order = np.argsort(np.asarray(m["sample"]), kind="stable")
        before = np.cumsum(lengths[order]) - lengths[order]  # tokens taken before each candidate
        keep = np.zeros(lengths.size, dtype=bool)
        keep[order[before < max(target, 1.0)]] = True  # the document that crosses the target is taken
        return keep

    def run_batch(self, batch: list[Doc]) -> list[Doc]:
        # Documents leave this stage only in write(); here they are counted in and buffered,
        # then tokenized in large batches (the tokenizer's threads idle less with more work per call).
        t0 = time.perf_counter()
        self.stats.documents_in += len(batch)
        self.stats.bytes_in += sum(d.nbytes for d in batch)
        self._buffer.extend(batch)
        self._buffered_chars += sum(len(d.text) for d in batch)
        if self._buffered_chars >= _ENCODE_CHARS or len(self._buffer) >= _ENCODE_DOCS:
            self._flush()
        self.stats.seconds += time.perf_counter() - t0
        return []

    def _flush(self) -> None:
        if self._buffer:
            self.process(self._buffer)
        self._buffer, self._buffered_chars = [], 0
