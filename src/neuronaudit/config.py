"""Study configuration: JSON Schema validation with defaults, and preflight checks.

:func:`precheck_config` comes first: it reads the raw config files (repeated keys, alias bombs;
:mod:`neuronaudit.config_files`), bounds the config's size before anything walks it, and refuses
non-finite numbers and integers beyond 64 bits, which the schema's bounds let through. The
workflow then validates ``config`` with Snakemake's ``validate`` against the package's
``data/config.schema.yaml`` (:func:`neuronaudit.resources.schema_path`); :func:`load_config`
applies the same checks and schema for the CLI (``neuronaudit check-config``). :func:`preflight`
then checks, before any job runs, what the schema cannot: the model source resolves, prompt
files exist and parse, requested layer indices and neuron counts fit the model, the device
exists, and settings that depend on each other agree. Every failure is one line naming the bad value.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import jsonschema
import yaml

from neuronaudit.config_files import check_config_size, read_config_file
from neuronaudit.errors import NeuronAuditError
from neuronaudit.evaluation.judge import make_judge
from neuronaudit.evaluation.oracles import LOGIT_ORACLES, USER_ORACLES, check_logit_pair, oracle_for
from neuronaudit.models.architectures import declaration_for
from neuronaudit.models.sources import read_model_config, resolve_source
from neuronaudit.prompts import check_prompt_file
from neuronaudit.resources import schema_path

SCHEMA_PATH = schema_path()


#: The prompt sets capability is measured on: perplexity texts and answer-accuracy task groups
#: (the keystone stage reads them among keystone.groups; the CNA rule reads them by name).
GENERIC_SET = "generic"
ACCURACY_GROUPS: tuple[str, ...] = ("task_knowledge", "task_arithmetic")


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _with_defaults(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _types(schema: dict) -> set[str]:
    """The JSON types a schema allows, its ``anyOf``/``oneOf`` branches included."""
    t = schema.get("type", [])
    types = {t} if isinstance(t, str) else set(t)
    for branch in [*schema.get("anyOf", []), *schema.get("oneOf", [])]:
        types |= _types(branch)
    return types


def _string_constants(schema: dict) -> set[str]:
    """The strings a schema allows by ``const`` or ``enum`` (``"auto"`` of a batch size)."""
    out = set()
    for branch in [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]:
        values = [branch["const"]] if "const" in branch else list(branch.get("enum", []))
        out |= {v for v in values if isinstance(v, str)}
    return out


def coerce_cli_strings(value, schema: dict | None = None):
    """Turn the strings Snakemake's ``--config`` leaves inside nested values back into the
    numbers, booleans and nulls the schema asks for.

    ``--config 'window={n_prompts: 4}'`` reaches the workflow as ``{'n_prompts': '4'}``
    (Snakemake parses nested values with YAML's string-only loader). A string is re-read as
    YAML only where the schema does not allow a string, and kept when that gives no better type,
    so validation still names the value if it is wrong.
    """
    schema = load_schema() if schema is None else schema
    types = _types(schema)
    if isinstance(value, str) and types and "string" not in types and value not in _string_constants(schema):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return value if isinstance(parsed, str) else coerce_cli_strings(parsed, schema)
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and "string" in types
            and not types & {"number", "integer"}):
        return str(value)  # a top-level --config study=123 arrives as a number
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else {})
            out[k] = coerce_cli_strings(v, sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce_cli_strings(v, schema["items"]) for v in value]
    return value


INT64_MAX = 2**63 - 1

#: Appended to every name pattern of the schema: Python's ``$`` (which jsonschema uses) also
#: matches before a final newline, so ``"quick\n"`` would pass ``^...$`` alone.
NO_FINAL_NEWLINE = "(?!\\n)"


def check_numbers(config, path: str = "") -> None:
    """Refuse NaN and infinite floats and integers beyond 64 bits anywhere in the config (YAML
    reads ``.nan`` and ``.inf`` as floats, which pass the schema's minimum and maximum)."""
    if isinstance(config, dict):
        for key, value in config.items():
            check_numbers(value, f"{path}.{key}" if path else str(key))
    elif isinstance(config, list):
        for i, value in enumerate(config):
            check_numbers(value, f"{path}.{i}")
    elif isinstance(config, float) and not math.isfinite(config):
        raise NeuronAuditError(f"config key {path}: {config} is not a finite number")
    elif isinstance(config, int) and not isinstance(config, bool) and not -INT64_MAX - 1 <= config <= INT64_MAX:
        raise NeuronAuditError(f"config key {path}: {config} does not fit in a 64-bit integer")


def precheck_config(config: dict, files=()) -> dict:
    """What must hold before the schema (or Snakemake's ``validate``, which prints the whole
    config when it fails) walks the config: each raw config file reads cleanly
    (:func:`~neuronaudit.config_files.read_config_file`), the merged config is not an alias bomb,
    and every number is finite and fits 64 bits. Returns the config with ``--config`` strings
    coerced (:func:`coerce_cli_strings`)."""
    for path in files:
        read_config_file(path)
    check_config_size(config)
    config = coerce_cli_strings(config)
    check_numbers(config)
    return config


def _branch_text(branch: dict) -> str:
    if "const" in branch:
        return repr(branch["const"])
    text = {"integer": "an integer", "number": "a number", "string": "a string"}.get(branch.get("type"), "a value")
    return f"{text} ≥ {branch['minimum']}" if "minimum" in branch else text


def _schema_message(err) -> str:
    if err.validator == "pattern":
        pattern = err.validator_value.removesuffix(NO_FINAL_NEWLINE)
        return f"{err.instance!r} does not match {pattern!r} (the whole value, no line break)"
    if err.validator in ("anyOf", "oneOf"):
        return f"{err.instance!r} is not {' or '.join(_branch_text(b) for b in err.validator_value)}"
    return err.message


def schema_default(key: str, schema: dict | None = None):
    """The schema's default of a dotted config key (``collect.batch_size``)."""
    node = schema or load_schema()
    for part in key.split("."):
        node = node["properties"][part]
    return copy.deepcopy(node["default"])


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate (and fill defaults into) a config dict; one-line error naming the key."""
    schema = schema or load_schema()
    check_config_size(config)
    check_numbers(config)
    config = copy.deepcopy(config)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        path = [str(p) for p in err.absolute_path]
        if err.validator == "required":
            missing = [k for k in err.validator_value if isinstance(err.instance, dict) and k not in err.instance]
            where = ".".join([*path, missing[0]]) if missing else ".".join(path) or "(top level)"
            raise NeuronAuditError(f"config key {where} is missing (a partial config such as config/quick.yaml "
                                   "goes after a full one: --configfile config/config.yaml config/quick.yaml)")
        where = ".".join(path) or "(top level)"
        raise NeuronAuditError(f"config key {where}: {_schema_message(err)}")
    return config


def deep_update(base: dict, override: dict) -> dict:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_config(paths: str | Path | list, overrides: list[str] | None = None) -> dict:
    """Read one or more YAML configs, each merged over the last (as ``snakemake --configfile A B``),
    then apply ``KEY=VALUE`` overrides (YAML values, as ``snakemake --config``)."""
    config: dict = {}
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        deep_update(config, read_config_file(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise NeuronAuditError(f"config override {item!r} must be KEY=VALUE")
        try:
            deep_update(config, {key: yaml.safe_load(value)})
        except yaml.YAMLError as err:
            raise NeuronAuditError(f"config override {item!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    return validate_config(precheck_config(config))


def study_name(config: dict) -> str:
    """``study`` if set, else a name derived from ``model.source``."""
    if config.get("study"):
        return config["study"]
    source = str(config["model"]["source"]).rstrip("/")
    base = source.split(":", 1)[1] if source.startswith("embedded:") else Path(source).stem or source
    if "/" in source and not Path(source).exists() and not source.startswith("embedded:"):
        base = source.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base)


def resolve_path(path: str, root: Path) -> str:
    """Relative paths in the config are relative to the workflow root."""
    if path.startswith("hf:"):
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p))


def collected_sets(config: dict) -> list[str]:
    sets = config["prompts"]["sets"]
    chosen = config["collect"]["sets"]
    if chosen is None:
        return list(sets)
    unknown = [s for s in chosen if s not in sets]
    if unknown:
        raise NeuronAuditError(
            f"config key collect.sets names unknown prompt set {unknown[0]!r}; defined sets: {sorted(sets)}"
        )
    return list(chosen)


def check_references(config: dict) -> None:
    """Every prompt set and behaviour a stage names must be defined."""
    sets = config["prompts"]["sets"]

    def need_set(key: str, name: str) -> None:
        if name not in sets:
            raise NeuronAuditError(
                f"config key {key} names unknown prompt set {name!r}; defined sets: {sorted(sets)}"
            )

    for behaviour, spec in config.get("behaviours", {}).items():
        need_set(f"behaviours.{behaviour}.positive", spec["positive"])
        need_set(f"behaviours.{behaviour}.negative", spec["negative"])
        if spec["oracle"] in USER_ORACLES + LOGIT_ORACLES:
            try:
                check_logit_pair(spec) if spec["oracle"] in LOGIT_ORACLES else oracle_for(spec)
            except NeuronAuditError as err:
                raise NeuronAuditError(f"config key behaviours.{behaviour}: {err}") from None
    for name in config["screen"]["universal_sets"]:
        need_set("screen.universal_sets", name)
    for name in config["keystone"]["groups"]:
        need_set("keystone.groups", name)
    missing = [g for g in (GENERIC_SET, *ACCURACY_GROUPS) if g not in config["keystone"]["groups"]]
    if missing:
        raise NeuronAuditError(
            f"config key keystone.groups must include {GENERIC_SET} and {' and '.join(ACCURACY_GROUPS)} (keystone "
            f"ablations are scored on them); missing: {missing}")
    cna = config["cna"]["behaviour"]
    if config.get("behaviours") and cna not in config["behaviours"]:
        raise NeuronAuditError(
            f"config key cna.behaviour names unknown behaviour {cna!r}; behaviours: {sorted(config['behaviours'])}"
        )
    for task, spec in (config.get("sufficient") or {}).get("tasks", {}).items():
        if spec.get("set") is not None:
            need_set(f"sufficient.tasks.{task}.set", spec["set"])
        elif spec.get("behaviour") not in config.get("behaviours", {}):
            raise NeuronAuditError(
                f"config key sufficient.tasks.{task}.behaviour names unknown behaviour {spec.get('behaviour')!r}; "
                f"behaviours: {sorted(config.get('behaviours', {}))}")
        try:
            from neuronaudit.methods.perturbations import PerturbationSpec

            PerturbationSpec(**{k: tuple(tuple(g) for g in v) if k == "substitutions" else tuple(v)
                                if isinstance(v, list) else v for k, v in spec.items()
                                if k in ("templates", "substitutions", "fillers", "droppable", "operations",
                                         "max_edits")})
        except NeuronAuditError as err:
            raise NeuronAuditError(f"config key sufficient.tasks.{task}: {err}") from None
    if config["refusal"]["tune"]:
        for name in ("harmful", "harmless", "generic"):
            need_set("refusal.tune (needs harmful, harmless and generic)", name)
    # sets the refusal evaluation reads (or the tuning reads already) cannot be extra training data
    evaluated = {"harmful": "harmful", "harmless": "harmless",
                 config["refusal"].get("styled_harmful"): "styled_harmful",
                 config["refusal"].get("styled_harmless"): "styled_harmless"}
    for name in config["refusal"].get("extra_harmless_sets") or []:
        need_set("refusal.extra_harmless_sets", name)
        if name in evaluated:
            raise NeuronAuditError(f"config key refusal.extra_harmless_sets names {name!r}, the refusal stage's "
                                   f"{evaluated[name]} set: it cannot be extra harmless training data")
    for key in ("styled_harmful", "styled_harmless"):
        if config["refusal"].get(key) is not None:
            need_set(f"refusal.{key}", config["refusal"][key])
    sounding = config["refusal"]["validation_sounding"]
    if sounding is not None:
        need_set("refusal.validation_sounding", sounding)
        if sounding in evaluated:
            raise NeuronAuditError(f"config key refusal.validation_sounding names {sounding!r}, the refusal "
                                   f"stage's {evaluated[sounding]} set: recipe choice cannot read an evaluated set")
    problem_set = (config.get("reasoning") or {}).get("problem_set")
    if problem_set is not None:
        need_set("reasoning.problem_set", problem_set)


def check_settings(config: dict) -> None:
    """Settings whose valid range depends on other settings (the schema bounds each alone)."""
    k = config["screen"]["k"]
    if isinstance(k, float) and k >= 1:
        raise NeuronAuditError(f"config key screen.k: {k!r} must be an integer count of neurons or a "
                               "fraction in (0, 1) of all MLP neurons")
    behaviours = config.get("behaviours") or {}
    window = config["window"]
    most = window["n_candidates"] * len(behaviours) + window["n_random"]
    if behaviours and window["n_heldout"] >= most:
        n = f"{len(behaviours)} behaviour" + ("s" if len(behaviours) > 1 else "")
        raise NeuronAuditError(
            f"config key window.n_heldout: {window['n_heldout']} would hold out every window candidate "
            f"(at most {most}: window.n_candidates {window['n_candidates']} × {n} "
            f"+ window.n_random {window['n_random']}), leaving none to fit the ceiling predictors on; "
            f"use at most {most - 1}")


def transfer_source(config: dict, root: Path):
    """The second model of the reasoning stage's transfer when it is a model source of its own
    (``reasoning.transfer_model`` other than ``base`` and ``none``), resolved as ``model.source``
    is; ``None`` otherwise."""
    spec = (config.get("reasoning") or {}).get("transfer_model", "none")
    if spec in ("base", "none"):
        return None
    if not spec.startswith("embedded:") and not Path(spec).is_absolute() and (root / spec).exists():
        spec = str(root / spec)
    return resolve_source(spec)


def check_reasoning(config: dict, root: Path = Path(".")) -> None:
    """The reasoning stage's settings that depend on each other: a difficulty for every generated
    kind, and enough distinct generated problems for the three splits."""
    r = config.get("reasoning")
    if not r:
        return
    if r["problem_set"] is None:
        missing = [k for k in r["kinds"] if k not in r["difficulty"]]
        if missing:
            raise NeuronAuditError(f"config key reasoning.difficulty: no difficulty for kind {missing[0]!r} of "
                                   f"reasoning.kinds; give one for each of {r['kinds']}")
        from neuronaudit.methods.reasoning_tasks import problem_splits

        try:
            problem_splits({"discovery": r["n_discovery"], "validation": r["n_validation"],
                            "heldout": r["n_heldout"]}, config["seed"], r["difficulty"], r["kinds"])
        except NeuronAuditError as err:
            raise NeuronAuditError(f"config key reasoning.n_discovery: {err}") from None
    if r["transfer_model"] not in ("base", "none"):
        try:
            transfer_source(config, root)
        except NeuronAuditError as err:
            raise NeuronAuditError(f"config key reasoning.transfer_model: {err}") from None


def check_device(config: dict) -> None:
    """``model.device`` exists on this machine; torch is imported only when a GPU is asked for."""
    device = config["model"]["device"]
    if device in ("cpu", "auto"):
        return
    from neuronaudit.models.loading import resolve_device

    resolve_device(device)


def check_model_size(config: dict, arch: dict) -> None:
    """Layer indices and neuron counts fit the model (when its config tells its size)."""
    source = config["model"]["source"]
    layers = config["collect"]["layers"]
    n_layers = arch.get("n_layers")
    if layers and n_layers:
        for layer in layers:
            if not -n_layers <= layer < n_layers:
                raise NeuronAuditError(
                    f"config key collect.layers: layer index {layer} is out of range for "
                    f"{source!r} with {n_layers} layers (valid: 0..{n_layers - 1})"
                )
    reasoning = config.get("reasoning") or {}
    if n_layers:
        for layer in reasoning.get("layers") or []:
            if not -n_layers <= layer < n_layers:
                raise NeuronAuditError(
                    f"config key reasoning.layers: layer index {layer} is out of range for "
                    f"{source!r} with {n_layers} layers (valid: 0..{n_layers - 1})"
                )
    n_neurons = arch.get("n_neurons")
    if not (n_layers and n_neurons):
        return
    total = n_layers * n_neurons
    if reasoning:
        scored = len(set(reasoning.get("layers") or range(n_layers)))
        most = max([*reasoning["n_top"], reasoning["n_ablate"]])
        if most * (1 + reasoning["n_random"]) > scored * n_neurons:
            key = "reasoning.n_ablate" if reasoning["n_ablate"] >= max(reasoning["n_top"]) else "reasoning.n_top"
            raise NeuronAuditError(
                f"config key {key}: {most} neurons and reasoning.n_random {reasoning['n_random']} random sets of as "
                f"many need {most * (1 + reasoning['n_random'])} distinct neurons, more than the {scored * n_neurons} "
                f"of the {scored} scored layers of {source!r}")
    for key, value in (("screen.k", config["screen"]["k"]), ("keystone.k_max", config["keystone"]["k_max"])):
        if isinstance(value, int) and value > total:
            raise NeuronAuditError(
                f"config key {key}: {value} neurons is more than the {total} MLP neurons of {source!r} "
                f"({n_layers} layers × {n_neurons})"
            )


def _split_size(config: dict, prompt_set: str, split: str, root: Path, setting: str) -> int:
    """Prompts of a set's ``split`` as prepare_prompts splits and limits it, read from its local
    file (``setting`` names the shard size that needs it: a hub prompt set cannot be sharded)."""
    from neuronaudit.prompts import load_prompt_set

    p = config["prompts"]
    source = p["sets"][prompt_set]
    if str(source).startswith("hf:"):
        raise NeuronAuditError(f"{setting} needs local prompt files; prompt set {prompt_set!r} is {source!r}")
    df = load_prompt_set(prompt_set, resolve_path(source, root), p["heldout_fraction"], p["split_seed"], p["limit"])
    return len(df) if split == "all" else int((df["split"] == split).sum())


def collect_shard_count(config: dict, prompt_set: str, root: Path) -> int:
    """Collection shards of a prompt set: its collected split in shards of ``collect.shard_size``
    prompts."""
    from neuronaudit.shards import n_shards

    n = _split_size(config, prompt_set, config["collect"]["split"], root, "collect.shard_size")
    return n_shards(n, config["collect"]["shard_size"])


def rollout_shard_count(config: dict, prompt_sets, split: str, root: Path) -> int:
    """Rollout shards of ``rollouts.shard_size`` prompts over ``prompt_sets`` (each set's ``split``
    prompts, the first ``rollouts.prompts_per_set`` of them, one set after another)."""
    from neuronaudit.shards import n_shards

    limit = config["rollouts"]["prompts_per_set"]
    sizes = [_split_size(config, name, split, root, "rollouts.shard_size") for name in prompt_sets]
    return n_shards(sum(n if limit is None else min(n, int(limit)) for n in sizes), config["rollouts"]["shard_size"])


def evaluation_shard_count(config: dict, root: Path) -> int:
    """Rollout shards per model of a sharded refusal evaluation (``rollouts.shard_size`` prompts
    each) over what it rolls out, set after set: the held-out harmful and harmless prompts, the
    styled sets (every prompt) and, when the study tunes its reference model, the tuning's
    validation prompts (the pairs :func:`~neuronaudit.prompts.validation_mask` draws from the
    discovery split, as the tuning does)."""
    from neuronaudit.prompts import load_prompt_set, validation_mask
    from neuronaudit.shards import n_shards

    setting = "rollouts.shard_size"
    n = sum(_split_size(config, name, "heldout", root, setting) for name in ("harmful", "harmless"))
    r = config["refusal"]
    n += sum(_split_size(config, r[f"styled_{kind}"], "all", root, setting)
             for kind in ("harmful", "harmless") if r[f"styled_{kind}"] is not None)
    if r["tune"]:
        p = config["prompts"]
        for name in ("harmful", "harmless"):
            df = load_prompt_set(name, resolve_path(p["sets"][name], root), p["heldout_fraction"], p["split_seed"],
                                 p["limit"])
            discovery = df[df["split"] == "discovery"]
            n += int(validation_mask(discovery, r["validation_fraction"], config["seed"]).sum())
    return n_shards(n, config["rollouts"]["shard_size"])


def model_source(config: dict, root: Path):
    """``model.source`` resolved (relative paths against ``root``), without the preflight's checks:
    what a job of a run needs once the run has checked its inputs."""
    source = config["model"]["source"]
    if not source.startswith("embedded:") and not Path(source).is_absolute() and (root / source).exists():
        source = str(root / source)
    return resolve_source(source)


def tuned_model_key(config: dict, root: Path) -> str:
    """The content key of the refusal-tuned model, what it is made of: the base model (its
    ``model.source`` resolved, as prepared, and ``model.revision``), the bytes of each training prompt
    set's source file (harmful, harmless, ``refusal.extra_harmless_sets``; an ``hf:`` source by its
    name), the split settings (``prompts.heldout_fraction``, ``split_seed``, ``limit``) and the recipe
    (the tuning's options: every training setting, the model options and the seed). The first 16 hex
    digits of the SHA-256 of those; two studies with the same key share one tuned model under
    ``results/models/<base>/tuned-<key>/``, as they share the prepared base model. Settings that only
    read the tuned model (its evaluation, the window, ...) are not part of it."""
    import hashlib

    from neuronaudit.options import PromptOptions, TuneOptions

    data = {}
    for name in ["harmful", "harmless", *config["refusal"]["extra_harmless_sets"]]:
        source = resolve_path(config["prompts"]["sets"][name], root)
        path = Path(source)
        data[name] = (hashlib.sha256(path.read_bytes()).hexdigest()
                      if not source.startswith("hf:") and path.is_file() else source)
    payload = {
        "base": {"slug": model_source(config, root).slug, "revision": config["model"].get("revision")},
        "data": data,
        "split": PromptOptions.from_config(config).to_dict(),
        "recipe": TuneOptions.from_config(config).to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preflight(config: dict, root: Path):
    """Check inputs before any job runs: model source, prompt files, layer indices, neuron counts,
    device, settings that depend on each other.

    Returns the resolved :class:`~neuronaudit.models.sources.ModelSource`.
    """
    resolved = model_source(config, root)
    collected_sets(config)
    check_references(config)
    check_settings(config)
    check_reasoning(config, root)
    make_judge(config["judge"])  # a bad judge configuration fails before any generation
    for name, path in config["prompts"]["sets"].items():
        check_prompt_file(name, resolve_path(path, root))
    arch = read_model_config(resolved)
    if arch.get("model_type") and resolved.kind == "local":
        declaration_for(arch["model_type"])
    check_model_size(config, arch)
    check_device(config)
    return resolved


def config_json(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


SWEEP_DIRECTION = {
    # behaviour oracle -> the prompt set swept: refusal is pushed off the harmful prompts that
    # show it; a mode switch is pushed onto the prompts that lack it
    "refusal": "positive",
    "operator": "negative",
    "format": "negative",
    "regex": "negative",
    "exact": "negative",
    "logit_pair": "negative",
}


def swept_set(spec: Mapping) -> str:
    """The prompt set a behaviour's dose sweep runs on."""
    return spec[SWEEP_DIRECTION[spec["oracle"]]]
