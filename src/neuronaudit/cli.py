"""Command-line interface: the subcommands the workflow rules call.

Each subcommand is a thin shell over one stage function of :mod:`neuronaudit.stages`. A stage's
settings arrive as ``--options``: the JSON of its options dataclass (:mod:`neuronaudit.options`),
which the workflow builds from the validated config. Flags that several subcommands share come
from parent parsers. Bad input raises :class:`~neuronaudit.errors.NeuronAuditError`, printed as
one line ``neuronaudit: error: <message>`` with exit status 2 (a NaN or inf found while computing,
:class:`~neuronaudit.errors.NonFiniteError`, is prefixed with the subcommand: the stage). Stage
modules are imported when their subcommand runs, so ``neuronaudit --help`` and ``check-config`` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from neuronaudit import options as opts
from neuronaudit.errors import NeuronAuditError, NonFiniteError

log = logging.getLogger("neuronaudit")


def _named(items: list[str] | None, flag: str) -> dict[str, str]:
    """``NAME=PATH`` arguments as a dict; a malformed item is a one-line error."""
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise NeuronAuditError(f"{flag} {item!r} must be NAME=PATH")
        out[name] = path
    return out


def _json_arg(text: str, flag: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise NeuronAuditError(f"{flag} is not valid JSON: {err.msg}") from None


def _stage(name: str):
    """The stage module ``neuronaudit.stages.<name>``, imported when its subcommand runs."""
    return importlib.import_module(f"neuronaudit.stages.{name}")


def _options(args, cls: type[opts.StageOptions]):
    return cls.from_json(args.options)


# --- subcommands -----------------------------------------------------------------------------


def cmd_prepare_model(args) -> None:
    _stage("prepare").run_prepare_model(args.source, args.out_dir, revision=args.revision)


def cmd_prepare_prompts(args) -> None:
    _stage("prepare").run_prepare_prompts(args.name, args.source, args.out, _options(args, opts.PromptOptions))


def cmd_collect(args) -> None:
    _stage("collect").run_collect(args.manifest, args.prompts, args.out_stats, args.out_last_token,
                                  _options(args, opts.CollectOptions), threads=args.threads, shard=args.shard)


def cmd_merge_collect(args) -> None:
    if len(args.stats) != len(args.last_token):
        raise NeuronAuditError(f"--stats has {len(args.stats)} shards, --last-token {len(args.last_token)}")
    _stage("collect").run_merge_collect(args.stats, args.last_token, args.out_stats, args.out_last_token)


def cmd_tune_refusal(args) -> None:
    _stage("refusal").run_refusal_tuning(args.base_manifest, args.harmful, args.harmless, args.out_dir,
                                         _options(args, opts.TuneOptions), threads=args.threads,
                                         extra_harmless=_named(args.extra_harmless, "--extra-harmless"))


def cmd_evaluate_refusal(args) -> None:
    parts = None
    given = {w: (getattr(args, f"{w}_shards"), getattr(args, f"{w}_perplexity")) for w in ("tuned", "base")}
    if any(shards or nll for shards, nll in given.values()):
        missing = [f"--{w}-{k}" for w, (shards, nll) in given.items()
                   for k, v in (("shards", shards), ("perplexity", nll)) if not v]
        if missing:
            raise NeuronAuditError(f"evaluate-refusal joins part tables only with all of them; missing {missing}")
        parts = {w: {"shards": shards, "perplexity": nll} for w, (shards, nll) in given.items()}
    _stage("refusal").evaluate_refusal(args.manifest, args.base_manifest, args.harmful, args.harmless,
                                       args.generic, args.out_json, args.out_rollouts,
                                       _options(args, opts.RefusalEvalOptions), threads=args.threads,
                                       styled=_named(args.styled, "--styled"), parts=parts)


def cmd_evaluate_refusal_part(args) -> None:
    _stage("refusal").run_evaluation_part(args.manifest, args.base_manifest, args.which, args.harmful, args.harmless,
                                          args.generic, args.out_table, _options(args, opts.RefusalEvalOptions),
                                          threads=args.threads, styled=_named(args.styled, "--styled"),
                                          shard=args.shard)


def cmd_rollouts(args) -> None:
    interventions = args.interventions
    if interventions.lstrip().startswith("{"):
        interventions = _json_arg(interventions, "--interventions")
    if args.shard is None and args.out_fractions is None:
        raise NeuronAuditError("rollouts needs --out-fractions (or --shard, whose fractions merge-rollouts writes)")
    _stage("rollouts").run_rollouts(args.manifest, _named(args.prompts, "--prompts"), args.split, interventions,
                                    args.out_rollouts, args.out_fractions, args.out_first_horizon,
                                    _options(args, opts.RolloutOptions), threads=args.threads, shard=args.shard)


def cmd_merge_rollouts(args) -> None:
    _stage("rollouts").run_merge_rollouts(args.shards, args.out_rollouts, args.out_fractions, args.out_first_horizon)


def cmd_screen(args) -> None:
    _stage("screen").run_screen(args.behaviour, args.pos_last_token, args.neg_last_token, args.pos_prompts,
                                args.neg_prompts, args.diverse, args.out_scores, args.out_circuit,
                                _options(args, opts.ScreenOptions))


def cmd_cna(args) -> None:
    inputs = (args.manifest, args.circuit, args.harmful, args.negative, args.generic, _named(args.tasks, "--tasks"))
    if args.parts:
        _stage("cna").run_merge_cna(*inputs, args.parts, args.out_rollouts, args.out_fractions, args.out_summary,
                                    _options(args, opts.CnaOptions))
        return
    _stage("cna").run_cna(*inputs, args.out_rollouts, args.out_fractions, args.out_summary,
                          _options(args, opts.CnaOptions), threads=args.threads)


def cmd_cna_part(args) -> None:
    _stage("cna").run_cna_part(args.manifest, args.circuit, args.harmful, args.negative, args.generic,
                               _named(args.tasks, "--tasks"), args.shard, args.out_table,
                               _options(args, opts.CnaOptions), threads=args.threads)


def cmd_keystone(args) -> None:
    _stage("keystone").run_keystone(_named(args.stats, "--stats"), _named(args.last_token, "--last-token"),
                                    _named(args.prompts, "--prompts"), args.manifest, args.out_scores,
                                    args.out_curve, args.out_summary, args.out_stability,
                                    _options(args, opts.KeystoneOptions), threads=args.threads,
                                    parts=args.parts or None)


def cmd_keystone_part(args) -> None:
    _stage("keystone").run_keystone_part(_named(args.stats, "--stats"), _named(args.prompts, "--prompts"),
                                         args.manifest, args.shard, args.out_table,
                                         _options(args, opts.KeystoneOptions), threads=args.threads)


def cmd_window(args) -> None:
    _stage("window").run_window(args.manifest, _named(args.screens, "--screens"), _named(args.prompts, "--prompts"),
                                args.generic, _json_arg(args.behaviours, "--behaviours"), args.out_sweeps,
                                args.out_single_pass, args.out_window, args.out_summary,
                                _options(args, opts.WindowOptions), threads=args.threads,
                                sweep_shards=args.sweep_shards or None, sweeps_from=args.sweeps_from)


def cmd_window_sweep(args) -> None:
    _stage("window").run_window_sweep(args.manifest, _named(args.screens, "--screens"),
                                      _named(args.prompts, "--prompts"), args.generic,
                                      _json_arg(args.behaviours, "--behaviours"), args.behaviour, args.shard,
                                      args.out_sweeps, _options(args, opts.WindowOptions), threads=args.threads)


def cmd_attribution(args) -> None:
    _stage("attribution").run_attribution(args.manifest, args.window, args.sweeps, _named(args.screens, "--screens"),
                                          _named(args.prompts, "--prompts"),
                                          _json_arg(args.behaviours, "--behaviours"), args.out_scores,
                                          args.out_summary, _options(args, opts.AttributionOptions),
                                          threads=args.threads)


def cmd_sufficient(args) -> None:
    tables: dict[str, dict[str, str]] = {}
    for name, path in _named(args.tables, "--tables").items():
        task, sep, role = name.partition(":")
        if not sep or role not in ("set", "positive", "negative"):
            raise NeuronAuditError(f"--tables {name!r} must be TASK:set, TASK:positive or TASK:negative")
        tables.setdefault(task, {})[role] = path
    _stage("sufficient").run_sufficient(tables, args.manifest, args.out_sets, args.out_precision, args.out_control,
                                        args.out_perturbations, args.out_summary,
                                        _options(args, opts.SufficientOptions), threads=args.threads)


def cmd_reasoning(args) -> None:
    _stage("reasoning").run_reasoning(
        args.manifest, args.out_problems, args.out_solutions, args.out_neurons, args.out_ablation, args.out_steering,
        args.out_gate, args.out_transfer, args.out_summary, _options(args, opts.ReasoningOptions),
        problems=args.problems, screens=_named(args.screens, "--screens"), keystone=args.keystone,
        transfer_manifest=args.transfer_manifest, threads=args.threads)


def cmd_preconditions(args) -> None:
    _stage("preconditions").run_preconditions(args.manifest, _named(args.prompts, "--prompts"), args.out_json,
                                              _options(args, opts.PreconditionOptions), threads=args.threads)


def cmd_report(args) -> None:
    _stage("report").run_report(args.study, args.manifest, _named(args.stats, "--stats"), args.out,
                                config_json=args.config_json, benchmark_dir=args.benchmark_dir,
                                study_dir=args.study_dir, figures_dir=args.figures_dir,
                                config_text=args.config_text)


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
    log.info("wrote %s", build_comparison(studies, Path(args.out), title=args.title))


def cmd_headlines(args) -> None:
    from neuronaudit.report.compare import headlines_markdown

    print(headlines_markdown(Path(args.study_dir)))


def tune_search_grid(items: list[str]) -> dict[str, list]:
    """``--grid NAME=V1,V2`` items as ``{NAME: [values]}`` (each value read as YAML: ``null``, numbers)."""
    import yaml

    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name or not values:
            raise NeuronAuditError(f"--grid {item!r} must be NAME=V1,V2,... or NAME=[V1, V2, ...]")
        if values.lstrip().startswith("["):  # a YAML list of values (values that are lists themselves)
            try:
                parsed = yaml.safe_load(values)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, list):
                raise NeuronAuditError(f"--grid {item!r}: {values!r} is not a YAML list of values")
            grid[name] = parsed
        else:
            grid[name] = [_grid_value(yaml.safe_load(v)) for v in values.split(",")]
    return grid


def _grid_value(value):
    """A grid value as YAML reads it, except that a number YAML 1.1 leaves a string (``1e-3``) is a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def cmd_tune_search(args) -> None:
    from neuronaudit.config import load_config, model_source, study_name

    config = load_config(args.configfile, args.config)
    root = Path(args.root)
    study = root / "results" / study_name(config)
    base = root / "results" / "models" / model_source(config, root).slug / "manifest.json"
    tables = {k: study / "prompts" / f"{k}.parquet" for k in ("harmful", "harmless", "generic")}
    extra = {n: study / "prompts" / f"{n}.parquet" for n in config["prompts"]["sets"]
             if (study / "prompts" / f"{n}.parquet").is_file()}
    for path in (base, *tables.values()):
        if not path.is_file():
            raise NeuronAuditError(f"{str(path)!r} not found: prepare the model and prompts first "
                                   f"(snakemake --configfile ... {path.relative_to(root)})")
    sounding = config["refusal"]["validation_sounding"]
    if sounding is not None:
        sounding = (sounding, study / "prompts" / f"{sounding}.parquet")
        if not sounding[1].is_file():
            raise NeuronAuditError(f"{str(sounding[1])!r} (refusal.validation_sounding) not found: prepare the "
                                   f"prompts first (snakemake --configfile ... {sounding[1].relative_to(root)})")
    behaviour_sets = {spec[side] for spec in config["behaviours"].values() for side in ("positive", "negative")}
    behaviours = (opts.PreconditionOptions.from_config(config),
                  {n: study / "prompts" / f"{n}.parquet" for n in sorted(behaviour_sets)})
    missing = [p for p in behaviours[1].values() if not p.is_file()]
    if missing:
        raise NeuronAuditError(f"{str(missing[0])!r} (a behaviour's prompt set) not found: prepare the prompts first "
                               f"(snakemake --configfile ... {missing[0].relative_to(root)})")
    out = Path(args.out_dir) if args.out_dir else study / "tune_search"
    result = _stage("refusal").run_tune_search(
        base, tables["harmful"], tables["harmless"], tables["generic"], out, opts.TuneOptions.from_config(config),
        opts.RefusalEvalOptions.from_config(config), tune_search_grid(args.grid), threads=config["threads"],
        keep_weights=args.keep_weights, extra_harmless=extra, sounding=sounding, behaviours=behaviours)
    choice = result["choice"]
    if choice["index"] is None:
        print(f"no candidate chosen: {choice['rule']} ({out / 'search.json'})")
        return
    print(f"chosen on validation: candidate {choice['index']} {choice['recipe']} "
          f"({'meets' if choice['meets_targets'] else 'does NOT meet'} the targets): {out / 'search.json'}")
    print("\n".join(result["config_lines"]))


