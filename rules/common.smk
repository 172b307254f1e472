"""Config validation, preflight checks and named paths. No tensor code lives here.

Needs: config (validated here against the package's config schema, neuronaudit/data/config.schema.yaml).
Provides: path helpers used by every rule file; wildcard constraints.
"""

import json
import shlex
import sys
import time
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from neuronaudit.cluster import job_resources, manifest_of, source_mb
from neuronaudit.config import SCHEMA_PATH, collected_sets, config_json, preflight, resolve_path, study_name, swept_set
from neuronaudit.config import collect_shard_count, evaluation_shard_count, model_source, rollout_shard_count
from neuronaudit.shards import cna_shard_count, keystone_shard_count, sweep_shard_count
from neuronaudit.config import precheck_config, transfer_source, tuned_model_key, validate_config
from neuronaudit.errors import NeuronAuditError
from neuronaudit.options import STAGE_OPTIONS

ROOT = Path(workflow.basedir)
STARTED = []  # the run's start time (onstart), to find the logs of this run's failed jobs


def _fail(err):
    sys.exit(f"neuronaudit: error: {err}")


try:
    # before validate, which prints the whole config when it fails: the raw files (repeated keys,
    # alias bombs), the merged config's size, non-finite numbers; --config strings re-read as numbers
    config.update(precheck_config(config, workflow.configfiles))
except NeuronAuditError as err:
    _fail(err)
try:
    validate(config, str(SCHEMA_PATH))
except WorkflowError:
    try:
        validate_config(config)  # the same schema, reported as one line naming the key
    except NeuronAuditError as err:
        _fail(err)
    raise
try:
    # the checks that open files run once per run, in the main process; a job of the run (a
    # cluster job, --mode remote) only resolves the model source
    MODEL = preflight(config, ROOT) if workflow.is_main_process else model_source(config, ROOT)
    COLLECT_SETS = collected_sets(config)
    TRANSFER = transfer_source(config, ROOT)
except NeuronAuditError as err:
    _fail(err)

STUDY = study_name(config)
RESULTS = f"results/{STUDY}"
# The refusal-tuned model, shared by every study that tunes the same base on the same data with the
# same recipe (its content key), as the prepared model is: results/models/<base>/tuned-<key>/.
TUNED = f"results/models/{MODEL.slug}/tuned-{tuned_model_key(config, ROOT)}" if config["refusal"]["tune"] else None
# Jobs run the package with the interpreter that runs snakemake (a checkout's .venv on a shared
# filesystem); with --sdm conda, with the python of each rule's environment (workflow/envs/).
USES_CONDA = "CONDA" in {m.name for m in workflow.deployment_settings.deployment_method}
NEURONAUDIT = "python -m neuronaudit" if USES_CONDA else f'"{sys.executable}" -m neuronaudit'
PROMPT_SETS = list(config["prompts"]["sets"])


wildcard_constraints:
    prompt_set="|".join(PROMPT_SETS),
    shard=r"\d+",
    which="tuned|base",
    behaviour="|".join(config["behaviours"]) or "NONE",


def model_manifest():
    """The prepared (cached, loadable) copy of model.source, shared by every study."""
    return f"results/models/{MODEL.slug}/manifest.json"


def model_source_arg():
    """What prepare-model is given: embedded names and hub ids as written, paths resolved."""
    return MODEL.spec if MODEL.spec.startswith("embedded:") or MODEL.kind == "hub" else MODEL.path


def prompt_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/prompts/{prompt_set}.parquet"


def styled_refusal_tables():
    """The prepared tables of refusal.styled_harmful / styled_harmless that are set, by kind."""
    names = {k: config["refusal"][f"styled_{k}"] for k in ("harmful", "harmless")}
    return {k: prompt_table(v) for k, v in names.items() if v is not None}


def styled_refusal_args():
    """--styled KIND=TABLE arguments of evaluate-refusal (quoted for the shell)."""
    return " ".join(shlex.quote(f"{k}={v}") for k, v in styled_refusal_tables().items())


def prompt_source(wildcards):
    return resolve_path(config["prompts"]["sets"][wildcards.prompt_set], ROOT)


def stats_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/collect/{prompt_set}.stats.parquet"


def last_token_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/collect/{prompt_set}.last_token.parquet"


def shard_table(what, prompt_set="{prompt_set}", shard="{shard}"):
    """One collection shard's table (collect.shard_size > 0), removed once merged."""
    return f"{RESULTS}/collect/shards/{prompt_set}.{shard}.{what}.parquet"


def collect_shards(what):
    """The shard tables of a prompt set, in shard order (their count read from the prompt file)."""

    def paths(wildcards):
        n = collect_shard_count(config, wildcards.prompt_set, ROOT)
        return [shard_table(what, wildcards.prompt_set, k) for k in range(n)]

    return paths


