"""Data: raw documents -> token shards -> per-DP-rank token stream -> step batches.

Modules (one job each; import them directly, this package stays import-light):
  corpus.py      read documents (jsonl/jsonl.gz/parquet/txt/md/saved HF dataset/folders)
  demo.py        the offline quick-start corpus (stdlib code, Shakespeare/Milton, math)
  shards.py      the on-disk shard format (ShardWriter, ShardSet.window, per-domain views)
  build.py       tokenize + split + pack a corpus into train/val shard sets
  stream.py      TokenStream: step batches of one data-parallel rank, domains mixed by a schedule
  datamodule.py  TokenDataModule for Lightning (resumable data state)
  cli.py         `recipe data demo|build|info`
"""

from recipe.data.errors import DataError

__all__ = ["DataError"]