def cmd_publish(args) -> None:
    from neuronaudit.publish import publish

    out = publish(args.study_dir, args.out, push_to_hub=args.push_to_hub, private=not args.public)
    print(f"audit bundle: {out}" + (f" (pushed to the dataset {args.push_to_hub})" if args.push_to_hub else ""))


def cmd_gallery(args) -> None:
    from neuronaudit.publish import build_gallery

    log.info("wrote %s", build_gallery(args.bundles, args.out, title=args.title))


def cmd_diff_study(args) -> None:
    from neuronaudit.study_diff import run

    code = run(args.a, args.b, rtol=args.rtol, atol=args.atol, skip_dirs=args.skip)
    if code:
        raise SystemExit(code)  # 1: the studies differ


def cmd_estimate(args) -> None:
    from neuronaudit import estimate as E

    target = E.target_shape(args.params, args.layers, args.d_model, args.d_mlp, args.vocab, tied=args.tied_embeddings)
    manifest, _, measured = E.measured_model(args.study_dir, args.manifest)
    config, config_source = E.study_config(args.study_dir, args.config or ())
    cpu = (E.measure_cpu_gflops(manifest, measured, threads=args.threads) if args.measure_cpu
           else {"gflops": args.cpu_gflops, "given": True})
    report = E.estimate(args.study_dir, target, cpu, device=args.device, dtype=args.dtype,
                        device_tflops=args.device_tflops, bandwidth_gbs=args.device_bandwidth_gbs,
                        manifest_path=manifest, config=config, config_source=config_source, source_mb=args.source_mb)
    print(E.to_markdown(report) if args.format == "markdown" else json.dumps(report, indent=2))


