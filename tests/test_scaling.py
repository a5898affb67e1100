"""Scaling laws: sweep planning, IsoFLOP fits, downstream forecasts, mix ranking, restart, probe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from recipe.errors import ConfigError, RecipeError
from recipe.scaling import ScalingError
from recipe.scaling.downstream import (
    MCItem, arithmetic_items, cloze_items, compute_optimal_nll, fit_downstream, fit_sigmoid, load_jsonl,
    score_benchmark, Sigmoid,
)
from recipe.scaling.isoflop import PAPER_A, PAPER_ALPHA, PowerLaw, fit_isoflops, fit_parabola, forecast
from recipe.scaling.mix import mix_frontiers, rank_mixes
from recipe.scaling.plan import parse_config, plan_sweep

BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20]


def base_config(**over) -> dict:
    config = {
        "out_dir": "unused",
        "data": {"data_dir": "unused", "seq_len": 128, "micro_batch_size": 2},
        "model": {"vocab_size": 128256, "multiple_of": 16, "ffn_dim_multiplier": None, "max_seq_len": 128,
                  "n_layers": 2},
        "sizes": [{"name": "d16", "dim": 16, "n_heads": 1, "n_kv_heads": 1, "lr": 2e-2},
                  {"name": "d32", "dim": 32, "n_heads": 2, "n_kv_heads": 1, "lr": 1e-2}],
        "budgets": [{"flops": "2e11", "batch_tokens": 256}, {"flops": 8e11, "batch_tokens": 512}],
        "schedule": {"warmup_fraction": 0.1, "min_steps": 10},
    }
    config.update(over)
    return config


# ---------------------------------------------------------------------------- plan


def test_plan_tokens_schedule_and_flops_choice():
    from recipe.flops import non_embedding_params
    from recipe.model import ModelArgs

    plan = plan_sweep(parse_config(base_config()))
    assert [r.run_id for r in plan.runs] == ["C2e11_d16", "C2e11_d32", "C8e11_d16", "C8e11_d32"]
    run = plan.runs[0]
    n = non_embedding_params(ModelArgs(**run.arch))
    assert run.params == n  # the input embedding (a lookup) is not in N; the output head is
    assert n < 2 * 16 * 128256 and n > 16 * 128256
    assert run.steps == round(2e11 / (256 * 6 * n)) and run.tokens == run.steps * 256
    assert run.compute == pytest.approx(2e11, rel=0.01)
    assert run.min_lr == pytest.approx(0.1 * run.lr) and run.weight_decay == 0.1
    assert run.warmup_steps == math.ceil(0.1 * run.steps)
    assert plan.runs[2].batch_tokens == 512 and plan.runs[2].global_batch_size == 4
    from recipe.scaling.sweep import job_commands

    commands = job_commands("configs/x y.yaml", plan)
    assert commands[0] == "recipe scaling sweep --config 'configs/x y.yaml' --only C2e11_d16"
    # The attention term adds FLOPs per token, so the same budget buys fewer tokens.
    with_attention = plan_sweep(parse_config(base_config(flops="6n+attention"))).runs[0]
    assert with_attention.flops_per_token > run.flops_per_token and with_attention.tokens <= run.tokens


@pytest.mark.parametrize("over, needle", [
    ({"budgets": [{"flops": 1e9, "batch_tokens": 256}]}, "too small for the smallest model 'd16'"),
    ({"budgets": [{"flops": 1e12, "batch_tokens": 200}]}, "not a multiple of data.seq_len"),
    ({"flops": "12nd"}, "flops must be one of"),
    ({"sizes": [{"name": "x", "dim": 30, "n_heads": 4, "lr": 1e-3}]}, "not divisible"),
    ({"sizes": [{"name": "x", "dim": 32}]}, "needs at least `name` and `lr`"),
    ({"budgets": [{"flops": "lots", "batch_tokens": 256}]}, "must be a number"),
    ({"mixes": {"a": {"code": 0.5, "prose": 0.6}}}, "sum to 1.1"),
])
def test_bad_configs_are_one_line_errors(over, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        plan_sweep(parse_config(base_config(**over)))
    assert "\n" not in str(err.value)


def test_sizes_a_budget_cannot_afford_are_listed():
    config = base_config(sizes=base_config()["sizes"] + [{"name": "d512", "dim": 512, "n_heads": 8, "lr": 1e-3}])
    plan = plan_sweep(parse_config(config))
    assert any("d512" in s and "min_steps" in s for s in plan.skipped)
    assert all(r.size != "d512" for r in plan.runs if r.budget == 2e11)


# ---------------------------------------------------------------------------- isoflop


def synthetic_sweep(alpha: float, coefficient: float, noise: float, seed: int, budgets=BUDGETS,
                    offsets=(-0.6, -0.3, 0.0, 0.3, 0.6)) -> list[dict]:
    """Runs whose loss is a parabola in log10(tokens) around D* = A C^alpha, plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in budgets:
        x_opt = math.log10(coefficient * budget ** alpha)
        floor = 2.0 + 30 * budget ** -0.05
        for k, offset in enumerate(offsets):
            # Sizes need not sit symmetrically around the optimum.
            x = x_opt + offset + rng.uniform(-0.05, 0.05)
            tokens = 10 ** x
            rows.append({"run_id": f"C{budget:.0e}_{k}", "budget": budget, "tokens": tokens,
                         "params": budget / (6 * tokens), "compute": budget,
                         "val_loss": floor + 0.4 * (x - x_opt) ** 2 + rng.normal(0, noise)})
    return rows


