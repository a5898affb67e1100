"""Resuming a run: which checkpoint, and whether its settings agree with the run's.

Which checkpoint. ``recipe fit`` resumes by default: without ``--ckpt_path`` (or with
``last``) it takes the newest intact checkpoint of the run's checkpoint folder
- ``last.ckpt``, every ``step=`` checkpoint, and a complete checkpoint that a crash left
under the name of an unfinished publish - and says which in one line. Only an empty folder
starts at step 0, so a requeued job continues on its own and a run never restarts from
scratch next to a usable checkpoint.

Which settings. Every checkpoint records the run's settings as flat dotted keys
(``run_settings``). On resume they are compared with the current ones before any weight is
loaded (``check_settings``):

* the architecture, the vocabulary, the tokenizer and the data (by content, not path)
  must match: a difference stops the run with one line listing each;
* the rest - optimizer, LR schedule, batch ramp, context stages, mix, annealing, max
  steps, parallel layout, batch sizes - may change on purpose: the current values apply
  and one line lists what changed.

Settings that only shape the initialisation (``init_seed``, ``init_weights_path``, ...) are
not compared: a resumed run does not initialise.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from recipe.checkpointing import manifest_step, newest_intact
from recipe.errors import ConfigError
from recipe.lightning_compat import attached_trainer

SETTINGS_KEY = "run_settings"

# Keys whose difference makes the checkpoint's weights or data position meaningless here.
MUST_MATCH = (
    "model.arch.dim", "model.arch.n_layers", "model.arch.n_heads", "model.arch.n_kv_heads",
    "model.arch.vocab_size", "model.arch.multiple_of", "model.arch.ffn_dim_multiplier", "model.arch.norm_eps",
    "data.vocab_size", "data.tokenizer", "data.content",
)
# Keys that only matter before the first step, or whose meaning another key carries.
NOT_COMPARED = (
    "model.init_seed", "model.init_weights_path", "model.init_mode", "model.arch.depth_init", "model.arch.init_std",
    "data.build_demo", "data.curate_config", "data.tokenizer_path", "data.num_workers",
)


class SettingsMismatchError(ConfigError):
    """The checkpoint was trained with settings that the run cannot change."""


# ---------------------------------------------------------------------------- which checkpoint


def choose_checkpoint(trainer: Any, subcommand_config: Any) -> None:
    """Resolve an unset ``ckpt_path`` or ``last`` in ``subcommand_config`` in place.

    An explicit path is left alone (the load checks it and falls back if it is damaged).
    """
    requested = subcommand_config.get("ckpt_path")
    if requested not in (None, "last"):
        return
    folder = recipe_checkpoint_folder(trainer)
    if folder is None:  # no RecipeCheckpoint: Lightning's own meaning of "last" applies
        return
    path, passed = newest_intact(folder)
    if path is None:
        if requested is not None:
            rank_zero_info(f"no checkpoint in {folder} yet: training starts at step 0")
        subcommand_config["ckpt_path"] = None
        return
    step = manifest_step(path)
    how = "" if requested is not None else " (recipe fit resumes by default; use a new folder to start over)"
    line = f"resuming from {path} (step {step}), the newest intact checkpoint in {folder}{how}"
    if passed:
        rank_zero_warn(f"{line}; passed over newer damaged ones: {'; '.join(passed)}")
    else:
        rank_zero_info(line)
    subcommand_config["ckpt_path"] = str(path)


def recipe_checkpoint_folder(trainer: Any) -> Path | None:
    """The checkpoint folder of the trainer's ``RecipeCheckpoint`` (None: it has none)."""
    from callbacks.checkpoint import RecipeCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, RecipeCheckpoint):
            callback.resolve_dirpath(trainer)
            return Path(callback.dirpath)
    return None


# ---------------------------------------------------------------------------- which settings


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Dotted keys of plain values: dataclasses and mappings expanded, lists as JSON text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = settings_of(value)
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            if not str(key).startswith("_"):
                flat.update(flatten(item, f"{prefix}.{key}"))
        return flat
    if isinstance(value, (list, tuple)):
        return {prefix: json.dumps(plain(value), sort_keys=True)}
    return {prefix: plain(value)}


