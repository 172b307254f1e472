"""Config validation, preflight checks and named paths. No tensor code lives here.

Needs: config (validated here against workflow/schemas/config.schema.yaml).
Provides: path helpers used by every rule file; wildcard constraints.
"""

import json
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from neuronaudit.config import collected_sets, config_json, preflight, resolve_path, study_name
from neuronaudit.config import validate_config
from neuronaudit.errors import NeuronAuditError

ROOT = Path(workflow.basedir)


def _fail(err):
    sys.exit(f"neuronaudit: error: {err}")


try:
    validate(config, "../workflow/schemas/config.schema.yaml")
except WorkflowError:
    try:
        validate_config(config)  # the same schema, reported as one line naming the key
    except NeuronAuditError as err:
        _fail(err)
    raise
try:
    MODEL = preflight(config, ROOT)
    COLLECT_SETS = collected_sets(config)
except NeuronAuditError as err:
    _fail(err)

STUDY = study_name(config)
RESULTS = f"results/{STUDY}"
NEURONAUDIT = f'"{sys.executable}" -m neuronaudit'
PROMPT_SETS = list(config["prompts"]["sets"])


wildcard_constraints:
    prompt_set="|".join(PROMPT_SETS),


def model_manifest():
    """The prepared (cached, loadable) copy of model.source, shared by every study."""
    return f"results/models/{MODEL.slug}/manifest.json"


def model_source_arg():
    """What prepare-model is given: embedded names and hub ids as written, paths resolved."""
    return MODEL.spec if MODEL.spec.startswith("embedded:") or MODEL.kind == "hub" else MODEL.path


def prompt_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/prompts/{prompt_set}.parquet"


def prompt_source(wildcards):
    return resolve_path(config["prompts"]["sets"][wildcards.prompt_set], ROOT)


def stats_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/collect/{prompt_set}.stats.parquet"


def last_token_table(prompt_set="{prompt_set}"):
    return f"{RESULTS}/collect/{prompt_set}.last_token.parquet"


def report_html():
    return f"{RESULTS}/report/index.html"


def log_file(stage, name="{prompt_set}"):
    return f"{RESULTS}/logs/{stage}/{name}.log"


def benchmark_file(stage, name="{prompt_set}"):
    return f"{RESULTS}/benchmarks/{stage}/{name}.tsv"


def model_args():
    m = config["model"]
    args = f"--dtype {m['dtype']} --device {m['device']} --chat-template {m['chat_template']}"
    if m["system_prompt"]:
        args += f" --system-prompt {json.dumps(m['system_prompt'])}"
    return args


def layers_arg():
    layers = config["collect"]["layers"]
    return "all" if layers is None else ",".join(str(l) for l in layers)
