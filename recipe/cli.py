"""The ``recipe`` command.

``recipe fit|validate|test`` are LightningCLI subcommands (``--config``, dotted overrides,
``--print_config``); ``recipe info`` prints a model's exact size from its config on the meta
device; ``recipe data`` builds token shards; ``recipe report`` plots a run's TensorBoard logs.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from recipe.cli_errors import explain_parse_error, option_keys, require_config
from recipe.errors import USER_ERRORS, ConfigError
from recipe.model_info import describe_model, model_args_from_config

LIGHTNING_COMMANDS = ("fit", "validate", "test")

USAGE = """usage: recipe <command> [options]

commands:
  fit        train (LightningCLI): recipe fit --config configs/tiny.yaml
  validate   validation loss of a checkpoint: recipe validate --config ... --ckpt_path PATH
  test       held-out loss of a checkpoint:   recipe test --config ... --ckpt_path PATH
  info       exact parameter count and shapes: recipe info --config configs/llama3_405b.yaml
  data       curate raw documents and build token shards: recipe data curate --config
             configs/data/demo.yaml | data build CORPUS OUT | data demo | data train-classifier
  import     Meta or Hugging Face Llama 3 weights -> a recipe checkpoint
  export     a recipe checkpoint -> Hugging Face safetensors
  generate   sample text from a checkpoint: recipe generate --ckpt PATH --prompt TEXT
  scaling    scaling-law sweeps and fits: recipe scaling sweep|fit|forecast|mix|anneal-probe
  plan       memory and step time of parallel layouts: recipe plan --config ... --gpus N
  report     plots of a run's TensorBoard logs as a PNG and an HTML page: recipe report runs/tiny

Run `recipe <command> --help` for the options of each command.
Set RECIPE_TRACEBACK=1 to see the full traceback of configuration and data errors."""


# ---------------------------------------------------------------------------- info


def info_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="recipe info", description="exact model size from a config")
    parser.add_argument("--config", required=True, help="a recipe YAML config (reads model.arch)")
    args = parser.parse_args(argv)
    print(describe_model(model_args_from_config(args.config)))
    return 0


# ---------------------------------------------------------------------------- lightning


def lightning_main(argv: list[str]) -> None:
    require_config(argv[0], argv[1:])
    from argparse import ArgumentError

    from lightning.pytorch.callbacks import ModelSummary

    from callbacks.progress import RecipeModelSummary
    from recipe.data.datamodule import TokenDataModule
    from recipe.lightning_compat import CommandLineSettingsCLI, quiet_lightning_notices
    from recipe.module import LlamaLightningModule

    parsers: list[Any] = []  # every parser LightningCLI builds: the main one, then one per subcommand
    started: list[RunLogs] = []

    class RecipeCLI(CommandLineSettingsCLI):
        def init_parser(self, **kwargs: Any) -> Any:
            parser = super().init_parser(**kwargs)
            parsers.append(parser)
            return parser

        def parse_arguments(self, parser: Any, args: Any) -> None:
            # exit_on_error=False makes jsonargparse raise instead of printing its usage dump.
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as err:
                cause = find_user_error(err)
                if cause is not None:  # one of our classes refused a value: its message says it best
                    raise cause from err
                keys = option_keys(parsers, argv[0], (LlamaLightningModule, TokenDataModule))
                raise ConfigError(explain_parse_error(str(err), argv[0], keys, argv[1:])) from err

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            # Our summary instead of Lightning's, whose FLOPs read 0 (see RecipeModelSummary).
            settings = self.config_init[self.subcommand].get("trainer") or {}
            wanted = kwargs.get("enable_model_summary", settings.get("enable_model_summary")) is not False
            trainer = super().instantiate_trainer(**{**kwargs, "enable_model_summary": False})
            if wanted and not any(isinstance(cb, ModelSummary) for cb in trainer.callbacks):
                trainer.callbacks.append(RecipeModelSummary())
            started.append(RunLogs(trainer))
            return trainer

        def before_fit(self) -> None:
            # In the launching process, before any rank starts: the common config errors
            # surface as one line here instead of once per rank after start-up.
            from recipe.preflight import check_fit
            from recipe.resume import choose_checkpoint

            check_fit(self.trainer, self.model, self.datamodule)
            choose_checkpoint(self.trainer, self.config_init[self.subcommand])

    # Our step saves after the optimizer update on purpose: that is the state to resume.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    quiet_lightning_notices()
    try:
        RecipeCLI(
            LlamaLightningModule,
            TokenDataModule,
            # From the console script argv *is* sys.argv[1:]; Lightning warns when given both.
            args=None if argv == sys.argv[1:] else argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "recipe", "exit_on_error": False},
        )
    except BaseException:
        for logs in started:
            logs.remove_if_empty()
        raise


class RunLogs:
    """The log folders of a run's loggers, to remove if the run stops before it logged a value.

    A run that stops on a config error after the loggers started (a missing checkpoint, a
    vocabulary mismatch found at setup) leaves ``lightning_logs/version_<n>/`` holding only
    its ``config.yaml`` and an empty event file, which TensorBoard then lists as a run.
    Folders that existed before the run, or hold anything else, are kept.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.existing: dict[int, set[str] | None] = {}
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None)
            if root:
                self.existing[id(logger)] = set(os.listdir(root)) if os.path.isdir(root) else None

    def remove_if_empty(self) -> None:
        """Remove the log folders this run created if they hold no logged value (global rank 0 only)."""
        import shutil

        from recipe.report import has_scalars

        try:
            if not self.trainer.is_global_zero:
                return
            for logger in self.trainer.loggers:
                if id(logger) not in self.existing:
                    continue
                before = self.existing[id(logger)]
                folder, root = Path(logger.log_dir), Path(logger.root_dir)
                if not folder.is_dir() or folder == root or (before is not None and folder.name in before):
                    continue
                files = list(folder.iterdir())
                if all(f.is_file() and (f.name in ("config.yaml", "hparams.yaml")
                                        or (f.name.startswith("events.out.tfevents.") and not has_scalars(f)))
                       for f in files):
                    shutil.rmtree(folder)
                    if before is None and root.is_dir() and not any(root.iterdir()):
                        root.rmdir()
        except Exception:  # tidying up must never hide the error that stopped the run
            pass


def find_user_error(err: BaseException) -> BaseException | None:
    """The user-input error behind ``err``: config parsers wrap what our classes raise."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, USER_ERRORS):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command in LIGHTNING_COMMANDS:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            try:
                lightning_main(argv)
            except SIGTERMException:
                # Stopped (and checkpointed) on a termination signal: the conventional 128 + 15
                # tells a scheduler that the job did not finish, so that it requeues it.
                return 143
            return 0
        if command == "info":
            return info_main(rest)
        if command == "data":
            from recipe.data.cli import main as data_main

            return data_main(rest)
        if command in ("import", "export", "generate"):
            from recipe.interop.cli import main as interop_main

            return interop_main(command, rest)
        if command == "plan":
            from recipe.planner import main as plan_main

            return plan_main(rest)
        if command == "scaling":
            from recipe.scaling.cli import main as scaling_main

            return scaling_main(rest)
        if command == "report":
            from recipe.report import main as report_main

            return report_main(rest)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None or os.environ.get("RECIPE_TRACEBACK"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    print(f"error: unknown command {command!r}; run `recipe --help` for the list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
