"""Every command in README.md's ```bash blocks is run here, or checked for syntax.

The test reads README.md itself. Each command (continuation lines joined, comments
dropped) must appear in ``RUNS``, which runs it in a scratch folder in the order
listed, or in ``NOT_RUN``, which gives the reason it cannot run on this machine (a
GPU, a cluster, a server, the network, the whole suite, many processes) and checks its
syntax: ``--print_config`` for ``recipe fit``, and ``--help`` holding every option the
command uses for the others. A command added to or changed in README.md fails
``test_every_readme_command_is_covered`` until it is listed here.

The scratch folder links ``configs/`` and ``bench/`` from the repository. The raw demo
documents in it are a small version of the demo's (20 standard-library modules, 120
pages of the Python reference as prose, 200 math problems), so the README's curation
command runs its real pipeline and config in seconds, not the ~40 s of the full corpus,
and needs no download. Training commands run 2 steps where the config runs more.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cli_runs import read_scalars
from recipe.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
# Two steps of a training command whose config runs more (the tiny config's 60 steps take
# about 5 minutes on two cores).
TWO_STEPS = ("--trainer.max_steps", "2")


# ---------------------------------------------------------------------------- README.md


def readme_commands(text: str) -> list[tuple[str, ...]]:
    """The commands of the ```bash blocks of ``text``, each as its shell words (comments dropped)."""
    commands = []
    for block in re.findall(r"^([ \t]*)```bash\n(.*?)^\1```", text, re.S | re.M):
        lines = [line.strip() for line in block[1].splitlines()]
        joined: list[str] = []
        pending = ""
        for line in lines:
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            joined.append(pending + line)
            pending = ""
        for line in joined:
            words = tuple(shlex.split(line, comments=True))
            if words:
                commands.append(words)
    return commands


def words(command: str) -> tuple[str, ...]:
    return tuple(shlex.split(command, comments=True))


# ---------------------------------------------------------------------------- running


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run(argv: tuple[str, ...] | list[str], capsys: pytest.CaptureFixture, cwd: Path) -> Result:
    """Run a command in ``cwd``: ``recipe`` in this process, anything else as a subprocess."""
    argv = list(argv)
    if argv[0] == "recipe":
        capsys.readouterr()
        try:
            rc = main(argv[1:])
        except SystemExit as stop:  # --help and --print_config exit
            rc = int(stop.code or 0)
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif (BIN / argv[0]).exists():
        argv[0] = str(BIN / argv[0])
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Result(done.returncode, done.stdout, done.stderr)


def recipe_subprocess(argv: tuple[str, ...], cwd: Path) -> Result:
    """``recipe`` as its own process: Lightning's launcher re-executes the command line for
    every further rank, which a pytest process cannot be."""
    done = subprocess.run([sys.executable, "-m", "recipe.cli", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return Result(done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------------------- the scratch folder


def write_small_demo_raw(raw: Path) -> Path:
    """``raw/demo.jsonl`` in the demo corpus's format: code, prose and math records."""
    from recipe.data.curate.synthetic import reference_texts
    from recipe.data.demo import iter_code_documents, iter_math_documents

    raw.mkdir(parents=True, exist_ok=True)
    records = [
        *iter_code_documents(max_files=20, max_bytes=300_000),
        *({"text": t, "source": f"pydoc/{i}", "domain": "prose"} for i, t in enumerate(reference_texts(120))),
        *iter_math_documents(200),
    ]
    path = raw / "demo.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    from recipe.data.build import build_shards
    from recipe.data.curate.synthetic import low_quality_texts, reference_texts
    from recipe.interop.weights import ARCH_YAML_FILE, arch_yaml
    from recipe.model_info import model_args_from_config

    root = tmp_path_factory.mktemp("readme")
    for name in ("configs", "bench"):
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    # The curation builds the rest of its raw inputs (the crawl, the classifier's files).
    demo = write_small_demo_raw(root / "data" / "curate-demo" / "raw")
    # data/demo, which the parallel configs train on: the same documents, uncurated, as
    # `recipe data demo` builds the full corpus.
    build_shards(demo, root / "data" / "demo", log=lambda s: None)
    # "Your own data": a jsonl with a text field and no domain.
    (root / "my_corpus.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in reference_texts(40)), encoding="utf-8")
    # The quality classifier's labelled files.
    (root / "good.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reference_texts(60)))
    (root / "bad.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in low_quality_texts(60)))
    # What `recipe import meta` writes for Meta's 8B, without its 16 GB of weights.
    imported = root / "runs" / "imported" / "llama3_8b"
    imported.mkdir(parents=True)
    (imported / ARCH_YAML_FILE).write_text(arch_yaml(model_args_from_config(ROOT / "configs/llama3_8b.yaml"),
                                                     Path("runs/imported/llama3_8b")))
    # The tiny config averages the weights of its annealing steps (from step 52 on); the
    # 2-step runs here average from step 0, so that the export blocks have an average.
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    callbacks = tiny["trainer"]["callbacks"]
    polyak = next(c for c in callbacks if c["class_path"].endswith("PolyakAveraging"))
    polyak["init_args"]["start_tokens"] = 0
    (root / "average_from_start.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return root


# ---------------------------------------------------------------------------- checks of the runs


def ok(result: Result, cwd: Path | None = None) -> None:
    assert result.rc == 0, (f"exit status {result.rc}; the end of its output:\n{result.out[-1500:]}\n"
                            f"{result.err[-3000:]}")


def trained(folder: str, steps: set[int]) -> Callable[[Result, Path], None]:
    def check(result: Result, cwd: Path) -> None:
        ok(result)
        losses = read_scalars(cwd / folder)["train/loss"]
        assert steps <= losses.keys(), sorted(losses)
    return check


def prints(*needles: str, stream: str = "out") -> Callable[[Result, Path], None]:
    def check(result: Result, cwd: Path) -> None:
        ok(result)
        text = getattr(result, stream)
        for needle in needles:
            assert needle in text, (needle, text[-3000:])
    return check


def writes(*paths: str) -> Callable[[Result, Path], None]:
    def check(result: Result, cwd: Path) -> None:
        ok(result)
        for path in paths:
            assert (cwd / path).exists(), path
    return check


def curated(result: Result, cwd: Path) -> None:
    ok(result)
    from recipe.data.shards import ShardSet

    # The tiny config's mix needs code, prose and math shards.
    assert {"code", "prose", "math"} <= set(ShardSet(cwd / "data/curated-demo/train").domains)
    assert (cwd / "data/curated-demo/report/report.md").is_file()


def curated_on_ray(result: Result, cwd: Path) -> None:
    ok(result)
    report = json.loads((cwd / "data/curated-demo-ray/report/report.json").read_text())
    assert report["executor"]["name"] == "ray" and "quality" in report["executor"]["remote_stages"]
    for split in ("train", "val"):  # the same shards as the local run's
        local = sorted((cwd / "data/curated-demo" / split).glob("*.npy"))
        assert local and all(p.read_bytes() == (cwd / "data/curated-demo-ray" / split / p.name).read_bytes()
                             for p in local)


def sharded(result: Result, cwd: Path) -> None:
    trained("runs/parallel/fsdp2", {0, 1, 2})(result, cwd)
    assert (cwd / "runs/parallel/fsdp2/checkpoints/last.ckpt").is_dir()  # a distributed (DCP) checkpoint


def own_data(result: Result, cwd: Path) -> None:
    trained("runs/my_corpus", {0, 1})(result, cwd)
    assert "notice: the data mix is off: data/my_corpus has one domain (default)" in result.err, result.err[-3000:]


# ---------------------------------------------------------------------------- what runs, in order


@dataclass
class Run:
    """A README command run in the scratch folder, with ``extra`` arguments appended."""

    command: str
    check: Callable[[Result, Path], None]
    extra: tuple[str, ...] = ()
    own_process: bool = False  # several ranks: Lightning's launcher needs a process of its own


TINY_SHORT = (*TWO_STEPS, "--config", "average_from_start.yaml")
RUNS = [
    # Quick start.
    Run("recipe data curate --config configs/data/demo.yaml", curated),
    Run("recipe data curate --config configs/data/demo.yaml --executor ray --output data/curated-demo-ray",
        curated_on_ray),
    Run("recipe fit --config configs/tiny.yaml", trained("runs/tiny", {0, 1}), TINY_SHORT),
    Run("recipe fit --config configs/tiny.yaml --ckpt_path last", trained("runs/tiny", {2}),
        ("--trainer.max_steps", "3", "--config", "average_from_start.yaml")),
    # One validation batch of the config's four: each computes 2,048 x 128,256 fp32 logits.
    Run("recipe validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt",
        prints("val/loss"), ("--data.val_batches", "1")),
    Run("recipe fit --config configs/tiny.yaml --print_config", prints("class_path: callbacks.data_mix")),
    Run("recipe report runs/tiny", writes("runs/tiny/report.png", "runs/tiny/report.html")),
    # Export and generate (the tiny run above wrote an averaged checkpoint and its average).
    Run("recipe export runs/tiny/checkpoints/last.ckpt hf/polyak --averaged polyak --dtype fp32",
        writes("hf/polyak/config.json")),
    Run("recipe export runs/tiny/polyak_average.pt hf/tiny --config configs/tiny.yaml", writes("hf/tiny/config.json")),
    Run('recipe generate --ckpt hf/tiny --prompt "To be, or not to be" --max-new-tokens 50', ok),
    # Into runs/tiny, which holds the 3 steps above: a fresh run or a resumed one, step 3 is new.
    Run("recipe fit --config configs/tiny.yaml --trainer.max_steps 300 --model.optimizer.lr 1e-3",
        trained("runs/tiny", {3}), ("--trainer.max_steps", "4")),
    Run("recipe fit --config configs/tiny.yaml --trainer.default_root_dir runs/tiny-lr1e-3 --model.optimizer.lr 1e-3",
        trained("runs/tiny-lr1e-3", {0, 1}), TWO_STEPS),
    Run("recipe fit --config configs/tiny.yaml --trainer.default_root_dir runs/tiny-lr1e-3 --model.optimizer.lr 1e-3 "
        "--ckpt_path last", trained("runs/tiny-lr1e-3", {2}), ("--trainer.max_steps", "3")),
    # Your own data, in its own run folder: runs/tiny holds checkpoints of other data.
    Run("recipe data build my_corpus.jsonl data/my_corpus --text-field text --val-fraction 0.01",
        writes("data/my_corpus/train/index.json")),
    Run("recipe fit --config configs/tiny.yaml --data.data_dir data/my_corpus --data.build_demo false "
        "--trainer.default_root_dir runs/my_corpus", own_data, TWO_STEPS),
    Run("recipe info --config configs/llama3_405b.yaml", prints("405,853,388,800")),
    # Parallel training (the configs run 5 steps; 2 and 3 here), each layout in runs/parallel/<layout>.
    Run("recipe fit --config configs/parallel/single.yaml", trained("runs/parallel/single", {0, 1}), TWO_STEPS),
    Run("recipe fit --config configs/parallel/fsdp2.yaml", sharded, ("--trainer.max_steps", "3"), own_process=True),
    Run("recipe export runs/parallel/fsdp2/checkpoints/last.ckpt hf/model", writes("hf/model/config.json")),
    Run("recipe data train-classifier --positives good.jsonl --negatives bad.jsonl --out quality.npz",
        writes("quality.npz")),
    Run("recipe scaling sweep --config configs/scaling/mini.yaml --print-jobs jobs.txt", writes("jobs.txt")),
    Run("recipe scaling forecast --paper --flops 3.8e25",
        prints("1.629e+13 training tokens", "3.887e+11 parameters")),
    Run("recipe plan --config configs/llama3_405b.yaml --gpus 16384 --gpu h100-80gb",
        prints("layouts fit; the fastest")),
]


# ---------------------------------------------------------------------------- what does not run, and why


@dataclass
class NotRun:
    """A README command that cannot run here: ``why``, and how its syntax is checked.

    ``help`` is the help command whose output must name every ``--option`` the README
    command uses; ``config`` is the ``recipe fit`` part to parse with ``--print_config``.
    """

    command: str
    why: str
    help: str | None = None
    config: str | None = None
    exists: str | None = None  # a file the command needs that this repository must have


GPU = "needs an NVIDIA GPU"
CLUSTER = "needs a cluster (many nodes or GPUs)"
NOT_RUN = [
    NotRun("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url "
           'https://download.pytorch.org/whl/cpu && .venv/bin/pip install -e ".[dev]"',
           "needs PyTorch's package index (network)", exists="pyproject.toml"),
    NotRun('python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[dev]"',
           "needs the package index (network); this environment is what it installs", exists="pyproject.toml"),
    NotRun(".venv/bin/python -m pytest", "the whole suite, this test included", help="python -m pytest --help"),
    NotRun("tensorboard --logdir runs/tiny", "a server; the runs above write the events it reads",
           help="tensorboard --help"),
    NotRun("recipe fit --config configs/parallel/4d.yaml --trainer.devices 16", "16 processes: " + CLUSTER,
           config="recipe fit --config configs/parallel/4d.yaml --trainer.devices 16"),
    NotRun("recipe fit -c configs/parallel/fsdp2.yaml",
           "the `--config configs/parallel/fsdp2.yaml` run above (`-c` is `--config`)",
           config="recipe fit -c configs/parallel/fsdp2.yaml"),
    NotRun("recipe fit -c configs/parallel/3d.yaml --trainer.default_root_dir runs/parallel/fsdp2 "
           "--trainer.max_steps 8",
           "8 processes (pp2 x fsdp2 x tp2); resuming under another layout is tests/test_recipe_resume.py's",
           config="recipe fit -c configs/parallel/3d.yaml --trainer.default_root_dir runs/parallel/fsdp2 "
                  "--trainer.max_steps 8"),
    NotRun("torchrun --nproc_per_node 8 --nnodes 2 --rdzv_endpoint HOST:29500 $(which recipe) fit -c "
           "configs/llama3_405b.yaml --trainer.devices 8 --trainer.num_nodes 2", CLUSTER, help="torchrun --help",
           config="recipe fit -c configs/llama3_405b.yaml --trainer.devices 8 --trainer.num_nodes 2"),
    NotRun("srun --nodes 2 --ntasks-per-node 8 recipe fit -c configs/llama3_405b.yaml --trainer.num_nodes 2",
           CLUSTER + " (SLURM)", config="recipe fit -c configs/llama3_405b.yaml --trainer.num_nodes 2"),
    NotRun("recipe scaling sweep --config configs/scaling/mini.yaml",
           "12 training runs, about 4 minutes (python bench/scaling_mini.py runs sweep, fit and forecast)",
           help="recipe scaling sweep --help", exists="configs/scaling/mini.yaml"),
    NotRun("recipe scaling fit --config configs/scaling/mini.yaml", "needs the sweep's 12 runs",
           help="recipe scaling fit --help"),
    NotRun("recipe scaling forecast --config configs/scaling/mini.yaml --flops 1e13", "needs the sweep's fit",
           help="recipe scaling forecast --help"),
    NotRun("recipe scaling mix --config configs/scaling/mix_mini.yaml", "trains a sweep per mix, minutes",
           help="recipe scaling mix --help", exists="configs/scaling/mix_mini.yaml"),
    NotRun("recipe scaling anneal-probe --ckpt runs/scaling/mini/runs/C1e11_d8/final.ckpt --candidate code",
           "needs a checkpoint of the sweep", help="recipe scaling anneal-probe --help"),
    NotRun("recipe data curate --config configs/data/demo.yaml --fresh",
           "restarts a killed curation run; tests/test_curate_restart.py kills runs and resumes them",
           help="recipe data curate --help"),
    NotRun("ray start --head --port 6379", "starts a Ray head node: " + CLUSTER, help="ray start --help"),
    NotRun("ray start --address HEAD:6379", "joins a Ray cluster: " + CLUSTER, help="ray start --help"),
    NotRun("python bench/run_all.py", "every benchmark, about 9 minutes", help="python bench/run_all.py --help"),
    NotRun("python bench/run_all.py --quick", "every benchmark in short form, minutes",
           help="python bench/run_all.py --help"),
    NotRun("python bench/gpu_train.py", GPU, help="python bench/gpu_train.py --help"),
    NotRun("python bench/gpu_train.py --cpu", "the GPU benchmark's CPU smoke run: about 25 s, beyond this test's "
           "time budget", help="python bench/gpu_train.py --help"),
    NotRun("python bench/gpu_check.py", GPU, help="python bench/gpu_check.py --help"),
    NotRun("python bench/gpu_memory.py", GPU, help="python bench/gpu_memory.py --help"),
    NotRun("python bench/gpu_step.py", GPU, help="python bench/gpu_step.py --help"),
    NotRun("recipe import meta ~/Meta-Llama-3.1-8B runs/imported/llama3_8b", "needs Meta's released 8B weights",
           help="recipe import --help"),
    NotRun("recipe fit --config configs/llama3_8b.yaml --config runs/imported/llama3_8b/model.yaml",
           "8B parameters: " + CLUSTER,
           config="recipe fit --config configs/llama3_8b.yaml --config runs/imported/llama3_8b/model.yaml"),
]


# ---------------------------------------------------------------------------- tests


def test_every_readme_command_is_covered():
    listed = [words(r.command) for r in RUNS] + [words(n.command) for n in NOT_RUN]
    assert len(set(listed)) == len(listed), "a command is listed twice"
    in_readme = set(readme_commands(README.read_text(encoding="utf-8")))
    missing = [shlex.join(c) for c in sorted(in_readme - set(listed))]
    stale = [shlex.join(c) for c in listed if c not in in_readme]
    assert not missing and not stale, (
        f"README.md commands neither run nor listed in {Path(__file__).name}: {missing}; "
        f"listed there but not in README.md (changed or removed): {stale}")


def test_the_readme_parser():
    text = ("x\n```bash\nrecipe a --b 1   # note\n\n  cmd \\\n  --c \"d e\"\n```\n"
            "  ```bash\n  recipe f\n  ```\n```yaml\nnot: a command\n```\n")
    assert readme_commands(text) == [("recipe", "a", "--b", "1"), ("cmd", "--c", "d e"), ("recipe", "f")]