def refusal_rollout_shards(wildcards):
    """The refusal_rollouts jobs' tables (rollouts.shard_size > 0), in shard order (their count read
    from the harmful and harmless prompt files)."""
    n = rollout_shard_count(config, ["harmful", "harmless"], "heldout", ROOT)
    return [stage_file("refusal", f"shards/rollouts.{k}.parquet") for k in range(n)]


def refusal_evaluation_shards(which):
    """The evaluate_refusal_part tables of one model (rollouts.shard_size > 0), in shard order (their
    count read from the prompt files and, when the study tunes, the tuning's validation split)."""
    n = evaluation_shard_count(config, ROOT)
    return [stage_file("refusal", f"shards/evaluation.{which}.{k}.parquet") for k in range(n)]


def window_sweep_tables():
    """The window's sweep-job tables (window.shard_size > 0), every behaviour's blocks in order;
    none when the window job sweeps itself."""
    w = config["window"]
    n = sweep_shard_count(w["n_candidates"], w["n_random"], len(config["behaviours"]), w["shard_size"])
    return [f"{RESULTS}/window/shards/{b}.{k}.parquet" for b in config["behaviours"] for k in range(n)]


def cna_part_tables():
    """The cna_part jobs' tables (cna.shard_size > 0), in part order; their count, read from the
    config, is an upper bound on the interventions' blocks (parts past the last one are empty)."""
    c = config["cna"]
    n = cna_shard_count(c["factors"], c["caa_layers"], c["caa_alphas"], c["shard_size"])
    return [stage_file("cna", f"shards/part.{k}.parquet") for k in range(n)]


def keystone_part_tables():
    """The keystone_part jobs' tables (keystone.shard_size > 0), in part order; their count, read
    from the config, is an upper bound on the blocks of ablation conditions (parts past the last one
    are empty)."""
    k = config["keystone"]
    n = keystone_shard_count(k["k_max"], k["n_random"], k["shard_size"])
    return [stage_file("keystone", f"shards/part.{p}.parquet") for p in range(n)]


def preconditions_json():
    """The audit preconditions every analysis stage waits for (rules/preconditions.smk)."""
    return f"{RESULTS}/preconditions.json"


def report_html():
    return f"{RESULTS}/report/index.html"


def log_file(stage, name="{prompt_set}"):
    return f"{RESULTS}/logs/{stage}/{name}.log"


def benchmark_file(stage, name="{prompt_set}"):
    return f"{RESULTS}/benchmarks/{stage}/{name}.tsv"




def tuning_prompt_table(prompt_set="{prompt_set}"):
    """A training prompt set of the shared tuned model, prepared beside it (the same table as the
    study's own: same source, same split settings, both part of the tuned model's key)."""
    return f"{TUNED}/prompts/{prompt_set}.parquet"


def audited_manifest():
    """The model the study audits: the refusal-tuned copy when refusal.tune (the study's own
    tune/manifest.json, a copy of the shared tuned model's), else the prepared model."""
    return f"{RESULTS}/tune/manifest.json" if config["refusal"]["tune"] else model_manifest()


def behaviour_sets(behaviour):
    spec = config["behaviours"][behaviour]
    return spec["positive"], spec["negative"]


def screen_inputs(wildcards):
    pos, neg = behaviour_sets(wildcards.behaviour)
    return {
        "pos_last_token": last_token_table(pos),
        "neg_last_token": last_token_table(neg),
        "pos_prompts": prompt_table(pos),
        "neg_prompts": prompt_table(neg),
        "diverse": [last_token_table(s) for s in config["screen"]["universal_sets"]],
    }


def screen_table(kind, behaviour="{behaviour}"):
    return f"{RESULTS}/screen/{behaviour}.{kind}.parquet"


def stage_file(stage, name):
    return f"{RESULTS}/{stage}/{name}"




def sufficient_tables():
    """Each task's prompt tables, as ``TASK:ROLE`` -> table."""
    out = {}
    for task, spec in config["sufficient"]["tasks"].items():
        if spec.get("set") is not None:
            out[f"{task}:set"] = prompt_table(spec["set"])
        else:
            pos, neg = behaviour_sets(spec["behaviour"])
            out[f"{task}:positive"], out[f"{task}:negative"] = prompt_table(pos), prompt_table(neg)
    return out


def transfer_manifest():
    """The second model of the reasoning stage's transfer (reasoning.transfer_model): the prepared
    base model (base: what the audited model was tuned from, the audited model itself when
    refusal.tune is false), a prepared copy of another source (rules/model.smk), or None (none)."""
    spec = config["reasoning"]["transfer_model"]
    if spec == "none":
        return None
    if spec == "base" or TRANSFER.slug == MODEL.slug:
        return model_manifest()
    return f"results/models/{TRANSFER.slug}/manifest.json"