def settings_of(obj: Any) -> dict[str, Any]:
    """A dataclass's settings: its ``__init__`` fields (not the state it keeps at run time)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def plain(value: Any) -> Any:
    """``value`` as JSON-able plain data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in settings_of(value).items()}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def data_identity(data_dir: Path) -> dict[str, Any]:
    """The data's identity by content: the training shards' sizes and checksums, and its tokenizer.

    Empty when ``data_dir`` has no shard index (data that is not the recipe's).
    """
    index_path = Path(data_dir) / "train" / "index.json"
    try:
        return dict(_identity_of_index(str(index_path.resolve()), index_path.stat().st_mtime_ns))
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=4)
def _identity_of_index(index_path: str, mtime_ns: int) -> dict[str, Any]:
    # Every save records it: read a (possibly large) index once per version of the file.
    index = json.loads(Path(index_path).read_text())
    shards = [[s.get("name"), s.get("num_tokens"), s.get("domain"), (s.get("checksum") or {}).get("tokens")]
              for s in index.get("shards", [])]
    content = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
    tokenizer = f"vocab {index.get('vocab_size')}, bos {index.get('bos_id')}, eos {index.get('eos_id')}"
    return {"data.content": f"{len(shards)} shards, {index.get('num_tokens')} tokens, sha256 {content}",
            "data.vocab_size": index.get("vocab_size"), "data.tokenizer": tokenizer}


def run_settings(module: Any) -> dict[str, Any]:
    """The settings of the run ``module`` trains in, as flat dotted keys of plain values."""
    settings = flatten(module.settings() if hasattr(module, "settings") else dict(module.hparams), "model")
    trainer = attached_trainer(module)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is not None:
        settings.update(flatten(dict(getattr(datamodule, "hparams", {})), "data"))
        if hasattr(datamodule, "data_dir"):
            settings.update(data_identity(datamodule.data_dir))
    if trainer is not None:
        settings["trainer.max_steps"] = trainer.max_steps
        dims = getattr(trainer.strategy, "dims", None)
        settings["trainer.layout"] = (f"{trainer.world_size} processes" if dims is None else
                                      " ".join(f"{k}={v}" for k, v in plain(dims).items()))
    plan = getattr(module, "run_plan", None)
    for part in ("ramp", "context", "mix", "annealing"):
        value = getattr(plan, part, None)
        if value is not None:
            settings[f"plan.{part}"] = json.dumps(plain(value), sort_keys=True)
    return settings


def saved_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint records; for older checkpoints, what their hyperparameters say.

    Older checkpoints saved the RoPE that a context stage had set instead of the configured
    one, so their RoPE fields are not compared.
    """
    if isinstance(checkpoint.get(SETTINGS_KEY), Mapping):
        return dict(checkpoint[SETTINGS_KEY])
    settings = flatten(dict(checkpoint.get("hyper_parameters") or {}), "model")
    settings.update(flatten(dict(checkpoint.get("datamodule_hyper_parameters") or {}), "data"))
    return {k: v for k, v in settings.items() if not k.startswith(("model.arch.rope", "model.arch.max_seq_len"))}


def compare(saved: Mapping[str, Any], current: Mapping[str, Any], complete: bool = True
            ) -> tuple[list[str], list[str]]:
    """``(must-match differences, changed settings)``, each as ``key saved -> current`` text.

    ``complete``: ``saved`` records every setting, so a key on one side only is a change
    too (a RoPE scaling set or removed); otherwise only the keys of both are compared.
    """
    mismatched, changed = [], []
    keys = set(saved) | set(current) if complete else set(saved) & set(current)
    for key in sorted(keys):
        before, after = saved.get(key, UNSET), current.get(key, UNSET)
        if key in NOT_COMPARED or any(k.startswith(key + ".") for k in keys) or same(before, after):
            continue
        line = f"{key} {show(before)} -> {show(after)}"
        (mismatched if key in MUST_MATCH else changed).append(line)
    return mismatched, changed


UNSET = "unset"


def same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_settings(checkpoint: Mapping[str, Any], current: Mapping[str, Any], source: str,
                   list_changes: bool = True) -> None:
    """Stop on a must-match difference; list the changed settings that the run applies."""
    mismatched, changed = compare(saved_settings(checkpoint), current, complete=SETTINGS_KEY in checkpoint)
    if mismatched:
        raise SettingsMismatchError(
            f"{source} was trained with other settings that must match to resume it: {'; '.join(mismatched)} "
            "(checkpoint -> now); restore them, or start a new run in another folder")
    if changed and list_changes:
        rank_zero_info(f"resuming {source} with changed settings (checkpoint -> now, now applies): "
                       f"{'; '.join(changed)}")
