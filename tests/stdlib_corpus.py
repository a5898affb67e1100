"""Real text for tests: modules of the Python standard library, one document per file."""

import sysconfig
from pathlib import Path

DEFAULT_MODULES = ("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py")


def stdlib_corpus(folder: Path, modules=DEFAULT_MODULES) -> Path:
    """Write the given standard-library modules as ``.txt`` documents into ``folder``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    for name in modules:
        (folder / f"{name}.txt").write_text((stdlib / name).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def stdlib_shards(root: Path, modules=DEFAULT_MODULES, val_fraction: float = 0.25) -> Path:
    """Train/val token shards of the given modules (Llama 3 tokenizer) in ``root / "shards"``."""
    from recipe.data.build import build_shards

    build_shards(stdlib_corpus(root / "text", modules), root / "shards", val_fraction=val_fraction)
    return root / "shards"


def stdlib_domain_shards(folder: Path, domains: dict[str, list[str]], val_fraction: float) -> Path:
    """Token shards of stdlib modules tagged with domains (``{"code": ["textwrap.py"], ...}``) in ``folder/shards``."""
    import json

    from recipe.data.build import build_shards

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    with corpus.open("w") as f:
        for domain, modules in domains.items():
            for name in modules:
                f.write(json.dumps({"text": (stdlib / name).read_text(encoding="utf-8"), "domain": domain}) + "\n")
    build_shards(corpus, folder / "shards", val_fraction=val_fraction, log=lambda s: None)
    return folder / "shards"