def test_parabola_minimum_and_bad_shapes():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    parabola = fit_parabola(x, 0.5 * (x - 2.6) ** 2 + 3.0)
    assert parabola.x_opt == pytest.approx(2.6) and parabola.loss_opt == pytest.approx(3.0)
    with pytest.raises(ScalingError, match="a parabola needs at least 3"):
        fit_parabola([1.0, 2.0], [3.0, 2.0])
    with pytest.raises(ScalingError, match="no interior minimum"):
        fit_parabola(x, -(x - 2.5) ** 2)
    with pytest.raises(ScalingError, match="outside the sampled range"):
        fit_parabola(x, (x - 7.0) ** 2)
    with pytest.raises(ScalingError, match="non-finite"):
        fit_parabola(x, [1.0, float("nan"), 1.0, 2.0])


def test_isoflop_fit_recovers_the_power_law():
    rows = synthetic_sweep(PAPER_ALPHA, PAPER_A, noise=0.003, seed=1)
    fit = fit_isoflops(rows, bootstrap=300, seed=0)
    assert not fit.unusable and not fit.excluded
    assert fit.tokens_law.exponent == pytest.approx(PAPER_ALPHA, abs=0.02)
    assert math.log10(fit.tokens_law.coefficient) == pytest.approx(math.log10(PAPER_A), abs=0.4)
    low, high = fit.interval("alpha")
    assert low < PAPER_ALPHA < high and high - low < 0.1
    # The parameter parabolas give N* = C / (6 D*): exponent 1 - alpha.
    assert fit.params_law.exponent == pytest.approx(1 - PAPER_ALPHA, abs=0.02)
    predicted = fit.forecast(3.8e25)
    assert predicted["tokens"] == pytest.approx(16.3e12, rel=0.35)
    assert predicted["tokens_ci"][0] < predicted["tokens"] < predicted["tokens_ci"][1]


def test_isoflop_fit_on_a_chinchilla_loss_surface():
    """L = E + A/N^a + B/D^b with C = 6ND: the optimum follows D* ~ C^(a / (a + b))."""
    a, b = 0.34, 0.28
    rows = []
    for budget in BUDGETS:
        for log_n in np.linspace(7.0, 9.5, 11):
            n = 10 ** log_n
            d = budget / (6 * n)
            rows.append({"budget": budget, "tokens": d, "params": n, "val_loss": 1.7 + 400 / n ** a + 410 / d ** b})
    fit = fit_isoflops(rows, bootstrap=0)
    assert fit.tokens_law.exponent == pytest.approx(a / (a + b), abs=0.03)


def test_paper_forecast_at_38e25():
    result = forecast(PowerLaw(PAPER_A, PAPER_ALPHA), 3.8e25)
    assert result["tokens"] == pytest.approx(16.3e12, rel=0.01)
    assert result["params_from_tokens"] == pytest.approx(3.9e11, rel=0.02)  # paper: 402B on 16.55T


