"""Typed options of every stage, built from the validated study config.

One dataclass per stage. Every field is named as its key in the config schema
(``neuronaudit/data/config.schema.yaml``); a field whose key lies outside the stage's own section
names it in its metadata (``seed`` is the top-level ``seed``, ``model`` the ``model`` section).
No field has a default: every default lives in the schema, and :meth:`StageOptions.from_config`
takes a config that validation has already filled. The workflow passes each stage its options as
JSON (``--options``), and the stage function receives the dataclass, so a setting keeps one name
from the schema to the function.

Keys the workflow itself reads (which files exist, which jobs run) are listed in
:data:`WORKFLOW_KEYS`; a test proves that every schema key is either there or reaches a stage.
This module imports nothing heavy: the workflow imports it while it is read.
"""

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from neuronaudit.errors import NeuronAuditError

#: Schema keys read by the workflow (rules/*.smk) or by the config's checks and the commands
#: around it (``neuronaudit tune-search``) rather than by a stage.
WORKFLOW_KEYS: tuple[str, ...] = (
    "study",
    "threads",
    "model.source",
    "model.revision",
    "prompts.sets",
    "collect.sets",
    "refusal.tune",
    "refusal.validation_sounding",
    "behaviours",
    "screen.universal_sets",
    "cna.behaviour",
    "keystone.groups",
)


#: A batch size: rows per batch, or ``"auto"`` until the stage that opens the model sizes it
#: (:func:`neuronaudit.stages.common.resolve_batch_sizes`).
BatchSize = int | str
AUTO = "auto"

#: Schema keys that take ``"auto"``: every batch of the model's rows a stage runs (not
#: ``refusal.batch_size``, the optimiser's batch, which changes the tuned model).
AUTO_BATCH_KEYS: tuple[str, ...] = (
    "collect.batch_size",
    "rollouts.batch_size",
    "capability.batch_size",
    "window.row_batch_size",
    "attribution.batch_size",
    "sufficient.batch_size",
    "reasoning.batch_size",
    "reasoning.prefix_batch",
)


def key(path: str) -> Any:
    """A field read from ``path`` (dotted) instead of ``<section>.<field name>``."""
    return field(metadata={"key": path})


