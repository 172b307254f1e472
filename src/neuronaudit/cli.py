"""Command-line interface: the subcommands the workflow rules call.

Each subcommand is a thin shell over a library function. Bad input raises
:class:`~neuronaudit.errors.NeuronAuditError`, printed as one line
``neuronaudit: error: <message>`` with exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from pathlib import Path

from neuronaudit.errors import NeuronAuditError

log = logging.getLogger("neuronaudit")


def _layers(value: str | None):
    if value in (None, "", "all"):
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise NeuronAuditError(f"layers {value!r} must be 'all' or comma-separated integers") from None


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def cmd_prepare_model(args) -> None:
    from neuronaudit.models.loading import prepare_model

    manifest = prepare_model(args.source, args.out_dir, revision=args.revision)
    log.info("prepared %s -> %s (sha256 %s)", args.source, manifest["path"], manifest["weight_sha256"][:12])


def cmd_prepare_prompts(args) -> None:
    from neuronaudit.io import provenance, write_table
    from neuronaudit.prompts import load_prompt_set, prompt_table

    df = load_prompt_set(args.name, args.source, args.heldout_fraction, args.seed, args.limit)
    prov = provenance(
        prompt_set=args.name,
        source=args.source,
        prompt_set_hash=df.attrs["content_hash"],
        split_seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        limit=args.limit,
        n_total=df.attrs["n_total"],
    )
    write_table(prompt_table(df), args.out, prov)
    counts = df["split"].value_counts().to_dict()
    log.info("prompt set %s: %s prompts %s, hash %s", args.name, len(df), counts, df.attrs["content_hash"][:12])


def cmd_collect(args) -> None:
    from neuronaudit.interventions.capture import collect_activations
    from neuronaudit.models.loading import load_prepared
    from neuronaudit.prompts import read_prompt_table, render_prompts, uses_template

    _set_threads(args.threads)
    prompts = read_prompt_table(args.prompts, split=args.split)
    if len(prompts) == 0:
        raise NeuronAuditError(f"prompt table {args.prompts!r} has no prompts in split {args.split!r}")
    model, tokenizer, adapter, manifest = load_prepared(args.manifest, args.dtype, args.device)
    layers = adapter.check_layers(_layers(args.layers) or range(adapter.n_layers))
    texts = render_prompts(tokenizer, prompts["text"], args.chat_template, args.system_prompt)
    prov = {
        "model_id": manifest["source"],
        "model_path": manifest["path"],
        "model_type": manifest.get("model_type"),
        "weight_sha256": manifest["weight_sha256"],
        "dtype": args.dtype,
        "device": str(next(model.parameters()).device),
        "prompt_set": prompts.attrs.get("prompt_set"),
        "prompt_set_hash": prompts.attrs.get("prompt_set_hash"),
        "split": args.split,
        "n_prompts": len(prompts),
        "chat_template": args.chat_template,
        "max_length": args.max_length,
        "seed": args.seed,
        "n_layers": adapter.n_layers,
        "n_neurons": adapter.n_neurons,
        "d_model": adapter.d_model,
    }
    collect_activations(
        model, tokenizer, adapter, texts, list(prompts["prompt_id"]), args.out_stats, args.out_last_token,
        layers=layers, positions=args.positions, batch_size=args.batch_size, max_length=args.max_length,
        add_special_tokens=not uses_template(tokenizer, args.chat_template), provenance=prov,
    )


def cmd_report(args) -> None:
    from neuronaudit.models.loading import read_manifest
    from neuronaudit.report.page import build_report

    stats = {}
    for item in args.stats:
        name, _, path = item.partition("=")
        if not path:
            raise NeuronAuditError(f"--stats {item!r} must be NAME=PATH")
        stats[name] = Path(path)
    config = json.loads(Path(args.config_json).read_text()) if args.config_json else {}
    benchmarks = sorted(Path(args.benchmark_dir).rglob("*.tsv")) if args.benchmark_dir else []
    sections, headlines = ([], [])
    if args.study_dir:
        from neuronaudit.report.sections import stage_sections

        sections, headlines = stage_sections(Path(args.study_dir), Path(args.out).parent)
    build_report(args.study, stats, read_manifest(args.manifest), config, benchmarks, Path(args.out),
                 stage_sections=sections, headlines=headlines, figures_dir=args.figures_dir,
                 study_dir=args.study_dir)


def cmd_compare(args) -> None:
    from neuronaudit.report.compare import build_comparison

    studies = {}
    for item in args.studies:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise NeuronAuditError(f"study {item!r} must be NAME=DIR or DIR")
        if name in studies:
            raise NeuronAuditError(f"study name {name!r} given twice")
        studies[name] = Path(path)
    out = build_comparison(studies, Path(args.out), title=args.title)
    log.info("wrote %s", out)


def _options(text: str | None, func) -> dict:
    """``--options`` JSON: keyword arguments of ``func``; unknown names are a one-line error."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise NeuronAuditError(f"--options is not valid JSON: {err.msg}") from None
    known = inspect.signature(func).parameters
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise NeuronAuditError(f"unknown option {unknown[0]!r} for {func.__name__}; known: {sorted(known)}")
    return options