def test_unusable_budgets_are_reported_not_dropped():
    rows = synthetic_sweep(0.5, 0.3, noise=0.0, seed=0, budgets=BUDGETS[:3])
    rows = [r for r in rows if not (r["budget"] == 1e18 and r["run_id"][-1] in "0123")]  # one point left
    rows += [{"run_id": "bad", "budget": 1e19, "tokens": 1e9, "params": 1e9, "val_loss": float("nan")}]
    concave = [{"budget": 1e21, "tokens": 10 ** x, "params": 1.0, "val_loss": -(x - 11.0) ** 2} for x in (10, 11, 12)]
    fit = fit_isoflops(rows + concave, bootstrap=0)
    assert "a parabola needs at least 3" in fit.unusable[1e18]
    assert "no interior minimum" in fit.unusable[1e21]
    assert any("bad" in line and "nan" in line for line in fit.excluded)
    assert sorted(b.budget for b in fit.budgets) == [3e18, 1e19]
    with pytest.raises(ScalingError, match="at >= 2 budgets, got 1 .*1e\\+18"):
        fit_isoflops([r for r in rows if r["budget"] != 3e18], bootstrap=0)


# ---------------------------------------------------------------------------- downstream


def test_sigmoid_fit_recovers_its_parameters():
    truth = Sigmoid(midpoint=1.8, slope=4.0, floor=0.25)
    rng = np.random.default_rng(0)
    nll = np.linspace(0.6, 3.2, 30)
    acc = truth(nll) + rng.normal(0, 0.01, nll.shape)
    fitted = fit_sigmoid(nll, acc, floor=0.25)
    assert fitted.midpoint == pytest.approx(1.8, abs=0.05)
    assert fitted.slope == pytest.approx(4.0, rel=0.15)
    ceiling = Sigmoid(1.5, 3.0, 0.25, 0.9)
    fitted = fit_sigmoid(nll, ceiling(nll), floor=0.25, fit_ceiling=True)
    assert fitted.ceiling == pytest.approx(0.9, abs=0.01) and fitted.midpoint == pytest.approx(1.5, abs=0.02)
    with pytest.raises(ScalingError, match="at least 3"):
        fit_sigmoid([1.0, 2.0], [0.5, 0.3])


def test_two_step_downstream_forecast():
    law, sigmoid = PowerLaw(40.0, -0.06), Sigmoid(1.6, 5.0, 0.25)
    budgets = [1e18, 1e19, 1e20, 1e21]
    budget_points = [(c, float(law(c))) for c in budgets]
    accuracy_points = [(x, float(sigmoid(x))) for x in np.linspace(1.0, 2.6, 12)]
    result = fit_downstream(budget_points, accuracy_points)
    predicted = result.predict(3.8e25)
    assert predicted["nll"] == pytest.approx(float(law(3.8e25)), rel=1e-6)
    assert predicted["accuracy"] == pytest.approx(float(sigmoid(law(3.8e25))), abs=0.01)
    rows = [{"budget": 1e18, "tokens": t, "bench_nll": 2.0 + (math.log10(t) - 9) ** 2} for t in (1e8, 1e9, 1e10)]
    assert compute_optimal_nll(rows, {1e18: 1e9}) == [(1e18, pytest.approx(2.0))]


def test_benchmarks_and_arc_format(tmp_path):
    items = arithmetic_items(20, seed=3)
    assert all(len(i.choices) == 4 and 0 <= i.answer < 4 for i in items)
    first = items[0]
    a, op, b = first.prompt.split("What is ")[1].rstrip("?\nAnswer:").split()
    assert int(first.choices[first.answer]) == eval(f"{a} {op} {b}")  # noqa: S307 - our own digits
    cloze = cloze_items(["the quick brown fox jumps over the lazy dog and runs far away from the old farm house "
                         "while the farmer sleeps under the apple tree near the river bank"], n=5, seed=0)
    assert all(i.prompt and i.choices[i.answer].strip().isalpha() for i in cloze)
    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps(r) for r in [
        {"id": "q1", "question": {"stem": "Which is a metal?", "choices": [
            {"text": "wood", "label": "A"}, {"text": "iron", "label": "B"}, {"text": "glass", "label": "C"}]},
         "answerKey": "B"},
        {"id": "q2", "question": "Sun is a?", "choices": {"text": ["star", "planet"], "label": ["1", "2"]},
         "answerKey": "1"},
    ]) + "\n")
    loaded = load_jsonl(arc)
    assert loaded[0].answer == 1 and loaded[0].choices[1] == " iron" and "Which is a metal?" in loaded[0].prompt
    assert loaded[1].answer == 0 and loaded[1].choices == [" star", " planet"]
    arc.write_text('{"question": {"stem": "x", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "Z"}\n')
    with pytest.raises(ConfigError, match="arc.jsonl:1: .*answerKey"):
        load_jsonl(arc)


