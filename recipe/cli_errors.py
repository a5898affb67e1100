"""One-line errors for command-line mistakes: a missing ``--config``, the nearest valid key to a typo.

jsonargparse reports a mistyped key as a usage dump ending in ``unrecognized arguments``;
``explain_parse_error`` turns its message into one line that says what is wrong and names
the nearest valid key (``--model.optimzer.lr`` -> ``--model.optimizer.lr``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError

def shipped_configs() -> tuple[str, list[str]]:
    """The training configs next to this package: their folder as a user in the current folder
    would type it, and their names in it (``tiny.yaml`` first, ``parallel/*.yaml`` last)."""
    root = Path(__file__).resolve().parents[1] / "configs"
    relative = os.path.relpath(root)
    folder = str(root) if relative.startswith("..") else relative
    names = sorted((p.name for p in root.glob("*.yaml")), key=lambda name: (name != "tiny.yaml", name))
    if (root / "parallel").is_dir():
        names.append("parallel/*.yaml")
    return folder, names


def require_config(command: str, args: list[str]) -> None:
    """Refuse ``recipe fit|validate|test`` without ``--config``: Lightning would train or evaluate a
    default model on a freshly built demo corpus and log into ``./lightning_logs``."""
    if any(a in ("-h", "--help") or a.startswith("--print_config") for a in args):
        return
    if any(a in ("-c", "--config") or a.startswith(("--config=", "-c=")) for a in args):
        return
    folder, names = shipped_configs()
    example = f"recipe {command} --config {os.path.join(folder, 'tiny.yaml')}"
    example += "" if command == "fit" else " --ckpt_path PATH"
    raise ConfigError(f"`recipe {command}` needs --config; start with `{example}` (shipped configs in {folder}/: "
                      f"{', '.join(names)})")


def _dataclass_keys(prefix: str, hint: Any) -> list[str]:
    """``prefix`` and the dotted keys of the dataclass fields under it, at any depth."""
    keys = [prefix]
    for kind in (hint, *typing.get_args(hint)):
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            for field in dataclasses.fields(kind):
                keys += _dataclass_keys(f"{prefix}.{field.name}", hints.get(field.name))
    return keys


def option_keys(parsers: list[Any], command: str, classes: tuple[type, type]) -> list[str]:
    """Every dotted key ``recipe <command>`` accepts: the parser's own, plus the fields of the
    dataclass arguments of the module and the data module (``model.optimizer.lr``), which
    jsonargparse parses as one typed value and so does not list."""
    mine = [p for p in parsers if str(getattr(p, "prog", "")).split()[-1:] == [command]] or parsers
    keys: set[str] = set()
    for parser in mine:
        try:
            keys.update(parser.get_defaults().keys())
        except Exception:  # a parser that cannot even give its defaults still leaves the others
            continue
    for prefix, cls in zip(("model", "data"), classes):
        try:
            hints = typing.get_type_hints(cls.__init__)
        except Exception:  # unresolvable annotations: keep the parser's keys
            continue
        for name, hint in hints.items():
            if name != "return":
                keys.update(_dataclass_keys(f"{prefix}.{name}", hint))
    return sorted(keys)


def nearest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to a mistyped ``name`` (difflib), or None if none is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _class_parameters(class_path: str) -> list[str]:
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    try:
        return [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                if p not in ("self", "args", "kwargs")]
    except Exception:  # the class cannot be imported: no suggestion
        return []


_BOILERPLATE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
                "Expected a <class 'NoneType'>", "Not a valid subclass", "Subclass types expect",
                "- a class path", "- a dict")


def _unknown_key(key: str, match: str | None, args: Sequence[str], help_hint: str) -> str:
    """A mistyped key as the user wrote it: an option on the command line, else a key of the config."""
    if any(a.split("=", 1)[0] == f"--{key}" for a in args):
        return f"unknown option --{key}" + (f"; did you mean `--{match}`?" if match else "") + f" ({help_hint})"
    return f"unknown key {key} in the config" + (f"; did you mean `{match}`?" if match else "") + f" ({help_hint})"


def explain_parse_error(message: str, command: str, keys: list[str], args: Sequence[str] = ()) -> str:
    """One line for a jsonargparse error: what is wrong, then the fix (the nearest valid key for a typo).

    ``keys`` are the dotted keys ``recipe <command>`` accepts, ``args`` the command line.
    """
    help_hint = f"`recipe {command} --help` lists every option"
    if message.startswith("unrecognized arguments:"):
        unknown = [a.split("=", 1)[0] for a in message.split(":", 1)[1].split() if a.startswith("-")]
        if len(unknown) == 1:
            match = nearest(unknown[0].lstrip("-"), keys)
            return (f"unknown option {unknown[0]}" + (f"; did you mean `--{match}`?" if match else "")
                    + f" ({help_hint})")
        if unknown:
            parts = []
            for option in unknown:
                match = nearest(option.lstrip("-"), keys)
                parts.append(f"{option} (did you mean `--{match}`?)" if match else option)
            return "unknown options " + ", ".join(parts) + f"; {help_hint}"
    found = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", message)
    if found:
        return _unknown_key(found.group(1), nearest(found.group(1), keys), args, help_hint)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    parser_key = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    key = parser_key.group(1) if parser_key else None
    for i, line in enumerate(lines):
        option = re.search(r"Option '([^']+)' is not accepted", line)
        if not option:
            continue
        owner = re.search(r"class_path '([^']+)'", lines[i - 1]) if i else None
        field = option.group(1)
        if key is not None and f"{key}.{field}" not in keys and any(k.startswith(f"{key}.") for k in keys):
            match = nearest(f"{key}.{field}", [k for k in keys if k.startswith(f"{key}.")])
            return _unknown_key(f"{key}.{field}", match, args, help_hint)
        if owner:
            match = nearest(field, _class_parameters(owner.group(1)))
            return (f"{owner.group(1)} has no parameter '{field}'"
                    + (f"; did you mean '{match}'?" if match else f"; {help_hint}"))
    if key == "config":
        folder, names = shipped_configs()
        return f"--config: {parser_key.group(2)}; shipped configs in {folder}/: {', '.join(names)}"
    details = [line.lstrip("- ") for line in lines[1:] if not line.lstrip().startswith(_BOILERPLATE)]
    for i, line in enumerate(lines):  # the reason a class could not be built beats "expected a path"
        owner = re.search(r"Problem with given class_path '([^']+)':", line)
        if owner and i + 1 < len(lines):
            details = [f"{owner.group(1)}: {lines[i + 1].lstrip('- ')}"]
            break
    head = f"{key}: " if key else ""
    detail = parser_key.group(2) if parser_key and parser_key.group(2) else (details[0] if details else "")
    if not parser_key:
        detail = lines[0] if lines else message
    return f"{head}{detail}; {help_hint}"
