"""``recipe scaling sweep|fit|forecast|mix|anneal-probe``.

  sweep         train the runs of a sweep config (finished ones are skipped), write the table
  fit           IsoFLOP parabolas + power law (+ bootstrap CIs) from the table, plots
  forecast      compute-optimal tokens / parameters, and benchmark NLL / accuracy, at a budget
  mix           train small models on candidate data mixes, rank the mixes at a larger budget
  anneal-probe  anneal a checkpoint with X% of a candidate domain against the default mix
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from recipe.errors import ConfigError
from recipe.scaling.isoflop import PAPER_A, PAPER_ALPHA

PAPER_TARGET = 3.8e25


def _flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of FLOPs: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"FLOPs must be positive, got {text}")
    return value


def _weights(text: str) -> dict[str, float]:
    """``code=0.5,prose=0.5`` -> {"code": 0.5, "prose": 0.5}."""
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected domain=weight pairs, got {text!r}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe scaling",
                                     description="Scaling laws (paper section 3.2.1): sweeps, fits, forecasts.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="commands:\n" + __doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="train the runs of an IsoFLOP sweep (skips finished runs)")
    sweep.add_argument("--config", required=True, help="a scaling YAML config (configs/scaling/mini.yaml)")
    sweep.add_argument("--plan", action="store_true", help="print the runs (tokens, steps, LR) and stop")
    sweep.add_argument("--print-jobs", metavar="FILE", help="write one `recipe scaling sweep --only RUN` command "
                       "per run to FILE ('-': stdout) for a cluster, and train nothing")
    sweep.add_argument("--only", action="append", metavar="RUN_ID", help="train only this run (repeatable)")

    fit = sub.add_parser("fit", help="IsoFLOP parabolas and the compute-optimal power law")
    _source_args(fit)
    fit.add_argument("--target-flops", type=_flops, help="forecast budget (default: the config's target_flops, "
                     f"else {PAPER_TARGET:g})")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    fit.add_argument("--out", help="folder for fit.json, PNGs and TensorBoard (default: the sweep's out_dir)")
    fit.add_argument("--plots", help="folder for the PNGs (default: --out)")

    fc = sub.add_parser("forecast", help="compute-optimal tokens/params and downstream accuracy at a budget")
    fc.add_argument("--flops", type=_flops, required=True, help="the budget, e.g. 3.8e25")
    fc.add_argument("--fit", help="a fit.json written by `recipe scaling fit`")
    fc.add_argument("--alpha", type=float, help=f"exponent of D* = A C^alpha (paper: {PAPER_ALPHA})")
    fc.add_argument("--A", type=float, dest="coefficient", help=f"coefficient A (paper: {PAPER_A})")
    fc.add_argument("--paper", action="store_true", help=f"use the paper's alpha={PAPER_ALPHA}, A={PAPER_A}")
    _source_args(fc, required=False)
    fc.add_argument("--extra-points", help="json/csv of (nll, accuracy) from other (older, larger) models for "
                    "the sigmoid")
    fc.add_argument("--out", help="folder for downstream.png / forecast.json")
    fc.add_argument("--plots", help="folder for downstream.png (default: --out)")

    mix = sub.add_parser("mix", help="rank candidate data mixes by their predicted loss at a larger budget")
    mix.add_argument("--config", required=True, help="a scaling config with a `mixes:` section")
    mix.add_argument("--target-flops", type=_flops, help="budget to rank at (default: the config's target_flops)")
    mix.add_argument("--fit-only", action="store_true", help="rank from the finished runs, train nothing")
    mix.add_argument("--irreducible", type=float, default=0.0, help="irreducible loss E in L = E + B C^-b")

    probe = sub.add_parser("anneal-probe", help="anneal a checkpoint with X%% of a candidate domain vs the default")
    probe.add_argument("--ckpt", required=True, help="a full Lightning checkpoint (a sweep run's final.ckpt)")
    probe.add_argument("--candidate", required=True, help="a domain of the data, or weights: code=0.5,math=0.5")
    probe.add_argument("--fraction", type=float, default=0.3, help="share of the candidate in the annealing mix")
    probe.add_argument("--anneal-tokens", type=int, help="length of the annealing (default: 1/4 of the tokens seen)")
    probe.add_argument("--default-mix", type=_weights, help="e.g. code=0.2,prose=0.7,math=0.1 (default: the "
                       "checkpoint's mix, else the natural shares)")
    probe.add_argument("--data-dir", help="shards to anneal on (default: the checkpoint's)")
    probe.add_argument("--benchmark", help="also score cloze | arithmetic | an ARC jsonl file")
    probe.add_argument("--benchmark-domain", help="cloze items from this domain's validation documents only")
    probe.add_argument("--items", type=int, default=200, help="benchmark items")
    probe.add_argument("--out", default="runs/anneal_probe", help="folder for the two arms and anneal_probe.json")
    return parser


def _source_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--config", help="the sweep config (collects its finished runs)")
    group.add_argument("--results", help="a results.json / results.csv (or the folder holding it)")


# ---------------------------------------------------------------------------- commands


def _rows_and_out(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path, Any]:
    from recipe.scaling.plan import load_config, plan_sweep
    from recipe.scaling.sweep import load_results, write_table

    if args.config:
        config = load_config(args.config)
        return write_table(config, plan_sweep(config)), Path(config.out_dir), config
    path = Path(args.results)
    return load_results(path), (path if path.is_dir() else path.parent), None


def cmd_sweep(args: argparse.Namespace) -> int:
    from recipe.scaling.plan import describe_plan, load_config, plan_sweep
    from recipe.scaling.sweep import job_commands, run_sweep

    config = load_config(args.config)
    plan = plan_sweep(config)
    if args.plan:
        print(describe_plan(plan))
        return 0
    if args.print_jobs:
        text = "\n".join(job_commands(args.config, plan)) + "\n"
        if args.print_jobs == "-":
            sys.stdout.write(text)
        else:
            Path(args.print_jobs).write_text(text)
            print(f"{len(plan.runs)} job commands written to {args.print_jobs}; afterwards run "
                  f"`recipe scaling fit --config {args.config}`")
        return 0
    for line in plan.skipped:
        print(f"note: {line}")
    rows = run_sweep(config, plan, only=args.only)
    print(f"{len(rows)}/{len(plan.runs)} runs finished; table: {Path(config.out_dir) / 'results.csv'}")
    print(_table(rows))
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'run':<26}{'N':>12}{'tokens':>10}{'compute':>10}{'val_loss':>10}{'bench_acc':>10}"]
    for r in rows:
        loss = "nan" if r.get("val_loss") is None else f"{float(r['val_loss']):.4f}"
        acc = "" if r.get("bench_acc") in (None, "") else f"{float(r['bench_acc']):.3f}"
        lines.append(f"{r['run_id']:<26}{int(r['params']):>12,}{int(r['tokens']):>10,}{float(r['compute']):>10.3g}"
                     f"{loss:>10}{acc:>10}")
    return "\n".join(lines)


def describe_fit(summary: dict[str, Any]) -> str:
    lines = [f"{'budget':>10}{'runs':>6}{'optimal tokens':>16}{'optimal N':>14}{'loss at opt':>13}"]
    for b in summary["budgets"]:
        params = "-" if b["optimal_params"] is None else f"{b['optimal_params']:.4g}"
        lines.append(f"{b['budget']:>10.3g}{b['points']:>6}{b['optimal_tokens']:>16.4g}{params:>14}"
                     f"{b['optimal_loss']:>13.4f}")
    for budget, why in summary["unusable_budgets"].items():
        lines.append(f"unusable budget {budget}: {why}")
    for line in summary["excluded_runs"]:
        lines.append(f"excluded: {line}")
    law = summary["tokens_law"]
    ci = law["alpha_ci95"]
    ci_text = f" (95% CI {ci[0]:.3f} .. {ci[1]:.3f})" if ci else " (no CI: too few bootstrap fits)"
    lines.append(f"D*(C) = {law['A']:.4g} x C^{law['alpha']:.4f}{ci_text}   [paper: {PAPER_A} x C^{PAPER_ALPHA}]")
    if summary["params_law"]:
        p = summary["params_law"]
        ci = p["beta_ci95"]
        lines.append(f"N*(C) = {p['B']:.4g} x C^{p['beta']:.4f}"
                     + (f" (95% CI {ci[0]:.3f} .. {ci[1]:.3f})" if ci else ""))
    boot = summary["bootstrap"]
    if boot["samples"] or boot["failed"]:
        lines.append(f"bootstrap: {boot['samples']} fits, {boot['failed']} resamples without 2 usable budgets, "
                     f"{boot['budgets_dropped']} budget refits without a minimum")
    if "forecast" in summary:
        lines.append(describe_forecast(summary["forecast"]))
    return "\n".join(lines)


def describe_forecast(f: dict[str, Any]) -> str:
    text = f"at {f['compute']:.3g} FLOPs: {f['tokens']:.4g} training tokens"
    if f.get("tokens_ci"):
        text += f" (95% CI {f['tokens_ci'][0]:.3g} .. {f['tokens_ci'][1]:.3g})"
    text += f", {f['params_from_tokens']:.4g} parameters (C / 6D)"
    if f.get("params") is not None:
        text += f"; parameter law: {f['params']:.4g}"
        if f.get("params_ci"):
            text += f" (95% CI {f['params_ci'][0]:.3g} .. {f['params_ci'][1]:.3g})"
    return text


def cmd_fit(args: argparse.Namespace) -> int:
    from recipe.scaling.isoflop import fit_isoflops, fit_summary
    from recipe.scaling.plots import isoflop_figure, log_tensorboard, power_law_figure, save_png
    from recipe.files import atomic_write_text

    rows, out, config = _rows_and_out(args)
    out = Path(args.out) if args.out else out
    target = args.target_flops or (config.target_flops if config and config.target_flops else PAPER_TARGET)
    fit = fit_isoflops(rows, bootstrap=args.bootstrap)
    summary = fit_summary(fit, target)
    atomic_write_text(out / "fit.json", json.dumps(summary, indent=1, default=float))
    figures = {"scaling/isoflop": isoflop_figure(fit, rows), "scaling/power_law": power_law_figure(fit, target)}
    plots = Path(args.plots) if args.plots else out
    for tag, fig in figures.items():
        save_png(fig, plots / f"{tag.split('/')[1]}.png")
    scalars = {"scaling/alpha": fit.tokens_law.exponent, "scaling/A": fit.tokens_law.coefficient,
               "scaling/forecast_tokens": summary["forecast"]["tokens"]}
    for b in fit.budgets:
        scalars[f"scaling/optimal_tokens/{b.budget:.3g}"] = b.tokens.optimum
    log_tensorboard(out / "tb", figures, scalars)
    print(describe_fit(summary))
    print(f"written: {out / 'fit.json'}, {plots / 'isoflop.png'}, {plots / 'power_law.png'}, TensorBoard {out / 'tb'}")
    return 0


def _extra_points(path: str) -> list[tuple[float, float]]:
    from recipe.scaling.sweep import load_results

    rows = load_results(path)
    try:
        return [(float(r["nll"]), float(r["accuracy"])) for r in rows]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path}: each record needs numeric `nll` and `accuracy`") from None


def cmd_forecast(args: argparse.Namespace) -> int:
    from recipe.scaling.isoflop import PowerLaw, fit_isoflops, forecast

    rows, out, config = ([], None, None)
    if args.config or args.results:
        rows, out, config = _rows_and_out(args)
    out = Path(args.out) if args.out else out
    report: dict[str, Any] = {}
    if args.paper or args.alpha is not None or args.coefficient is not None:
        if not args.paper and (args.alpha is None or args.coefficient is None):
            raise ConfigError("give both --alpha and --A (or --paper for the paper's values)")
        law = PowerLaw(PAPER_A if args.paper else args.coefficient, PAPER_ALPHA if args.paper else args.alpha)
        report["compute_optimal"] = forecast(law, args.flops)
    elif args.fit:
        if not Path(args.fit).is_file():
            raise ConfigError(f"fit file not found: {args.fit}; write one with `recipe scaling fit`")
        saved = json.loads(Path(args.fit).read_text())
        law = PowerLaw(saved["tokens_law"]["A"], saved["tokens_law"]["alpha"])
        params = saved.get("params_law")
        report["compute_optimal"] = forecast(law, args.flops,
                                             PowerLaw(params["B"], params["beta"]) if params else None)
    elif rows:
        fit = fit_isoflops(rows)
        report["compute_optimal"] = fit.forecast(args.flops)
    else:
        raise ConfigError("give a law: --paper, --alpha/--A, --fit FIT_JSON, or --config/--results of a sweep")
    print(describe_forecast(report["compute_optimal"]))
    if rows and any(r.get("bench_nll") not in (None, "") for r in rows):
        report["downstream"] = _downstream(rows, args, out)
    if out is not None:
        from recipe.files import atomic_write_text

        atomic_write_text(out / "forecast.json", json.dumps(report, indent=1, default=float))
    return 0


def _downstream(rows: list[dict[str, Any]], args: argparse.Namespace, out: Path | None) -> dict[str, Any]:
    from recipe.scaling.downstream import compute_optimal_nll, fit_downstream
    from recipe.scaling.isoflop import fit_isoflops

    fit = fit_isoflops(rows, bootstrap=0)
    optimal = {b.budget: b.tokens.optimum for b in fit.budgets}
    budget_points = compute_optimal_nll(rows, optimal)
    accuracy_points = [(float(r["bench_nll"]), float(r["bench_acc"])) for r in rows
                       if r.get("bench_nll") not in (None, "") and r.get("bench_acc") not in (None, "")]
    if args.extra_points:
        accuracy_points += _extra_points(args.extra_points)
    chance = [float(r["bench_chance"]) for r in rows if r.get("bench_chance") not in (None, "")]
    floor = chance[0] if chance else 0.25
    result = fit_downstream(budget_points, accuracy_points, floor=floor)
    predicted = result.predict(args.flops)
    law, s = result.nll_law, result.sigmoid
    print(f"benchmark NLL(C) = {law.coefficient:.4g} x C^{law.exponent:.4f}; accuracy = sigmoid(NLL): midpoint "
          f"{s.midpoint:.3f}, slope {s.slope:.3f}, chance {s.floor:.2f}")
    print(f"at {args.flops:.3g} FLOPs: normalized NLL {predicted['nll']:.4f} -> accuracy {predicted['accuracy']:.3f}")
    if out is not None:
        from recipe.scaling.plots import downstream_figure, log_tensorboard, save_png

        fig = downstream_figure(result, args.flops)
        plots = Path(args.plots) if args.plots else out
        save_png(fig, plots / "downstream.png")
        log_tensorboard(out / "tb", {"scaling/downstream": fig},
                        {"scaling/forecast_accuracy": predicted["accuracy"], "scaling/forecast_nll": predicted["nll"]})
        print(f"written: {plots / 'downstream.png'}")
    return {"nll_law": {"coefficient": law.coefficient, "exponent": law.exponent}, "sigmoid": s.to_dict(),
            "budget_points": budget_points, "prediction": predicted}


def cmd_mix(args: argparse.Namespace) -> int:
    from recipe.scaling.mix import mix_frontiers, rank_mixes
    from recipe.scaling.plan import load_config, plan_sweep
    from recipe.scaling.plots import log_tensorboard, mix_figure, save_png
    from recipe.files import atomic_write_text
    from recipe.scaling.sweep import run_sweep, write_table

    config = load_config(args.config)
    if not config.mixes:
        raise ConfigError(f"{args.config} has no `mixes:` section (name -> domain weights) to compare")
    target = args.target_flops or config.target_flops
    if target is None:
        raise ConfigError("give --target-flops (or target_flops in the config): the budget to rank the mixes at")
    plan = plan_sweep(config)
    rows = write_table(config, plan) if args.fit_only else run_sweep(config, plan)
    frontiers, excluded = mix_frontiers(rows)
    ranking = rank_mixes(frontiers, target, args.irreducible)
    out = Path(config.out_dir)
    table = ranking.table()
    atomic_write_text(out / "mix_ranking.json", json.dumps(
        {"target": target, "ranking": table, "unusable": ranking.unusable, "excluded": excluded}, indent=1))
    fig = mix_figure(ranking)
    save_png(fig, out / "mix.png")
    log_tensorboard(out / "tb", {"scaling/mix": fig},
                    {f"scaling/mix_predicted/{row['mix']}": row["predicted_loss"] for row in table})
    print(f"{'rank':<6}{'mix':<18}{'predicted loss':>16}{'best measured':>15}{'exponent':>10}")
    for row in table:
        print(f"{row['rank']:<6}{row['mix']:<18}{row['predicted_loss']:>16.4f}{row['best_measured_loss']:>15.4f}"
              f"{row['exponent']:>10.4f}")
    for name, why in ranking.unusable.items():
        print(f"unusable mix {name}: {why}")
    for line in excluded:
        print(f"excluded: {line}")
    print(f"written: {out / 'mix_ranking.json'}, {out / 'mix.png'}")
    return 0


def cmd_anneal_probe(args: argparse.Namespace) -> int:
    from recipe.scaling.anneal_probe import anneal_probe, describe_probe, read_checkpoint

    candidate: Any = _weights(args.candidate) if "=" in args.candidate else args.candidate
    benchmark = None
    if args.benchmark:
        from recipe.scaling.downstream import build_benchmark
        from recipe.tokenizer import Tokenizer

        data_dir = args.data_dir or read_checkpoint(args.ckpt)["datamodule_hyper_parameters"]["data_dir"]
        tokenizer = Tokenizer()
        items = build_benchmark(args.benchmark, args.items, 0, data_dir, tokenizer, args.benchmark_domain)
        benchmark = (tokenizer, items)
    report = anneal_probe(args.ckpt, candidate, args.fraction, args.anneal_tokens, args.default_mix,
                          args.data_dir, benchmark, args.out)
    print(describe_probe(report))
    print(f"written: {Path(args.out) / 'anneal_probe.json'}")
    return 0


COMMANDS = {"sweep": cmd_sweep, "fit": cmd_fit, "forecast": cmd_forecast, "mix": cmd_mix,
            "anneal-probe": cmd_anneal_probe}


def main(argv: list[str]) -> int:
    """Entry point of ``recipe scaling``; user errors propagate to ``recipe.cli`` as one line."""
    args = _parser().parse_args(argv)
    return COMMANDS[args.command](args)
