"""neuronaudit: which MLP neurons of a causal LM control a behaviour, how far they steer before
the model collapses, and what kind of success steering buys.

    snakemake --cores 2                       # the default study (config/config.yaml)
    snakemake --cores 2 --configfile config/quick.yaml
    snakemake --cores 2 --config 'model={source: Qwen/Qwen2.5-0.5B-Instruct}'

Stages, one file each under rules/: model (prepare a cached loadable copy) -> prompts (validate,
hash, split) -> refusal (refusal-tuned reference model, refusal rates, typed rollouts) -> collect
(per-neuron statistics and last-token activations) -> screen (contrastive screen per behaviour,
CNA circuit scaling, keystone neurons) -> window (dose sweeps, attribution) ->
sufficient (minimal sufficient neuron sets) -> reasoning (reasoning-critical neurons: ablation,
steering with a gate, transfer) -> report.
"""

from snakemake.utils import min_version

min_version("8.20")


configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/prompts.smk"
include: "rules/refusal.smk"
include: "rules/collect.smk"
include: "rules/preconditions.smk"
include: "rules/screen.smk"
include: "rules/window.smk"
include: "rules/sufficient.smk"
include: "rules/reasoning.smk"
include: "rules/report.smk"


# cheap steps without the model run where the workflow runs, not as cluster jobs
localrules:
    all,
    prepare_prompts,
    screen,
    report,


rule all:
    default_target: True
    input:
        report_html(),


onstart:
    STARTED.append(time.time())


onerror:
    # a failed stage ends its log with one line "neuronaudit: error: ..."; show it here, so the
    # reason is on the console and not only in the job's log file
    for line in stage_errors(RESULTS, STARTED[0] if STARTED else 0.0):
        print(line, file=sys.stderr)
