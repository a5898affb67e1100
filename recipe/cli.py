"""The ``recipe`` command.

``recipe fit|validate|test`` are LightningCLI subcommands (``--config``, dotted overrides,
``--print_config``); ``recipe info`` prints a model's exact size from its config on the meta
device; ``recipe data`` builds token shards.
"""

from __future__ import annotations

import os
import sys
import warnings

from recipe.errors import USER_ERRORS
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
    from lightning.pytorch.cli import LightningCLI

    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule

    class RecipeCLI(LightningCLI):
        def before_fit(self) -> None:
            # In the launching process, before any rank starts: the common config errors
            # surface as one line here instead of once per rank after start-up.
            from recipe.preflight import check_fit

            check_fit(self.trainer, self.model, self.datamodule)

    # Our step saves after the optimizer update on purpose: that is the state to resume.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    RecipeCLI(
        LlamaLightningModule,
        TokenDataModule,
        # From the console script argv *is* sys.argv[1:]; Lightning warns when given both.
        args=None if argv == sys.argv[1:] else argv,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "recipe"},
    )


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
