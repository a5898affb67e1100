"""A corpus of many short documents, so that every packed training row holds several.

The documents are consecutive runs of words of standard-library modules, each cut to a
given length in Llama 3 tokens (BOS and EOS included). With every document shorter than
a 16-token row, each row of 16 or more tokens holds at least two documents, and the
varied lengths put document boundaries anywhere in a row: inside context-parallel
chunks, on their edges, and documents running across chunk and row boundaries.
"""

from __future__ import annotations

import json
import sysconfig
from itertools import cycle
from pathlib import Path

import torch

from stdlib_corpus import DEFAULT_MODULES

# Tokens per document, BOS and EOS included (a document ends short of its length when the
# next word does not fit): all under 16, varied so that boundaries fall anywhere in a row.
LENGTHS = (5, 11, 3, 8, 14, 6, 9, 4, 12, 7, 10, 13)


def short_documents_corpus(path: Path, num_documents: int = 200, lengths=LENGTHS,
                           modules=DEFAULT_MODULES) -> Path:
    """Write ``num_documents`` short documents as one ``.jsonl`` file at ``path``."""
    from recipe.tokenizer import Tokenizer

    tok = Tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    words = iter([w for m in modules for w in (stdlib / m).read_text(encoding="utf-8").split()])
    documents: list[str] = []
    word = next(words, None)
    for length in cycle(lengths):
        if len(documents) == num_documents or word is None:
            break
        text = ""
        while word is not None:
            longer = f"{text} {word}" if text else word
            if len(tok.encode(longer, bos=True, eos=True)) > length:
                break
            text, word = longer, next(words, None)
        if text:
            documents.append(text)
        elif len(tok.encode(word, bos=True, eos=True)) > max(lengths):
            word = next(words, None)  # a word that fits no document
    if len(documents) < num_documents:
        raise ValueError(f"the modules {modules} give only {len(documents)} of {num_documents} documents")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return path


def row_documents(doc_ids: torch.Tensor) -> list[list[int]]:
    """The document ids of each input position of each row of a step batch.

    ``doc_ids``: the stream's ``[n_micro, micro_batch_size, seq_len + 1]`` tensor; rows come
    back in sample order, inputs only (the last position is a target).
    """
    return doc_ids[..., :-1].reshape(-1, doc_ids.shape[-1] - 1).tolist()


def packing_stats(rows: list[list[int]], n_chunks: int) -> dict[str, int]:
    """How documents lie in consecutive rows, each cut into ``n_chunks`` equal chunks.

    ``min_documents``: the fewest documents in one row; ``boundaries_inside_chunks``:
    document starts strictly inside a chunk; ``documents_across_chunks``: chunk edges
    inside a row that a document runs across; ``documents_across_rows``: consecutive rows
    whose first and last positions are one document.
    """
    stats = dict(rows=len(rows), min_documents=min(len(set(r)) for r in rows), documents=0,
                 boundaries_inside_chunks=0, documents_across_chunks=0, documents_across_rows=0)
    for i, row in enumerate(rows):
        chunk = len(row) // n_chunks
        stats["documents"] += len(set(row))
        for j in range(1, len(row)):
            same = row[j] == row[j - 1]
            if j % chunk and not same:
                stats["boundaries_inside_chunks"] += 1
            if not j % chunk and same:
                stats["documents_across_chunks"] += 1
        if i and rows[i - 1][-1] == row[0]:
            stats["documents_across_rows"] += 1
    return stats