def test_score_benchmark_matches_a_full_forward():
    import torch
    import torch.nn.functional as F

    from recipe.model import ModelArgs, Transformer

    class CharTokenizer:
        bos_id, pad_id = 1, 0

        def encode(self, text, bos=False):
            return ([1] if bos else []) + [3 + ord(c) % 60 for c in text]

    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16,
                                  ffn_dim_multiplier=None, max_seq_len=32))
    model.init_weights()
    items = [MCItem("ab c", [" x", " yz"], 1), MCItem("hello", [" a", " bb", " c"], 0)]
    score = score_benchmark(model, CharTokenizer(), items, batch_size=3)
    tok = CharTokenizer()
    expected = []
    for item in items:
        prompt = tok.encode(item.prompt, bos=True)
        nlls = []
        for choice in item.choices:
            answer = tok.encode(choice)
            row = torch.tensor([prompt + answer])
            logits = model(row)[0, len(prompt) - 1:-1]
            nlls.append(float(F.cross_entropy(logits, torch.tensor(answer)).detach()))
        expected.append(nlls)
    assert score.nll == pytest.approx(np.mean([e[i.answer] for e, i in zip(expected, items)]), rel=1e-5)
    assert score.accuracy == np.mean([int(np.argmin(e) == i.answer) for e, i in zip(expected, items)])
    assert score.chance == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert model.output is not None  # the head is put back


# ---------------------------------------------------------------------------- mixes


def test_mix_ranking_extrapolates_rather_than_taking_the_best_small_loss():
    # Loss at 1e15 FLOPs: flat 4.0 < middle 4.2 < steep 4.4; at 1e22 the order is reversed.
    curves = {name: PowerLaw(at_1e15 * 1e15 ** -exponent, exponent)
              for name, at_1e15, exponent in (("steep", 4.4, -0.05), ("flat", 4.0, -0.01), ("middle", 4.2, -0.03))}
    rng = np.random.default_rng(0)
    rows = []
    for name, law in curves.items():
        for budget in (1e15, 1e16, 1e17):
            for size, factor in (("a", 1.03), ("b", 1.0), ("c", 1.05)):  # the frontier is the best size
                rows.append({"run_id": f"{name}_{budget:g}_{size}", "mix": name, "budget": budget,
                             "val_loss": float(law(budget)) * factor * (1 + rng.normal(0, 1e-4))})
    rows.append({"run_id": "diverged", "mix": "flat", "budget": 1e16, "val_loss": None})
    frontiers, excluded = mix_frontiers(rows)
    assert excluded == ["run diverged: val_loss is None, left out"]
    small = {m: min(l for b, l in pts if b == 1e15) for m, pts in frontiers.items()}
    assert min(small, key=small.get) == "flat"  # best at small scale ...
    ranking = rank_mixes(frontiers, target=1e22)
    assert [c.name for c in ranking.curves] == ["steep", "middle", "flat"]  # ... but not at 1e22
    for curve in ranking.curves:
        assert curve.law.exponent == pytest.approx(curves[curve.name].exponent, abs=0.002)
    one_budget = {"lonely": [(1e15, 3.0)], **frontiers}
    assert "needs at least 2" in rank_mixes(one_budget, 1e22).unusable["lonely"]


# ---------------------------------------------------------------------------- sweep, restart, probe


def write_domain_shards(root: Path) -> Path:
    """A three-domain shard set with a 128-token vocabulary: real Lightning runs in a second."""
    from recipe.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    for split, docs in (("train", 40), ("val", 6)):
        with ShardWriter(root / split, vocab_size=128, bos_id=1, eos_id=2, shard_tokens=512) as writer:
            for i in range(docs):
                for k, domain in enumerate(("code", "math", "prose")):
                    body = rng.integers(3 + 40 * k, 43 + 40 * k, int(rng.integers(20, 60)))
                    writer.add(np.concatenate([[1], body, [2]]), domain=domain)
    return root


