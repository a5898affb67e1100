"""The README's "Your own data" path: `recipe data build` a jsonl, then `recipe fit` on it.

A corpus without a ``domain`` field has one domain (``default``); the shipped tiny config's
data mix names code, prose and math, so such a corpus trains with the mix turned off and
a one-line notice. A corpus whose records carry a ``domain`` field keeps the mix.
``--data.mix false`` turns the mix off explicitly, ``--data.mix true`` requires it. A data
directory that does not exist stops the run with one line saying so and how to build it.
"""

import json
import sysconfig
from pathlib import Path

import pytest

from cli_runs import read_scalars
from recipe.cli import main
from recipe.data.cli import main as data_main
from recipe.data.datamodule import TokenDataModule
from recipe.data.errors import DataError
from recipe.plan import MixSettings, MixStage, choose_mix

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
PARALLEL = sorted(str(p) for p in (ROOT / "configs" / "parallel").glob("*.yaml"))
MODULES = ("textwrap.py", "fnmatch.py", "bisect.py", "colorsys.py", "glob.py", "shlex.py")
NOTICE = "notice: the data mix is off"


def _texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in MODULES]


def _build(tmp: Path, name: str, records: list[dict]) -> Path:
    corpus = tmp / f"{name}.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    # The README's command, with the README's options.
    assert data_main(["build", str(corpus), str(tmp / "data" / name), "--text-field", "text",
                      "--val-fraction", "0.01"]) == 0
    return tmp / "data" / name


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """A corpus without domain tags, and one whose records name the tiny config's domains."""
    tmp = tmp_path_factory.mktemp("own_data")
    texts = _texts()
    plain = _build(tmp, "plain", [{"text": t} for t in texts])
    # Each of the mix's domains gets documents: code, prose (the docstring-heavy modules'
    # text stands in) and math (worked sums).
    domains = ["code", "prose"] * 3
    tagged = [{"text": t, "domain": d} for t, d in zip(texts, domains)]
    tagged += [{"text": f"Problem: {a} + {b} = ?\nSolution: {a} + {b} = {a + b}.", "domain": "math"}
               for a, b in zip(range(10, 70), range(70, 10, -1))]
    return {"plain": plain, "tagged": _build(tmp, "tagged", tagged)}


def _fit(tmp_path: Path, data_dir: Path, *extra: str, config: str = TINY, steps: int = 2) -> int:
    # Two steps of the shipped config, written under tmp_path (the full tiny run takes minutes).
    return main(["fit", "--config", config, "--data.data_dir", str(data_dir), "--data.build_demo", "false",
                 "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(tmp_path / "run"), *extra])


def _mix_tags(tmp_path: Path) -> dict[str, dict[int, float]]:
    scalars = read_scalars(tmp_path / "run")
    assert scalars["train/loss"].keys() == {0, 1}, "the run did not train its two steps"
    return {tag: values for tag, values in scalars.items() if tag.startswith("train/mix/")}


def test_corpus_without_domains_trains_tiny_with_the_mix_off(corpora, tmp_path, capsys):
    assert _fit(tmp_path, corpora["plain"]) == 0
    err = capsys.readouterr().err
    notices = [line for line in err.splitlines() if line.startswith(NOTICE)]
    assert notices == [f"{NOTICE}: {corpora['plain']} has one domain (default) and the mix names code, math, "
                       "prose; give its records a `domain` field to keep it, or pass --data.mix false to turn it "
                       "off explicitly"], err[-2000:]
    assert _mix_tags(tmp_path) == {}  # no mix logged: each step drew from the one domain


def test_domain_tagged_corpus_keeps_the_mix(corpora, tmp_path, capsys):
    assert _fit(tmp_path, corpora["tagged"]) == 0
    assert NOTICE not in capsys.readouterr().err
    mix = _mix_tags(tmp_path)
    # configs/tiny.yaml's first mix stage: code 0.5, prose 0.3, math 0.2.
    assert {tag: values[0] for tag, values in mix.items()} == pytest.approx(
        {"train/mix/code": 0.5, "train/mix/prose": 0.3, "train/mix/math": 0.2})


def test_mix_turned_off_explicitly(corpora, tmp_path, capsys):
    assert _fit(tmp_path, corpora["tagged"], "--data.mix", "false") == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith(NOTICE)]
    assert notices == [f"{NOTICE} (data.mix: false): each domain of {corpora['tagged']} is sampled at its share "
                       "of the tokens"]
    assert _mix_tags(tmp_path) == {}


def test_mix_required_on_a_corpus_without_domains_is_one_error(corpora, tmp_path, capsys):
    assert _fit(tmp_path, corpora["plain"], "--data.mix", "true") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: the data mix names domain 'code' but {corpora['plain']} has default; fix the mix weights, rebuild "
        "the data with that domain, or turn the mix off with --data.mix false")


