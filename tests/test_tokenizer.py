import base64
import sys

import pytest

from recipe.tokenizer import Tokenizer, TokenizerError, default_tokenizer_path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def _write_bpe(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _byte_lines():
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


def test_default_path_does_not_import_llama_models(monkeypatch):
    for name in [m for m in sys.modules if m == "llama_models" or m.startswith("llama_models.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards; makes the check order-independent
    path = default_tokenizer_path()
    assert path.name == "tokenizer.model" and path.is_file()
    assert "llama_models" not in sys.modules


def test_default_path_without_llama_models(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match="pip install llama-models") as exc:
        default_tokenizer_path()
    assert "\n" not in str(exc.value)


def test_real_vocab(tok):
    assert tok.n_words == tok.vocab_size == 128256
    assert tok.n_base_tokens == 128000
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
    assert len(tok.special_tokens) == 256
    assert tok.special_tokens["<|eot_id|>"] == 128009
    assert tok.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert tok.token_to_id("<|image|>") == 128011
    assert tok.id_to_token(9906) == b"Hello"
    assert "vocab_size=128256" in repr(tok)


def test_encode_known_ids(tok):
    assert tok.encode("Hello world") == [9906, 1917]
    assert tok.encode("Hello world", bos=True, eos=True) == [128000, 9906, 1917, 128001]
    assert tok.encode("") == []
    assert tok.encode("", bos=True, eos=True) == [128000, 128001]


@pytest.mark.parametrize(
    "text",
    [
        "Hello world",
        "Crème brûlée à la française, naïve café",
        "大型语言模型 と 日本語のテキスト",
        "emoji 🦙🚀👩‍💻 mixed",
        "def f(x):\n    if x:\n\t\treturn x  # tab\n    return None\r\n",
        "web text <|end_of_text|> and <|begin_of_text|> inline",
    ],
)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_ordinary(tok):
    ids = tok.encode("<|end_of_text|>")
    assert len(ids) > 1
    assert all(i < tok.n_base_tokens for i in ids)


def test_decode_partial_utf8_and_sequences(tok):
    ids = tok.encode("🦙")  # one emoji spans several byte-level tokens
    assert len(ids) > 1
    assert tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode(tuple(tok.encode("abc"))) == "abc"


def test_encode_batch_matches_encode(tok):
    texts = [
        "",
        "Hello world",
        "naïve 你好 🦙",
        "The quick brown fox. " * 30_000,  # 630k chars: split at 400k
        " " * 30_000,  # long whitespace run
        "a" * 30_000,  # long non-whitespace run
        "x" * 10 + " " * 26_000 + "y" * 26_000,
    ]
    expected = [tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == expected
    assert tok.encode_batch(texts, num_threads=2) == [ids[1:-1] for ids in expected]
    for text, ids in zip(texts, expected):
        assert tok.decode(ids[1:-1]) == text
    assert tok.encode_batch([]) == []


def test_small_custom_file(tmp_path):
    path = _write_bpe(tmp_path / "tiny.bpe", _byte_lines() + [""])
    tiny = Tokenizer(path)
    assert tiny.n_base_tokens == 256 and tiny.n_words == 512
    assert tiny.bos_id == 256 and tiny.eos_id == 257
    assert tiny.encode("hi") == [ord("h"), ord("i")]
    assert tiny.decode(tiny.encode("héllo")) == "héllo"


def _error(path) -> str:
    with pytest.raises(TokenizerError) as exc:
        Tokenizer(path)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.model"
    msg = _error(path)
    assert str(path) in msg and "not found" in msg and "tokenizer_path" in msg
    assert isinstance(TokenizerError("x"), ValueError)


@pytest.mark.parametrize(
    "bad_line, hint",
    [
        ("!!notbase64!! 256", "base64"),
        ("YWJj twelve", "integer"),
        ("YWJj", "field"),
        ("YWJj 0", "duplicate rank"),
        ("AA== 256", "duplicate token"),
        ("YWJj 999", "gap"),
    ],
)
def test_malformed_line(tmp_path, bad_line, hint):
    path = _write_bpe(tmp_path / "bad.bpe", _byte_lines() + ["", bad_line])
    msg = _error(path)
    assert f"{path}:258" in msg and hint in msg


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bpe"
    path.write_text("\n\n")
    msg = _error(path)
    assert str(path) in msg and "empty" in msg
