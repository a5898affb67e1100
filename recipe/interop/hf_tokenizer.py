"""The Llama 3 tiktoken vocabulary as Hugging Face ``tokenizer.json`` (no ``transformers`` needed).

tiktoken and a byte-level BPE ``tokenizers`` model agree when:

* the vocabulary is tiktoken's ranks, each token's bytes spelled in GPT-2's printable
  byte alphabet;
* the merges list, for every token, each way of splitting it into two tokens, ordered by
  the rank of the token they make: tiktoken merges the adjacent pair whose result ranks
  lowest, and a BPE model applies the listed merge that comes first - the same choice;
* ``ignore_merges`` is on: a piece that is itself a token is kept whole, as tiktoken does;
* the pre-tokenizer splits with the same regular expression.

The 256 special tokens follow the base vocabulary as added tokens, as in ``Tokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from recipe.tokenizer import PAT_STR, Tokenizer, load_bpe_ranks


def byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 byte values onto printable characters (what byte-level BPE spells with)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[list[str]]]:
    alphabet = byte_alphabet()

    def spell(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [[spell(left), spell(right)] for *_, left, right in merges]


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    vocab, merges = vocab_and_merges(load_bpe_ranks(tokenizer.path))
    bos = "<|begin_of_text|>"
    added = [{"id": token_id, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for token, token_id in tokenizer.special_tokens.items()]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        # Like Llama 3's released tokenizer: <|begin_of_text|> before every text.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "added_tokens_decoder": {str(token_id): {"content": token, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
                                 for token, token_id in tokenizer.special_tokens.items()},
    }


def write_tokenizer_files(tokenizer: Tokenizer, out: str | os.PathLike, max_len: int) -> list[str]:
    """``tokenizer.model`` (the tiktoken file), ``tokenizer.json``, ``tokenizer_config.json``,
    ``special_tokens_map.json`` into ``out``; returns the names written."""
    out = Path(out)
    shutil.copyfile(tokenizer.path, out / "tokenizer.model")
    files = {
        "tokenizer.json": tokenizer_json(tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, max_len),
        "special_tokens_map.json": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    }
    for name, content in files.items():
        indent = None if name == "tokenizer.json" else 2  # ~400k merges: compact
        (out / name).write_text(json.dumps(content, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    return ["tokenizer.model", *files]
