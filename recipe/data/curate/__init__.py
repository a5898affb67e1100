"""Data curation: raw documents -> cleaned, deduplicated, filtered, classified, mixed token shards.

``recipe data curate --config configs/data/<name>.yaml`` runs a list of stages (each
one job, composable from YAML, streaming in batches) and packs the survivors into the
train/val shard layout that ``recipe fit`` reads, one shard group per domain bucket.

Modules:
  pipeline.py    config, passes over the data, atomic publication, the entry point ``curate``
  executors.py   where the stages run: this process (local) or Ray Data tasks (ray)
  reader.py      lenient input reading (jsonl, parquet, text, WARC; local or fsspec URLs); bad records are
                 quarantined with a reason
  fate.py        report/fates.parquet: one row per input document (kept, modified, dropped, quarantined)
  stage.py       the Stage contract, per-stage accounting, building stages from config
  report.py      JSON / Markdown / HTML report and the audit samples of every drop
  clean.py       1  Unicode NFC, whitespace, Markdown, HTML extraction
  url_dedup.py   2  newest version of each URL
  line_dedup.py  3  ccNet line dedup per bucket of documents
  near_dedup.py  4  exact hash, then MinHash + LSH (minhash.py: the numpy implementation)
  heuristics.py  5  Gopher repetition rules, basic shape rules, dirty words
  kl_filter.py   5  token-distribution KL divergence against the bucket, random-character pages
  safety.py      6  domain block list, PII masking
  quality.py     7  fastText-style quality classifier (numpy logistic regression)
  domains.py     8  domain buckets, language id (langid.py: fastText lid.176), topics, down-sampling
  pack.py        9  mix by weights, tokenize, pack into shards
  text.py, detect.py, record.py, synthetic.py, progress.py: shared pieces
"""

from recipe.data.curate.record import Doc
from recipe.data.curate.stage import Stage, register

__all__ = ["Doc", "Stage", "register"]