def cmd_check_config(args) -> None:
    from neuronaudit.config import load_config, preflight, study_name

    config = load_config(args.configfile, overrides=args.config or [])
    preflight(config, Path(args.root))
    print(f"config {' '.join(map(str, args.configfile))} is valid (study {study_name(config)!r}, "
          f"model {config['model']['source']!r})")


# --- parser ----------------------------------------------------------------------------------


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Flag blocks shared by several subcommands."""
    manifest = argparse.ArgumentParser(add_help=False)
    manifest.add_argument("--manifest", required=True, help="manifest.json of the prepared (audited) model")
    threads = argparse.ArgumentParser(add_help=False)
    threads.add_argument("--threads", type=int, default=None, help="torch threads of this job")
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--options", required=True, help="JSON of the stage's options (built from the config)")
    behaviours = argparse.ArgumentParser(add_help=False)
    behaviours.add_argument("--screens", nargs="+", required=True, metavar="BEHAVIOUR=SCORES")
    behaviours.add_argument("--prompts", nargs="+", required=True, metavar="BEHAVIOUR=TABLE",
                            help="the prompt table each behaviour is swept on")
    behaviours.add_argument("--behaviours", required=True, help="JSON: behaviour -> {positive, negative, oracle}")
    gate = argparse.ArgumentParser(add_help=False)
    gate.add_argument("--preconditions", default=None,
                      help="preconditions.json: with on_fail stop, a failed precondition of --requires stops the stage")
    gate.add_argument("--requires", default="[]", help="JSON list of the scopes the stage reads (set:<name>, "
                                                       "behaviour:<name>, judge, window)")
    return {"manifest": manifest, "threads": threads, "options": options, "behaviours": behaviours, "gate": gate}


def _outputs(p: argparse.ArgumentParser, *names: str) -> None:
    for name in names:
        p.add_argument(f"--out-{name}", required=True)


#: The single-path inputs of each stage subcommand.
_SIMPLE_INPUTS = {
    "collect": ["--prompts"],
    "tune-refusal": ["--base-manifest", "--harmful", "--harmless", "--out-dir"],
    "evaluate-refusal": ["--base-manifest", "--harmful", "--harmless", "--generic"],
    "evaluate-refusal-part": ["--base-manifest", "--harmful", "--harmless", "--generic"],
    "screen": ["--behaviour", "--pos-last-token", "--neg-last-token", "--pos-prompts", "--neg-prompts"],
    "cna": ["--circuit", "--harmful", "--negative", "--generic"],
    "cna-part": ["--circuit", "--harmful", "--negative", "--generic"],
    "window": ["--generic"],
    "window-sweep": ["--generic", "--behaviour"],
    "attribution": ["--window", "--sweeps"],
}

_STYLED = dict(nargs="*", default=[], metavar="KIND=TABLE",
               help="prompt sets in other styles, never trained on: harmful=TABLE and/or harmless=TABLE "
                    "(refusal.styled_harmful/_harmless)")

#: The inputs of a stage subcommand that take several paths.
_LIST_INPUTS = {
    "screen": [("--diverse", dict(nargs="*", default=[], help="last-token tables of diverse prompt sets"))],
    "cna": [("--tasks", dict(nargs="+", required=True, metavar="GROUP=PATH")),
            ("--parts", dict(nargs="*", default=[], metavar="TABLE",
                             help="tables of cna-part jobs: joined instead of measuring here (no model)"))],
    "cna-part": [("--tasks", dict(nargs="+", required=True, metavar="GROUP=PATH")),
                 ("--shard", dict(type=int, required=True, help="block of cna.shard_size interventions"))],
    "preconditions": [("--prompts", dict(nargs="+", required=True, metavar="SET=TABLE"))],
    "window": [("--sweep-shards", dict(nargs="*", default=[], metavar="TABLE",
                                       help="tables of window-sweep jobs: merged instead of sweeping here")),
               ("--sweeps-from", dict(default=None, metavar="TABLE",
                                      help="a finished window's sweeps.parquet (may be --out-sweeps itself): its "
                                           "rollouts are read back, not rolled out again; the single pass, tables "
                                           "and summary are computed anew"))],
    "window-sweep": [("--shard", dict(type=int, required=True, help="block of window.shard_size candidates"))],
    "tune-refusal": [("--extra-harmless", dict(nargs="*", default=[], metavar="SET=TABLE",
                                               help="prepared tables of refusal.extra_harmless_sets"))],
    "evaluate-refusal": [
        ("--styled", _STYLED),
        *[(f"--{w}-shards", dict(nargs="*", default=[], metavar="TABLE",
                                 help=f"the {w} model's rollout shards (evaluate-refusal-part), joined"))
          for w in ("tuned", "base")],
        *[(f"--{w}-perplexity", dict(default=None, metavar="TABLE",
                                     help=f"the {w} model's perplexity part (evaluate-refusal-part without --shard)"))
          for w in ("tuned", "base")],
    ],
    "evaluate-refusal-part": [
        ("--styled", _STYLED),
        ("--which", dict(required=True, choices=["tuned", "base"], help="the model this job evaluates")),
        ("--shard", dict(type=int, default=None, help="roll out this shard of rollouts.shard_size evaluation "
                                                      "prompts; without it, the generic texts' NLLs")),
    ],
    "collect": [("--shard", dict(type=int, default=None, help="collect only this shard of collect.shard_size "
                                                             "prompts (joined by merge-collect)"))],
    "sufficient": [("--tables", dict(nargs="+", required=True, metavar="TASK:ROLE=PATH",
                                     help="each task's prompt tables: TASK:set, or TASK:positive and TASK:negative"))],
    "reasoning": [
        ("--problems", dict(default=None, help="prepared prompt table of reasoning.problem_set (none: generated)")),
        ("--screens", dict(nargs="*", default=[], metavar="BEHAVIOUR=SCORES",
                           help="screen tables whose top sets are ablated beside the critical set")),
        ("--keystone", dict(default=None, help="keystone scores table whose top set is ablated beside the "
                                               "critical set")),
        ("--transfer-manifest", dict(default=None, help="manifest.json of the second model "
                                                        "(reasoning.transfer_model)")),
    ],
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuronaudit", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    par = _parents()
    stages = {
        # name: (help, parents, outputs, handler)
        "collect": ("collect per-neuron statistics and last-token activations", ["manifest", "threads", "options"],
                    ["stats", "last-token"], cmd_collect),
        "tune-refusal": ("fine-tune a refusal-tuned reference copy of a model", ["threads", "options"], [],
                         cmd_tune_refusal),
        "evaluate-refusal": ("refusal and over-refusal rates, perplexity vs base", ["manifest", "threads", "options"],
                             ["json", "rollouts"], cmd_evaluate_refusal),
        "evaluate-refusal-part": ("one job of a sharded refusal evaluation (rollouts.shard_size): a model's "
                                  "rollouts of a prompt range, or its generic perplexity", ["manifest", "threads",
                                                                                            "options"],
                                  ["table"], cmd_evaluate_refusal_part),
        "screen": ("contrastive neuron screen of one behaviour and its circuit", ["options", "gate"],
                   ["scores", "circuit"],
                   cmd_screen),
        "cna": ("CNA circuit scaling vs random circuit and CAA baseline",
                ["manifest", "threads", "options", "gate"],
                ["rollouts", "fractions", "summary"], cmd_cna),
        "cna-part": ("one job of a sharded CNA run (cna.shard_size): a block of interventions' rollouts and "
                     "capability", ["manifest", "threads", "options", "gate"], ["table"], cmd_cna_part),
        "window": ("control-window dose sweeps, ceilings, triggers and verdicts",
                   ["manifest", "threads", "options", "behaviours", "gate"],
                   ["sweeps", "single-pass", "window", "summary"], cmd_window),
        "window-sweep": ("one sweep job of the control window: a behaviour's block of candidates (window.shard_size)",
                         ["manifest", "threads", "options", "behaviours", "gate"], ["sweeps"], cmd_window_sweep),
        "attribution": ("gradient vs forward attribution against measured control",
                        ["manifest", "threads", "options", "behaviours"], ["scores", "summary"], cmd_attribution),
        "preconditions": ("audit preconditions: tokenizer coverage, baseline behaviour, oracle, judge",
                          ["manifest", "threads", "options"], ["json"], cmd_preconditions),
        "sufficient": ("minimal sufficient neuron sets (WASD): search, checks, control",
                       ["manifest", "threads", "options", "gate"],
                       ["sets", "precision", "control", "perturbations", "summary"], cmd_sufficient),
        "reasoning": ("reasoning-critical neurons: scores, ablation, steering, gate, transfer (AdaRAS)",
                      ["manifest", "threads", "options", "gate"],
                      ["problems", "solutions", "neurons", "ablation", "steering", "gate", "transfer", "summary"],
                      cmd_reasoning),
    }
    for name, (help_, parents, outputs, handler) in stages.items():
        p = sub.add_parser(name, help=help_, parents=[par[k] for k in parents])
        for flag in _SIMPLE_INPUTS.get(name, []):
            p.add_argument(flag, required=True)
        for flag, kwargs in _LIST_INPUTS.get(name, []):
            p.add_argument(flag, **kwargs)
        _outputs(p, *outputs)
        p.set_defaults(func=handler)
    _other_subcommands(sub, par)
    return parser


def _other_subcommands(sub, par) -> None:
    p = sub.add_parser("merge-collect", help="join a prompt set's collection shards (collect --shard)")
    p.add_argument("--stats", nargs="+", required=True, help="the shards' statistics tables, in shard order")
    p.add_argument("--last-token", nargs="+", required=True, help="the shards' last-token tables, in shard order")
    _outputs(p, "stats", "last-token")
    p.set_defaults(func=cmd_merge_collect)

    p = sub.add_parser("prepare-model", help="resolve a model source and write a cached loadable copy")
    p.add_argument("--source", required=True, help="embedded:<name>, a .gguf file, a model directory or a hub id")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--revision", default=None)
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("prepare-prompts", help="load, validate, hash and split a prompt set",
                       parents=[par["options"]])
    p.add_argument("--name", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_prepare_prompts)

    p = sub.add_parser("rollouts", help="typed rollouts under named interventions",
                       parents=[par["manifest"], par["threads"], par["options"]])
    p.add_argument("--prompts", nargs="+", required=True, metavar="NAME=PATH")
    p.add_argument("--split", default="heldout", choices=["all", "discovery", "heldout"])
    p.add_argument("--interventions", required=True, help="JSON file or JSON object: name -> edits")
    p.add_argument("--out-rollouts", required=True)
    p.add_argument("--out-fractions", default=None, help="required unless --shard")
    p.add_argument("--out-first-horizon", default=None)
    p.add_argument("--shard", type=int, default=None,
                   help="roll out only this shard of rollouts.shard_size prompts (joined by merge-rollouts)")
    p.set_defaults(func=cmd_rollouts)

    p = sub.add_parser("merge-rollouts", help="join the shards of a rollout run (rollouts --shard) and compute "
                                              "its type fractions and first horizons")
    p.add_argument("--shards", nargs="+", required=True, help="the shards' rollout tables, in shard order")
    _outputs(p, "rollouts", "fractions")
    p.add_argument("--out-first-horizon", default=None)
    p.set_defaults(func=cmd_merge_rollouts)

    p = sub.add_parser("keystone", help="cross-task keystone neurons, stability and ablation curve",
                       parents=[par["manifest"], par["threads"], par["options"], par["gate"]])
    p.add_argument("--stats", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--last-token", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--prompts", nargs="+", required=True, metavar="SET=PATH")
    p.add_argument("--parts", nargs="*", default=[], metavar="TABLE",
                   help="tables of keystone-part jobs: their curve rows joined instead of measured here (no model)")
    _outputs(p, "scores", "curve", "stability", "summary")
    p.set_defaults(func=cmd_keystone)

    p = sub.add_parser("keystone-part", help="one job of a sharded keystone ablation curve (keystone.shard_size): "
                                             "a block of its conditions",
                       parents=[par["manifest"], par["threads"], par["options"], par["gate"]])
    p.add_argument("--stats", nargs="+", required=True, metavar="GROUP=PATH")
    p.add_argument("--prompts", nargs="+", required=True, metavar="SET=PATH")
    p.add_argument("--shard", type=int, required=True, help="block of keystone.shard_size ablation conditions")
    _outputs(p, "table")
    p.set_defaults(func=cmd_keystone_part)

    p = sub.add_parser("report", help="build the self-contained HTML audit report from the tables",
                       parents=[par["manifest"]])
    p.add_argument("--study", required=True)
    p.add_argument("--stats", nargs="+", default=[], metavar="NAME=PATH")
    p.add_argument("--config-json", default=None, help="the study's resolved config as JSON")
    p.add_argument("--config-text", default=None,
                   help="the resolved config as JSON text, written to --config-json (atomically) first")
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

    p = sub.add_parser("headlines", help="print a study's headline figures as a Markdown table (the report's "
                                         "summary: value with 95%% CI, published number, source file)")
    p.add_argument("study_dir", help="results/<study> folder")
    p.set_defaults(func=cmd_headlines)

    p = sub.add_parser("tune-search", help="choose the refusal-tuning recipe on the validation prompts: tune one "
                                           "candidate per grid point, score each on validation only")
    p.add_argument("--configfile", nargs="+", default=["config/config.yaml"], help="the study's config file(s)")
    p.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, as snakemake --config")
    p.add_argument("--grid", nargs="+", required=True, metavar="NAME=V1,V2",
                   help="settings searched, e.g. steps=100,200 harmless_fraction=null,0.5 "
                        "'extra_harmless_sets=[[], [harmless_sounding]]'")
    p.add_argument("--root", default=".",
                   help="the workflow folder whose results/ holds the prepared model and prompts")
    p.add_argument("--out-dir", default=None, help="default results/<study>/tune_search")
    p.add_argument("--keep-weights", action="store_true", help="keep every candidate's weights (default: recipe only)")
    p.set_defaults(func=cmd_tune_search)

    p = sub.add_parser("publish", help="write a study's audit bundle: report, tables, audit.json, audit card "
                                       "(a Hugging Face dataset folder without local paths)")
    p.add_argument("study_dir", help="results/<study> folder (its report built)")
    p.add_argument("--out", required=True, help="bundle folder (replaced)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="also upload the bundle as a Hugging Face dataset repository (needs the network and a token)")
    p.add_argument("--public", action="store_true", help="create the hub repository public (default private)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("gallery", help="one static page over many audit bundles: a row per model, headline "
                                       "figures side by side with CIs and precondition marks")
    p.add_argument("bundles", nargs="+", metavar="DIR", help="audit bundles (or results/<study> folders)")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="neuronaudit gallery")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser("diff-study", help="compare two results/<study> folders' Parquet and JSON files")
    p.add_argument("a", help="results/<study> folder")
    p.add_argument("b", help="results/<study> folder to compare with")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of float values")
    p.add_argument("--atol", type=float, default=1e-9, help="absolute tolerance of float values")
    p.add_argument("--skip", nargs="*", default=["logs", "benchmarks", "report", "weights"], metavar="DIR",
                   help="folder names not compared")
    p.set_defaults(func=cmd_diff_study)

    from neuronaudit.cluster import DTYPE_BYTES
    from neuronaudit.estimate import DEFAULT_BANDWIDTH_GBS, DEFAULT_DEVICE_TFLOPS

    p = sub.add_parser("estimate", help="expected wall time and Slurm/GPU requests per rule for a larger model, "
                                        "scaled by FLOPs from a finished study's benchmark files (an estimate)")
    p.add_argument("study_dir", help="results/<study> folder with benchmarks/")
    p.add_argument("--params", type=float, required=True, help="the target model's parameter count (e.g. 8.03e9)")
    p.add_argument("--layers", type=int, default=None, help="the target's decoder layers")
    p.add_argument("--d-model", type=int, default=None, help="the target's residual width")
    p.add_argument("--d-mlp", type=int, default=None, help="the target's MLP width (neurons per layer)")
    p.add_argument("--vocab", type=int, default=None, help="the target's vocabulary size")
    p.add_argument("--tied-embeddings", action="store_true",
                   help="the target's LM head is its embedding matrix (counted once in --params)")
    cpu = p.add_mutually_exclusive_group(required=True)
    cpu.add_argument("--cpu-gflops", type=float, default=None, help="this machine's effective GFLOP/s, as given")
    cpu.add_argument("--measure-cpu", action="store_true",
                     help="measure this machine's effective GFLOP/s: timed forwards of the measured model")
    p.add_argument("--threads", type=int, default=None, help="torch threads of --measure-cpu")
    p.add_argument("--device", default="cuda", help="the target's model.device (default cuda)")
    p.add_argument("--dtype", default="bfloat16", choices=[*DTYPE_BYTES, "auto"], help="the target's model.dtype")
    p.add_argument("--device-tflops", type=float, default=DEFAULT_DEVICE_TFLOPS,
                   help="the target device's effective TFLOP/s (default %(default)g: 30%% of an A100's 312 dense bf16)")
    p.add_argument("--device-bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS,
                   help="the target device's memory bandwidth, GB/s (default %(default)g: an A100 80 GB)")
    p.add_argument("--manifest", default=None, help="the measured model's manifest.json (default: the study's "
                                                    "tune/manifest.json, else the one prepared model)")
    p.add_argument("--config", nargs="+", default=None, metavar="FILE",
                   help="the study's config files (batch sizes of the decoding floors; default report/config.json)")
    p.add_argument("--source-mb", type=float, default=0.0,
                   help="the target's model source on disk, MB (prepare_model's request; 0: a hub id)")
    p.add_argument("--format", choices=["markdown", "json"], default="markdown")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("run", help="run the workflow, resuming after an interruption (what make study calls)",
                       description="neuronaudit run [SNAKEMAKE ARGUMENTS]: remove the lock and the temporaries a "
                                   "killed run left (the lock only when no Snakemake runs in the working "
                                   "directory), then run snakemake --rerun-incomplete with the arguments")
    p.set_defaults(func=lambda args: None)

    p = sub.add_parser("check-config", help="validate a config file and check its inputs exist")
    p.add_argument("configfile", nargs="+", help="config files, each merged over the last (as --configfile)")
    p.add_argument("--config", nargs="*", metavar="KEY=VALUE", help="overrides, as snakemake --config")
    p.add_argument("--root", default=".", help="directory relative paths are resolved against")
    p.set_defaults(func=cmd_check_config)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:2]):
        from neuronaudit.resume import run  # every further argument is Snakemake's

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if getattr(args, "preconditions", None):
            from neuronaudit.preconditions import require

            require(args.preconditions, _json_arg(args.requires, "--requires"), args.command)
        args.func(args)
    except NeuronAuditError as err:
        if isinstance(err, NonFiniteError):  # a NaN or inf found while computing: name the stage
            err.at(stage=args.command)
        print(f"neuronaudit: error: {err}", file=sys.stderr)
        return 2
    return 0