def tiny_sweep(tmp_path: Path) -> dict:
    from recipe.flops import non_embedding_params
    from recipe.model import ModelArgs

    data = tmp_path / "data"
    if not data.exists():
        write_domain_shards(data)
    model = {"vocab_size": 128, "multiple_of": 16, "ffn_dim_multiplier": None, "max_seq_len": 16,
             "n_layers": 1, "n_heads": 2, "n_kv_heads": 1}
    n = non_embedding_params(ModelArgs(dim=16, **model))
    return {
        "out_dir": str(tmp_path / "sweep"), "checkpoint": "full",
        "data": {"data_dir": str(data), "seq_len": 16, "micro_batch_size": 2, "val_batches": 1, "val_batch_size": 2,
                 "build_demo": False},
        "model": model,
        "sizes": [{"name": "d16", "dim": 16, "lr": 1e-2}],
        "budgets": [{"flops": 2 * 32 * 6 * n, "batch_tokens": 32}],  # two steps of 32 tokens
        "schedule": {"min_steps": 2},
    }


def test_sweep_records_a_run_and_skips_it_on_restart(tmp_path, monkeypatch):
    from recipe.scaling import sweep
    from recipe.scaling.anneal_probe import anneal_probe

    config = parse_config(tiny_sweep(tmp_path))
    plan = plan_sweep(config)
    assert [(r.size, r.steps, r.tokens) for r in plan.runs] == [("d16", 2, 64)]
    lines: list[str] = []
    rows = sweep.run_sweep(config, plan, log=lines.append)
    assert len(rows) == 1 and math.isfinite(rows[0]["val_loss"]) and rows[0]["tokens"] == 64
    out = Path(config.out_dir)
    assert (out / "results.csv").read_text().splitlines()[0].startswith("run_id,mix,budget")
    assert json.loads((out / "results.json").read_text())[0]["run_id"] == plan.runs[0].run_id
    assert Path(rows[0]["checkpoint"]).is_file()
    assert not list(out.rglob("*.tmp-*"))  # atomic writes leave no temporaries

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "train_run", no_training)
    lines.clear()
    again = sweep.run_sweep(config, plan, log=lines.append)
    assert again == rows and "finished earlier" in lines[0]
    # A changed setting under the same run id is refused rather than mixed into the table.
    changed = tiny_sweep(tmp_path)
    changed["sizes"][0]["lr"] = 5e-3
    changed_config = parse_config(changed)
    with pytest.raises(ConfigError, match="different settings"):
        sweep.run_sweep(changed_config, plan_sweep(changed_config), log=lines.append)
    monkeypatch.undo()

    # The annealing probe resumes that checkpoint twice (default mix, 30% math) for 2 steps each.
    report = anneal_probe(rows[0]["checkpoint"], "math", anneal_tokens=64, out_dir=tmp_path / "probe",
                          log=lines.append)
    assert report["candidate_mix"]["math"] == pytest.approx(0.3 + 0.7 * report["default_mix"]["math"])
    assert set(report["change"]) >= {"val_loss", "val_loss/math", "val_loss/code"}
    assert report["change"]["val_loss"] == pytest.approx(
        report["with_candidate"]["val_loss"] - report["default"]["val_loss"])
    assert (tmp_path / "probe" / "anneal_probe.json").is_file()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from recipe.cli import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(synthetic_sweep(0.5, 0.3, 0.0, 0, budgets=[1e18])))
    assert main(["scaling", "fit", "--results", str(results), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the power law needs") and "\n" not in err
    assert main(["scaling", "sweep", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "scaling config not found" in capsys.readouterr().err
    assert issubclass(ScalingError, RecipeError)


def test_cli_fit_and_forecast_write_plots(tmp_path, capsys):
    from recipe.cli import main

    rows = synthetic_sweep(PAPER_ALPHA, PAPER_A, noise=0.002, seed=2, budgets=BUDGETS[:3])
    for r in rows:  # a benchmark whose NLL falls with compute and loss
        r["bench_nll"] = r["val_loss"] - 1.0
        r["bench_acc"] = float(Sigmoid(2.4, 6.0, 0.25)(r["bench_nll"]))
        r["bench_chance"] = 0.25
    (tmp_path / "results.json").write_text(json.dumps(rows))
    assert main(["scaling", "fit", "--results", str(tmp_path), "--bootstrap", "50", "--target-flops", "3.8e25"]) == 0
    out = capsys.readouterr().out
    assert "D*(C) = " in out and "at 3.8e+25 FLOPs" in out
    for name in ("fit.json", "isoflop.png", "power_law.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert main(["scaling", "forecast", "--flops", "3.8e25", "--paper"]) == 0
    assert "1.629e+13 training tokens" in capsys.readouterr().out
    assert main(["scaling", "forecast", "--flops", "1e21", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "normalized NLL" in out and (tmp_path / "downstream.png").is_file()
