"""Llama 3 tokenizer: tiktoken BPE over a 128K vocabulary plus 256 special tokens.

The BPE ranks file (``<base64 token> <rank>`` per line) ships inside the
``llama-models`` package; we only locate that data file and never execute
any of llama-models' code.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken

from recipe.errors import RecipeError

__all__ = ["Tokenizer", "TokenizerError", "default_tokenizer_path", "load_bpe_ranks"]

# Llama 3's pre-tokenization regex (splits text into pieces before BPE merges).
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)
SPECIAL_TOKENS: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

# tiktoken's Rust core can panic on very long inputs, and on very long runs of
# whitespace / non-whitespace (openai/tiktoken#195), so such texts are cut first.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run longer than MAX_RUN_CHARS.  The look-behinds anchor matches at run starts,
# which keeps the scan linear instead of retrying from every position of a run.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")

_FIX_HINT = "pass tokenizer_path=<tiktoken BPE file> or `pip install llama-models`"


class TokenizerError(RecipeError):
    """Raised for a missing or malformed tokenizer file (always a one-line message)."""


def default_tokenizer_path() -> Path:
    """Path of ``llama3/tokenizer.model`` shipped in llama-models.

    Uses ``find_spec`` on the top-level package, which locates it without importing
    it (llama_models pulls in heavy dependencies on import).
    """
    try:
        spec = importlib.util.find_spec("llama_models")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "llama3" / "tokenizer.model"
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"llama-models is not installed (or lacks llama3/tokenizer.model); {_FIX_HINT}")


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file strictly: every non-empty line is ``<base64> <rank>``.

    Unlike a lenient loader, bad lines are errors rather than silently skipped: a
    dropped line would shift the special-token ids and corrupt every encoding.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file not found: {path}; {_FIX_HINT}") from None
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}; {_FIX_HINT}") from None

    expected = "expected '<base64 token> <integer rank>'"
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, raw in enumerate(data.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        where = f"{path}:{lineno}"
        if len(fields) != 2:
            raise TokenizerError(f"{where}: {expected}, got {len(fields)} field(s)")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{where}: invalid base64 token; {expected}") from None
        try:
            rank = int(fields[1])
        except ValueError:
            raise TokenizerError(f"{where}: rank {fields[1][:32]!r} is not an integer; {expected}") from None
        if not token or rank < 0:
            raise TokenizerError(f"{where}: {expected} with a non-empty token and a rank >= 0")
        if rank in line_of_rank:
            raise TokenizerError(f"{where}: duplicate rank {rank} (first on line {line_of_rank[rank]})")
        if token in ranks:
            raise TokenizerError(f"{where}: duplicate token (rank {ranks[token]} already has it)")
        ranks[token] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file; {expected} on each line")
    # Special tokens are numbered right after the base ranks, so the ranks must be 0..N-1.
    top = max(line_of_rank)
    if top >= len(ranks):
        raise TokenizerError(f"{path}:{line_of_rank[top]}: rank {top} leaves a gap; ranks must be 0..{len(ranks) - 1}")
    return ranks


def _chunks(text: str) -> Iterator[str]:
    """Cut ``text`` into pieces tiktoken can encode safely (same cuts as the reference)."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        window = text[start : start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(window):
            for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield window[cut:pos]
                cut = pos
        yield window[cut:]


def _needs_chunking(text: str) -> bool:
    return len(text) > MAX_ENCODE_CHARS or _LONG_RUN.search(text) is not None


class Tokenizer:
    """Llama 3 tiktoken tokenizer (128,000 BPE tokens + 256 special tokens)."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path is not None else default_tokenizer_path()
        ranks = load_bpe_ranks(self.path)
        self.n_base_tokens: int = len(ranks)
        self.special_tokens: dict[str, int] = {tok: self.n_base_tokens + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.n_words: int = self.n_base_tokens + len(self.special_tokens)
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.eot_id: int = self.special_tokens["<|eot_id|>"]
        self.pad_id: int = self.special_tokens["<|finetune_right_pad_id|>"]
        self._enc = tiktoken.Encoding(
            name=self.path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, vocab_size={self.n_words})"

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not _needs_chunking(text):
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for piece in _chunks(text):
            ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode ``text`` to ids.

        Special-token strings (e.g. ``"<|end_of_text|>"``) in ``text`` are encoded as
        ordinary text, so untrusted web data can never inject control tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._wrap(self._encode_plain(text), bos, eos)

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 8
    ) -> list[list[int]]:
        """Encode many texts in parallel threads; gives exactly ``[encode(t) for t in texts]``."""
        texts = list(texts)
        out: list[list[int]] = [[] for _ in texts]
        normal = [i for i, t in enumerate(texts) if not _needs_chunking(t)]
        normal_set = set(normal)
        encoded = self._enc.encode_ordinary_batch([texts[i] for i in normal], num_threads=num_threads)
        for i, ids in zip(normal, encoded):
            out[i] = ids
        for i, text in enumerate(texts):
            if i not in normal_set:
                out[i] = self._encode_plain(text)
        return [self._wrap(ids, bos, eos) for ids in out]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]  # tensors / numpy arrays
        return self._enc.decode(ids, errors="replace")

    def token_to_id(self, token: str) -> int:
        """Id of a special token such as ``"<|eot_id|>"``."""
        return self.special_tokens[token]

    def id_to_token(self, token_id: int) -> bytes:
        """Raw bytes of one token id (base tokens need not be valid UTF-8 on their own)."""
        return self._enc.decode_single_token_bytes(int(token_id))