def reasoning_tables():
    """What the reasoning stage reads beside the audited model, by CLI flag: the problem set's
    prepared table, the screen and keystone tables whose top sets it ablates, the second model."""
    r = config["reasoning"]
    out = {}
    if r["problem_set"] is not None:
        out["problems"] = prompt_table(r["problem_set"])
    if "screen" in r["compare_with"]:
        out.update({f"screen:{b}": screen_table("scores", b) for b in config["behaviours"]})
    if "keystone" in r["compare_with"]:
        out["keystone"] = stage_file("keystone", "scores.parquet")
    if transfer_manifest() is not None:
        out["transfer-manifest"] = transfer_manifest()
    return out


def reasoning_inputs(wildcards):
    """The reasoning stage's named inputs (reasoning_tables, keyed without colons)."""
    return {name.replace(":", "_").replace("-", "_"): path for name, path in reasoning_tables().items()}


def reasoning_flags():
    """The CLI flags of reasoning_tables: --problems, --screens B=PATH ..., --keystone, --transfer-manifest."""
    tables = reasoning_tables()
    screens = {name.split(":", 1)[1]: path for name, path in tables.items() if name.startswith("screen:")}
    flags = [f"--{name} {path}" for name, path in tables.items() if not name.startswith("screen:")]
    if screens:
        flags.append(f"--screens {named_paths(screens)}")
    return " ".join(flags)


def stage_errors(results, since):
    """The one-line errors ("neuronaudit: error: ...") in the stage logs written since ``since``."""
    out = []
    for path in sorted(Path(results, "logs").rglob("*.log")):
        if path.stat().st_mtime >= since:
            out += [f"{line.strip()} (rule log {path})" for line in path.read_text(errors="replace").splitlines()
                    if line.startswith("neuronaudit: error:")]
    return out


def named_paths(paths):
    """``NAME=PATH`` arguments of a CLI flag."""
    return " ".join(f"{name}={path}" for name, path in paths.items())


def stage_outputs():
    """Every stage's final tables (the report reads them)."""
    out = [
        preconditions_json(),
        stage_file("refusal", "evaluation.json"),
        stage_file("refusal", "fractions.parquet"),
        stage_file("keystone", "summary.json"),
    ]
    if config["behaviours"]:
        out.append(stage_file("window", "summary.json"))
        out.append(stage_file("attribution", "summary.json"))
    out += [screen_table("circuit", b) for b in config["behaviours"]]
    if config["cna"]["behaviour"] in config["behaviours"]:
        out.append(stage_file("cna", "summary.parquet"))
    if config["sufficient"]["tasks"]:
        out.append(stage_file("sufficient", "summary.json"))
    out.append(stage_file("reasoning", "summary.json"))
    return out


def job_resource(rule_name, what, manifest="manifest", source=None):
    """One resource of a rule's jobs (mem_mb, runtime in minutes, gpu, disk_mb) for a scheduler,
    from the prepared model's manifest (the rule's input named ``manifest``) and model.device /
    model.dtype, scaled by the attempt (neuronaudit.cluster). Snakemake evaluates it once the
    manifest exists. prepare_model sizes itself from ``source`` (default: model.source) on disk."""
    source = source or MODEL

    def value(wildcards, input, attempt):
        prepared = manifest_of(getattr(input, manifest)) if manifest else None
        size = source_mb(source.path) if rule_name == "prepare_model" and source.kind != "hub" else 0.0
        return job_resources(rule_name, prepared, config["model"], attempt, source_mb=size)[what]

    return value


def precondition_scopes(*headline_keys):
    """JSON list of the precondition scopes a stage reads (set:<name>, behaviour:<name>, judge,
    window), from the keys of the headlines it writes (``{behaviour}`` filled from the wildcards);
    the stage stops before it starts on a failed one when preconditions.on_fail is stop."""
    from neuronaudit.preconditions import scopes_of

    def scopes(wildcards):
        keys = [key.format(**dict(wildcards.items())) for key in headline_keys]
        return json.dumps(sorted(set().union(*(scopes_of(key, config) for key in keys))))

    return scopes


def verbatim(text):
    """A params value passed as written: Snakemake formats params strings, so a config value
    holding braces (a regex quantifier, a template's ``{body}``) would be read as a wildcard."""
    return lambda wildcards: text


def stage_options(rule_name):
    """The JSON of a stage's options (neuronaudit.options), built from the validated config."""
    return verbatim(STAGE_OPTIONS[rule_name].from_config(config).to_json())