@pytest.mark.parametrize("step", RUNS, ids=lambda r: r.command[:80])
def test_readme_command_runs(step: Run, scratch: Path, capsys, monkeypatch):
    monkeypatch.chdir(scratch)
    argv = (*words(step.command), *step.extra)
    result = recipe_subprocess(argv, scratch) if step.own_process else run(argv, capsys, scratch)
    step.check(result, scratch)


@pytest.mark.parametrize("item", NOT_RUN, ids=lambda n: n.command[:80])
def test_readme_command_syntax(item: NotRun, scratch: Path, capsys, monkeypatch):
    monkeypatch.chdir(scratch)
    assert item.help or item.config or item.exists, f"{item.command}: no syntax check"
    if item.exists:
        assert (ROOT / item.exists).is_file(), item.exists
    if item.help:
        result = run(words(item.help), capsys, scratch)
        assert result.rc == 0, (item.help, result.err[-2000:])
        options = {w.split("=")[0] for w in words(item.command) if w.startswith("--")}
        if item.config:  # the launcher's own options only; the recipe part is parsed below
            options -= {w for w in words(item.config) if w.startswith("--")}
        unknown = sorted(o for o in options if o not in result.out)
        assert not unknown, f"{item.help} does not list {unknown}"
    if item.config:
        result = run((*words(item.config), "--print_config"), capsys, scratch)
        assert result.rc == 0 and "model:" in result.out, (item.config, result.err[-2000:])


def test_setup_command_matches_the_project():
    """The setup line pins the torch this environment runs and installs an extra the project has."""
    import torch

    lines = [n.command for n in NOT_RUN if n.command.startswith("python3 -m venv")]
    assert len(lines) == 2  # the one command, and its CPU-only variant
    for line in lines:
        pin = re.search(r"torch==(\S+)", line).group(1)
        assert torch.__version__.split("+")[0] == pin, (torch.__version__, pin)
        extra = re.search(r'-e "\.\[(\w+)\]"', line).group(1)
        extras = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1]
        extras = extras.split("\n[", 1)[0]
        assert re.search(rf"^{extra}\s*=", extras, re.M), f"pyproject.toml has no optional dependencies {extra!r}"
        assert subprocess.run(["bash", "-n", "-c", line]).returncode == 0  # the shell can parse it