def _lookup(config: Mapping, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise NeuronAuditError(f"config key {path} is missing (was the config validated?)")
        value = value[part]
    return value


@dataclass(frozen=True)
class StageOptions:
    """Base of every options dataclass: built from a validated config or from its JSON."""

    section: ClassVar[str] = ""

    @classmethod
    def field_keys(cls) -> dict[str, str]:
        """Field name -> dotted schema key."""
        prefix = f"{cls.section}." if cls.section else ""
        return {f.name: f.metadata.get("key", f"{prefix}{f.name}") for f in dataclasses.fields(cls)}

    @classmethod
    def _nested(cls) -> dict[str, type]:
        hints = typing.get_type_hints(cls)
        return {
            f.name: hints[f.name]
            for f in dataclasses.fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], StageOptions)
        }

    @classmethod
    def from_config(cls, config: Mapping):
        """The options of this stage from a validated (defaults filled) study config."""
        nested = cls._nested()
        values = {}
        for name, path in cls.field_keys().items():
            values[name] = nested[name].from_config(config) if name in nested else _lookup(config, path)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Mapping):
        """Rebuild from :meth:`to_dict` output; unknown or missing names are one-line errors."""
        if not isinstance(data, Mapping):
            raise NeuronAuditError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise NeuronAuditError(f"unknown option {unknown[0]!r} for {cls.__name__}; known: {names}")
        missing = [n for n in names if n not in data]
        if missing:
            raise NeuronAuditError(f"option {missing[0]!r} of {cls.__name__} is missing")
        nested = cls._nested()
        return cls(**{n: nested[n].from_dict(data[n]) if n in nested else data[n] for n in names})

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise NeuronAuditError(f"--options is not valid JSON: {err.msg}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelOptions(StageOptions):
    """How every model-running stage loads and prompts the audited model."""

    section: ClassVar[str] = "model"
    dtype: str
    device: str
    chat_template: str
    system_prompt: str | None


@dataclass(frozen=True)
class JudgeOptions(StageOptions):
    """The rollout judge (:func:`neuronaudit.evaluation.judge.make_judge`)."""

    section: ClassVar[str] = "judge"
    kind: str
    model: str | None
    thresholds: dict

    def judge_config(self) -> dict:
        return {"kind": self.kind, "model": self.model, "thresholds": dict(self.thresholds)}


@dataclass(frozen=True)
class CapabilityOptions(StageOptions):
    """Capability checks under an intervention (CNA and keystone)."""

    section: ClassVar[str] = "capability"
    max_texts: int | None
    max_task_prompts: int | None
    max_new_tokens: int
    batch_size: BatchSize


@dataclass(frozen=True)
class PromptOptions(StageOptions):
    """prepare_prompts: the split of every prompt set."""

    section: ClassVar[str] = "prompts"
    heldout_fraction: float
    split_seed: int
    limit: int | None


@dataclass(frozen=True)
class CollectOptions(StageOptions):
    """collect_activations."""

    section: ClassVar[str] = "collect"
    model: ModelOptions = key("model")
    split: str
    layers: list | None
    positions: str
    batch_size: BatchSize
    max_length: int
    shard_size: int
    seed: int = key("seed")


@dataclass(frozen=True)
class TuneOptions(StageOptions):
    """tune_refusal: the refusal-tuned reference model."""

    section: ClassVar[str] = "refusal"
    model: ModelOptions = key("model")
    steps: int
    learning_rate: float
    batch_size: int
    harmless_fraction: float | None
    answer_max_new_tokens: int
    validation_fraction: float
    harmless_loss_weight: float
    extra_harmless_sets: list
    lora_rank: int | None
    harmless_loss: str
    decision_tokens: int
    decision_weight: float
    seed: int = key("seed")


@dataclass(frozen=True)
class RefusalEvalOptions(StageOptions):
    """evaluate_refusal: refusal and over-refusal of the tuned and the base model."""

    section: ClassVar[str] = "refusal"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    eval_max_new_tokens: int
    styled_harmful: str | None
    styled_harmless: str | None
    #: prompts per evaluation job (0: one job evaluates both models)
    shard_size: int = key("rollouts.shard_size")
    seed: int = key("seed")


@dataclass(frozen=True)
class RolloutOptions(StageOptions):
    """refusal_rollouts: typed rollouts of the unintervened audited model."""

    section: ClassVar[str] = "rollouts"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    horizons: list
    sampling: list
    temperature: float
    top_p: float
    prompts_per_set: int | None
    batch_size: BatchSize
    shard_size: int
    seed: int = key("seed")


@dataclass(frozen=True)
class ScreenOptions(StageOptions):
    """screen: the contrastive screen of one behaviour and its circuit."""

    section: ClassVar[str] = "screen"
    k: float
    skip_layers: list | None
    skip_first_fraction: float
    n_boot: int
    universal_top_n: int
    universal_fraction: float
    rank_by: str
    seed: int = key("seed")


@dataclass(frozen=True)
class CnaOptions(StageOptions):
    """cna: circuit scaling against a random circuit and CAA."""

    section: ClassVar[str] = "cna"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    capability: CapabilityOptions = key("capability")
    factors: list
    caa_layers: list
    caa_alphas: list
    quality_threshold: float
    max_new_tokens: int
    prompts: int
    #: interventions per cna_part job (0: the cna job measures every intervention)
    shard_size: int
    batch_size: BatchSize = key("rollouts.batch_size")
    seed: int = key("seed")


@dataclass(frozen=True)
class KeystoneOptions(StageOptions):
    """keystone: cross-task keystone neurons and their ablation curve."""

    section: ClassVar[str] = "keystone"
    model: ModelOptions = key("model")
    capability: CapabilityOptions = key("capability")
    k_max: int
    n_random: int
    outlier_multiple: float
    iou_k: list
    n_splits: int
    #: ablation conditions per keystone_part job (0: the keystone job measures every condition)
    shard_size: int
    seed: int = key("seed")


@dataclass(frozen=True)
class WindowOptions(StageOptions):
    """window: dose sweeps, ceilings, triggers and verdicts."""

    section: ClassVar[str] = "window"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    n_candidates: int
    n_top: int
    n_random: int
    x_grid: list
    single_pass_grid: list
    horizons: list
    n_prompts: int
    n_generic: int
    n_heldout: int
    n_boot: int
    row_batch_size: BatchSize
    max_length: int
    search: str
    shard_size: int
    seed: int = key("seed")


@dataclass(frozen=True)
class PreconditionOptions(StageOptions):
    """preconditions: what must hold for the study's figures to mean anything."""

    section: ClassVar[str] = "preconditions"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    behaviours: dict = key("behaviours")
    horizons: list = key("window.horizons")
    on_fail: str
    max_unknown_rate: float
    min_behaviour_positive: float
    max_behaviour_negative: float
    min_oracle_readability: float
    min_judge_accuracy: float
    n_prompts: int


@dataclass(frozen=True)
class SufficientOptions(StageOptions):
    """sufficient: minimal sufficient neuron sets (WASD), checked and used for control."""

    section: ClassVar[str] = "sufficient"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    behaviours: dict = key("behaviours")
    tasks: dict
    n_explained: int
    n_search: int
    n_fresh: int
    n_candidates: int
    fraction: float
    delta: float
    confidence: float
    max_size: int
    beam_width: int
    n_random: int
    n_control: int
    max_new_tokens: int
    n_boot: int
    batch_size: BatchSize
    seed: int = key("seed")


@dataclass(frozen=True)
class ReasoningOptions(StageOptions):
    """reasoning: reasoning-critical neurons, their causal test, steering, gate and transfer."""

    section: ClassVar[str] = "reasoning"
    model: ModelOptions = key("model")
    judge: JudgeOptions = key("judge")
    problem_set: str | None
    kinds: list
    difficulty: dict
    n_discovery: int
    n_validation: int
    n_heldout: int
    n_samples: int
    temperature: float
    top_p: float
    max_new_tokens: int
    layers: list | None
    eps: float
    rel_resolution: float | None
    n_top: list
    modes: list
    add_strengths: list
    blend_strengths: list
    n_ablate: int
    ablation_modes: list
    ablation_positions: str
    n_random: int
    compare_with: list
    cross_task: bool
    probe_l2: float
    probe_threshold: float | None
    transfer_model: str
    transfer_match: str
    transfer_window: float
    transfer_n_random: int
    n_boot: int
    confidence: float
    batch_size: BatchSize
    prefix_batch: BatchSize
    seed: int = key("seed")


@dataclass(frozen=True)
class AttributionOptions(StageOptions):
    """attribution: gradient vs forward scores of the window's candidates."""

    section: ClassVar[str] = "attribution"
    model: ModelOptions = key("model")
    n_prompts: int = key("window.n_prompts")
    n_boot: int = key("window.n_boot")
    batch_size: BatchSize
    n_permutations: int
    seed: int = key("seed")


@dataclass(frozen=True)
class ReportOptions(StageOptions):
    """report: the audit page."""

    section: ClassVar[str] = "report"
    title: str | None
    on_fail: str = key("preconditions.on_fail")
    min_measured_ceilings: int = key("preconditions.min_measured_ceilings")


#: Every stage's options, by the rule that runs it.
STAGE_OPTIONS: dict[str, type[StageOptions]] = {
    "prepare_prompts": PromptOptions,
    "collect_activations": CollectOptions,
    "tune_refusal": TuneOptions,
    "evaluate_refusal": RefusalEvalOptions,
    "refusal_rollouts": RolloutOptions,
    "screen": ScreenOptions,
    "cna": CnaOptions,
    "keystone": KeystoneOptions,
    "window": WindowOptions,
    "attribution": AttributionOptions,
    "sufficient": SufficientOptions,
    "reasoning": ReasoningOptions,
    "preconditions": PreconditionOptions,
    "report": ReportOptions,
}