def test_parallel_reference_config_trains_on_own_data(corpora, tmp_path):
    assert _fit(tmp_path, corpora["plain"], config=str(ROOT / "configs" / "parallel" / "single.yaml")) == 0
    assert read_scalars(tmp_path / "run")["train/loss"].keys() == {0, 1}


@pytest.mark.parametrize("config", [TINY, *PARALLEL], ids=lambda p: Path(p).stem)
def test_shipped_configs_accept_own_data(config, corpora):
    """Every shipped layout passes the launcher's checks on a corpus without domains (the
    multi-process layouts train like the reference, which the test above runs)."""
    from lightning.pytorch.cli import LightningCLI

    from recipe.module import LlamaLightningModule
    from recipe.preflight import check_fit

    cli = LightningCLI(LlamaLightningModule, TokenDataModule, run=False,
                       args=["--config", config, "--data.data_dir", str(corpora["plain"]),
                             "--data.build_demo", "false"])
    check_fit(cli.trainer, cli.model, cli.datamodule)


# ------------------------------------------------------------------ a missing data directory


def test_missing_data_dir_says_so_and_how_to_build_it(tmp_path, capsys):
    nope = tmp_path / "data" / "nope"
    assert main(["fit", "--config", TINY, "--data.data_dir", str(nope), "--data.build_demo", "false"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: data.data_dir {nope} does not exist; build it with `recipe data build <corpus> {nope}` or "
        f"`recipe data curate --config configs/data/demo.yaml --output {nope}` (data.curate_config "
        f"configs/data/demo.yaml writes data/curated-demo, so it does not build {nope} on first use)")
    assert not nope.exists()


def test_missing_data_dir_without_curation(tmp_path, capsys):
    nope = tmp_path / "nope"
    single = str(ROOT / "configs" / "parallel" / "single.yaml")
    assert main(["fit", "--config", single, "--data.data_dir", str(nope), "--data.build_demo", "false"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: data.data_dir {nope} does not exist; build it with `recipe data build <corpus> {nope}` or "
        f"`recipe data demo --out {nope}` (or set data.build_demo: true to build the demo corpus there on first use)")


def test_data_module_without_the_launcher_checks(tmp_path):
    """Used from a script (no `recipe fit`), the data module gives the same one line."""
    nope = tmp_path / "nope"
    with pytest.raises(DataError, match=rf"^data.data_dir {nope} does not exist; build it with `recipe data build"):
        TokenDataModule(str(nope), build_demo=False, curate_config=str(ROOT / "configs/data/demo.yaml")).prepare_data()
    (nope / "train").mkdir(parents=True)  # a build that never finished
    with pytest.raises(DataError, match=rf"^data.data_dir {nope} has no complete train/val shard sets; build it"):
        TokenDataModule(str(nope), build_demo=False).prepare_data()


# ------------------------------------------------------------------ the rule


def test_choose_mix_rule():
    mix = MixSettings([MixStage(0, {"code": 0.5, "prose": 0.5})])
    assert choose_mix(mix, ["default"], "auto", "d")[0] is None  # one untagged domain: off
    assert choose_mix(mix, ["code"], "auto", "d")[0] is None  # one domain the mix does not cover: off
    assert choose_mix(mix, ["code", "prose"], "auto", "d") == (mix, None)
    # Several domains keep the mix even when one is missing: the domain check reports it.
    assert choose_mix(mix, ["code", "math"], "auto", "d") == (mix, None)
    assert choose_mix(mix, None, "auto", "d") == (mix, None)  # data not built yet
    assert choose_mix(mix, ["default"], True, "d") == (mix, None)
    assert choose_mix(mix, ["code", "prose"], False, "d")[0] is None
    assert choose_mix(mix, ["code", "prose"], False, "d")[1] == ("the data mix is off (data.mix: false): each "
                                                                 "domain of d is sampled at its share of the tokens")
    assert choose_mix(None, ["default"], False, "d") == (None, None)  # no mix configured: nothing to say
    single = MixSettings([MixStage(0, {"default": 1.0})])
    assert choose_mix(single, ["default"], "auto", "d") == (single, None)
