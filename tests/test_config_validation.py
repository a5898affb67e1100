"""Every bad config stops `recipe fit` with one line naming the problem - before any rank starts."""

import copy
from pathlib import Path

import pytest
import yaml

from cli_runs import tiny_fit_config
from recipe.cli import main
from stdlib_corpus import stdlib_shards

STRATEGY = "recipe.parallel.strategy.Parallel4DStrategy"


def parallel(devices: int, **sizes) -> dict:
    return {"devices": devices, "strategy": {"class_path": STRATEGY, "init_args": sizes}}


def callback(name: str, **init_args) -> dict:
    return {"class_path": name, "init_args": init_args}


RAMP = "callbacks.batch_ramp.BatchSizeRamp"
STAGES = "callbacks.context_stages.ContextLengthStages"
MIX = "callbacks.data_mix.DataMixSchedule"
ANNEAL = "callbacks.annealing.LRAnnealing"

# (name, trainer updates, model.arch updates, data updates, extra callbacks, other model keys, expected message)
CASES = [
    ("world not divisible by the mesh", parallel(3, tp=2), {}, {}, [], {}, "world size 3 is not divisible"),
    ("dp_shard zero", parallel(2, dp_shard=0), {}, {}, [], {}, "dp_shard=0 must be >= 1"),
    ("tp does not divide the kv heads", parallel(4, tp=4, dp_shard=1), {}, {}, [], {}, "tp=4 must divide n_heads=4 and n_kv_heads=2"),
    ("compile with tensor parallelism", parallel(2, tp=2, dp_shard=1, compile=True), {}, {}, [], {},
     "compile: true with tp=2 is not supported"),
    ("curation writing elsewhere than data_dir", {}, {}, {"data_dir": "not-built", "curate_config": "configs/data/demo.yaml"}, [], {},
     "data.data_dir not-built does not exist; build it with `recipe data build <corpus> not-built`"),
    ("more pipeline stages than layers", parallel(4, pp=4, dp_shard=1), {}, {}, [], {}, "exceed the model's 2 layers"),
    ("batch not divisible by dp", parallel(2, dp_shard=2), {}, {"global_batch_size": 3}, [], {},
     "not divisible by the data-parallel size 2"),
    ("batch not a multiple of the micro-batch", {}, {}, {"global_batch_size": 4, "micro_batch_size": 3}, [], {},
     "not a multiple of micro_batch_size=3"),
    ("sequence longer than the RoPE table", {}, {}, {"seq_len": 128}, [], {}, "exceeds model.arch.max_seq_len=64"),
    ("sequence not divisible for context parallelism", parallel(2, cp=2, dp_shard=1), {}, {"seq_len": 18}, [], {},
     "must be divisible by 2 x cp x tp = 4"),
    ("too few micro-batches for an interleaved pipeline",
     parallel(2, pp=2, dp_shard=1, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2), {"n_layers": 4},
     {"global_batch_size": 2, "micro_batch_size": 2}, [], {}, "needs at least pp=2 micro-batches"),
    ("ramp thresholds out of order", {}, {}, {},
     [callback(RAMP, stages=[{"tokens": 0, "batch_tokens": 64, "seq_len": 16},
                             {"tokens": 500, "batch_tokens": 64, "seq_len": 16},
                             {"tokens": 200, "batch_tokens": 64, "seq_len": 16}])], {},
     "ramp thresholds must increase"),
    ("ramp batch not a multiple of its sequence", {}, {}, {},
     [callback(RAMP, stages=[{"tokens": 0, "batch_tokens": 100, "seq_len": 16}])], {}, "must be a positive multiple"),
    ("ramp sequence beyond the model", {}, {}, {},
     [callback(RAMP, stages=[{"tokens": 0, "batch_tokens": 256, "seq_len": 128}])], {}, "exceeds model.arch"),
    ("context stages not increasing", {}, {}, {},
     [callback(STAGES, stages=[{"seq_len": 64, "tokens": 10}, {"seq_len": 32, "tokens": 10}])], {},
     "order the stages by increasing length"),
    ("context stage beyond the RoPE table", {}, {}, {},
     [callback(STAGES, stages=[{"seq_len": 256, "tokens": 10, "batch_tokens": 512}], niah_trials=0,
               niah_min_accuracy=None)], {}, "exceeds model.arch.max_seq_len=64"),
    ("mix weights not summing to 1", {}, {}, {},
     [callback(MIX, stages=[{"tokens": 0, "weights": {"default": 0.7}}])], {}, "weights sum to 0.7, not 1"),
    ("mix naming an unknown domain", {}, {}, {"mix": True},
     [callback(MIX, stages=[{"tokens": 0, "weights": {"web": 1.0}}])], {}, "names domain 'web'"),
    ("mix not starting at zero", {}, {}, {},
     [callback(MIX, stages=[{"tokens": 100, "weights": {"default": 1.0}}])], {}, "tokens=0"),
    ("annealing longer than the run", {}, {}, {}, [callback(ANNEAL, total_tokens=100, anneal_tokens=200)], {},
     "longer than the run"),
    ("context stages ending after annealing starts", {}, {"max_seq_len": 128}, {},
     [callback(STAGES, stages=[{"seq_len": 32, "tokens": 1000, "batch_tokens": 128},
                               {"seq_len": 64, "tokens": 10, "batch_tokens": 128}], niah_trials=0,
               niah_min_accuracy=None), callback(ANNEAL, total_tokens=1000, anneal_tokens=500)], {},
     "after annealing begins"),
    ("LR schedule without decay steps", {}, {}, {}, [], {"lr_schedule": {"decay_steps": 0}}, "decay_steps > 0"),
    ("model dim not divisible by heads", {}, {"n_heads": 5}, {}, [], {}, "not divisible by model.n_heads=5"),
    ("vocabulary smaller than the data's", {}, {"vocab_size": 1000}, {}, [], {},
     "tokenized with a 128256-token vocabulary"),
    ("missing data without a demo build", {}, {}, {"data_dir": "/nonexistent/shards"}, [], {},
     "data.data_dir /nonexistent/shards does not exist"),
    ("missing tokenizer file", {}, {}, {"tokenizer_path": "/nonexistent/tokenizer.model"}, [], {},
     "/nonexistent/tokenizer.model does not exist"),
    ("guard spike factor below 1", {}, {}, {}, [], {"guard": {"spike_factor": 0.5}}, "spike_factor must be > 1"),
    ("checkpoint retention of zero", {}, {}, {},
     [callback("callbacks.checkpoint.RecipeCheckpoint", dirpath="/tmp/unused", keep_last=0)], {},
     "keep_last must be >= 1"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("bad_configs")
    data_dir = stdlib_shards(tmp)
    path = tiny_fit_config(tmp, data_dir, "run", 2, [], seed=0, checkpoint_every=100)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["callbacks"] = []
    return tmp, config


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_gives_one_line(case, base, capsys):
    name, trainer, arch, data, callbacks, model, needle = case
    tmp, config = base
    config = copy.deepcopy(config)
    config["trainer"].update(trainer)
    config["trainer"]["callbacks"] = callbacks
    config["model"]["arch"].update(arch)
    config["model"].update(model)
    config["data"].update(data)
    path = tmp / f"{name.replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and needle in err[-1], (name, err[-3:])


def test_the_table_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.parametrize("config", ["configs/tiny.yaml", *sorted(str(p) for p in Path("configs/parallel").glob("*.yaml"))])
def test_shipped_configs_pass_the_checks(config, tmp_path):
    from lightning.pytorch.cli import LightningCLI

    from recipe.data.datamodule import TokenDataModule
    from recipe.module import LlamaLightningModule
    from recipe.preflight import check_fit

    # Data not built yet (the demo is built on first use): the layout checks all run. The
    # curation output check has its own row in CASES.
    cli = LightningCLI(LlamaLightningModule, TokenDataModule, run=False,
                       args=["--config", config, "--data.data_dir", str(tmp_path / "data"),
                             "--data.curate_config", "null"])
    check_fit(cli.trainer, cli.model, cli.datamodule)