def _named(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise NeuronAuditError(f"{flag} {item!r} must be NAME=PATH")
        out[name] = path
    return out


def cmd_tune_refusal(args) -> None:
    from neuronaudit.stages.refusal import run_refusal_tuning

    _set_threads(args.threads)
    run_refusal_tuning(args.base_manifest, args.harmful, args.harmless, args.out_dir,
                       threads=args.threads, **_options(args.options, run_refusal_tuning))


def cmd_evaluate_refusal(args) -> None:
    from neuronaudit.stages.refusal import evaluate_refusal

    _set_threads(args.threads)
    evaluate_refusal(args.manifest, args.base_manifest, args.harmful, args.harmless, args.generic,
                     json.loads(args.judge) if args.judge else None, args.out_json,
                     out_rollouts=args.out_rollouts, threads=args.threads,
                     **_options(args.options, evaluate_refusal))


def cmd_rollouts(args) -> None:
    from neuronaudit.stages.rollouts import run_rollouts

    interventions = args.interventions
    if interventions.lstrip().startswith("{"):
        try:
            interventions = json.loads(interventions)
        except json.JSONDecodeError as err:
            raise NeuronAuditError(f"--interventions is not valid JSON: {err.msg}") from None
    run_rollouts(args.manifest, _named(args.prompts, "--prompts"), args.split, interventions,
                 judge_config=json.loads(args.judge) if args.judge else None,
                 out_rollouts=args.out_rollouts, out_fractions=args.out_fractions,
                 out_first_horizon=args.out_first_horizon, threads=args.threads,
                 **_options(args.options, run_rollouts))


def cmd_screen(args) -> None:
    from neuronaudit.stages.screen import run_screen

    run_screen(args.behaviour, args.pos_last_token, args.neg_last_token, args.pos_prompts,
               args.neg_prompts, args.diverse, args.out_scores, args.out_circuit,
               **_options(args.options, run_screen))


def cmd_keystone(args) -> None:
    from neuronaudit.stages.keystone import run_keystone

    _set_threads(args.threads)
    run_keystone(_named(args.stats, "--stats"), _named(args.last_token, "--last-token"),
                 _named(args.prompts, "--prompts"), args.manifest, args.out_scores, args.out_curve,
                 args.out_summary, out_stability=args.out_stability,
                 **_options(args.options, run_keystone))


def cmd_cna(args) -> None:
    from neuronaudit.stages.cna import run_cna

    run_cna(args.manifest, args.circuit, args.scores, args.harmful, args.generic,
            _named(args.tasks, "--tasks"), args.out_rollouts, args.out_fractions, args.out_summary,
            judge_config=json.loads(args.judge) if args.judge else None, threads=args.threads,
            **_options(args.options, run_cna))


def cmd_window(args) -> None:
    from neuronaudit.stages.window import run_window

    behaviours = json.loads(args.behaviours)
    run_window(args.manifest, _named(args.screens, "--screens"), _named(args.prompts, "--prompts"),
               args.generic, behaviours, args.out_sweeps, args.out_single_pass, args.out_window,
               args.out_summary, judge_config=json.loads(args.judge) if args.judge else None,
               threads=args.threads, **_options(args.options, run_window))


def cmd_attribution(args) -> None:
    from neuronaudit.stages.attribution import run_attribution

    run_attribution(args.manifest, args.window, args.sweeps, _named(args.screens, "--screens"),
                    _named(args.prompts, "--prompts"), json.loads(args.behaviours), args.out_scores,
                    args.out_summary, threads=args.threads, **_options(args.options, run_attribution))


def cmd_check_config(args) -> None:
    from neuronaudit.config import load_config, preflight

    config = load_config(args.configfile, overrides=args.config or [])
    preflight(config, Path(args.root))
    print(f"config {args.configfile} is valid (study {config['study']!r}, model {config['model']['source']!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronaudit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="resolve a model source and write a cached loadable copy")
    p.add_argument("--source", required=True, help="embedded:<name>, a .gguf file, a model directory or a hub id")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("prepare-prompts", help="load, validate, hash and split a prompt set")
    p.add_argument("--name", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--heldout-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_prompts)

    p = sub.add_parser("collect", help="collect per-neuron statistics and last-token activations")
    p.add_argument("--manifest", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--split", default="all", choices=["all", "discovery", "heldout"])
    p.add_argument("--layers", default="all")
    p.add_argument("--positions", default="prompt")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--chat-template", default="auto")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-stats", required=True)
    p.add_argument("--out-last-token", required=True)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("report", help="build the self-contained HTML audit report from the tables")
    p.add_argument("--study", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--stats", nargs="+", default=[], metavar="NAME=PATH")
    p.add_argument("--config-json", default=None)
    p.add_argument("--benchmark-dir", default=None)
    p.add_argument("--study-dir", default=None, help="results/<study>: stage tables to report")
    p.add_argument("--figures-dir", default=None,
                   help="also write every figure as <dir>/<stage>/<figure>.png with a manifest.json")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="one page setting several studies' headline figures side by side")
    p.add_argument("studies", nargs="+", metavar="[NAME=]DIR",
                   help="results/<study> folders (two or more), optionally named")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compare)

    opts = dict(default=None, help="JSON object of further keyword arguments of the stage function")

    p = sub.add_parser("tune-refusal", help="fine-tune a refusal-tuned reference copy of a model")
    p.add_argument("--base-manifest", required=True)
    p.add_argument("--harmful", required=True, help="prepared harmful prompt table")
    p.add_argument("--harmless", required=True, help="prepared style-matched harmless table")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_tune_refusal)

    p = sub.add_parser("evaluate-refusal", help="refusal and over-refusal rates, perplexity vs base")
    p.add_argument("--manifest", required=True)
    p.add_argument("--base-manifest", required=True)
    p.add_argument("--harmful", required=True)
    p.add_argument("--harmless", required=True)
    p.add_argument("--generic", required=True)
    p.add_argument("--judge", default=None, help="judge config as JSON")
    p.add_argument("--out-json", required=True)
    p.add_argument("--out-rollouts", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_evaluate_refusal)

    p = sub.add_parser("rollouts", help="typed rollouts under named interventions")
    p.add_argument("--manifest", required=True)
    p.add_argument("--prompts", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--split", default="heldout")
    p.add_argument("--interventions", required=True, help="JSON file or JSON object: name -> edits")
    p.add_argument("--judge", default=None, help="judge config as JSON")
    p.add_argument("--out-rollouts", required=True)
    p.add_argument("--out-fractions", required=True)
    p.add_argument("--out-first-horizon", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_rollouts)

    p = sub.add_parser("screen", help="contrastive neuron screen of one behaviour and its circuit")
    p.add_argument("--behaviour", required=True)
    p.add_argument("--pos-last-token", required=True)
    p.add_argument("--neg-last-token", required=True)
    p.add_argument("--pos-prompts", required=True)
    p.add_argument("--neg-prompts", required=True)
    p.add_argument("--diverse", nargs="*", default=[], help="last-token tables of diverse prompt sets")
    p.add_argument("--out-scores", required=True)
    p.add_argument("--out-circuit", required=True)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_screen)

    p = sub.add_parser("keystone", help="cross-task keystone neurons, stability and ablation curve")
    p.add_argument("--manifest", required=True)
    p.add_argument("--stats", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--last-token", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--prompts", nargs="+", required=True, metavar="SET=PATH")
    p.add_argument("--out-scores", required=True)
    p.add_argument("--out-curve", required=True)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--out-stability", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_keystone)

    p = sub.add_parser("cna", help="CNA circuit scaling vs random circuit and CAA baseline")
    p.add_argument("--manifest", required=True)
    p.add_argument("--circuit", required=True)
    p.add_argument("--scores", required=True)
    p.add_argument("--harmful", required=True)
    p.add_argument("--generic", required=True)
    p.add_argument("--tasks", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--judge", default=None, help="judge config as JSON")
    p.add_argument("--out-rollouts", required=True)
    p.add_argument("--out-fractions", required=True)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_cna)

    p = sub.add_parser("window", help="control-window dose sweeps, ceilings, triggers and verdicts")
    p.add_argument("--manifest", required=True)
    p.add_argument("--screens", nargs="+", required=True, metavar="BEHAVIOUR=SCORES")
    p.add_argument("--prompts", nargs="+", required=True, metavar="BEHAVIOUR=TABLE",
                   help="the prompt table each behaviour is swept on")
    p.add_argument("--generic", required=True)
    p.add_argument("--behaviours", required=True, help="JSON: behaviour -> {positive, negative, oracle}")
    p.add_argument("--judge", default=None)
    p.add_argument("--out-sweeps", required=True)
    p.add_argument("--out-single-pass", required=True)
    p.add_argument("--out-window", required=True)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_window)

    p = sub.add_parser("attribution", help="gradient vs forward attribution against measured control")
    p.add_argument("--manifest", required=True)
    p.add_argument("--window", required=True, help="window.parquet of the window stage")
    p.add_argument("--sweeps", required=True, help="sweeps.parquet of the window stage")
    p.add_argument("--screens", nargs="+", required=True, metavar="BEHAVIOUR=SCORES")
    p.add_argument("--prompts", nargs="+", required=True, metavar="BEHAVIOUR=TABLE")
    p.add_argument("--behaviours", required=True, help="JSON: behaviour -> spec")
    p.add_argument("--out-scores", required=True)
    p.add_argument("--out-summary", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--options", **opts)
    p.set_defaults(func=cmd_attribution)

    p = sub.add_parser("check-config", help="validate a config file and check its inputs exist")
    p.add_argument("configfile")
    p.add_argument("--config", nargs="*", metavar="KEY=VALUE", help="overrides, as snakemake --config")
    p.add_argument("--root", default=".", help="directory relative paths are resolved against")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except NeuronAuditError as err:
        print(f"neuronaudit: error: {err}", file=sys.stderr)
        return 2
    return 0
