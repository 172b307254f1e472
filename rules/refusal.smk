"""Refusal: a refusal-tuned reference model, its measured refusal rates, and typed rollouts.

Needs: the prepared model, the harmful / harmless / generic prompt tables, refusal.*, judge.*,
rollouts.*.
Writes: results/models/<base>/tuned-<key>/{manifest.json, recipe.json, weights/}, the refusal-tuned
model, shared by every study with the same content key (config.tuned_model_key: base model,
training data, split settings, recipe), and results/<study>/tune/{manifest.json, recipe.json}, the
study's copies of its manifest and recipe (both skipped when refusal.tune is false), results/<study>/refusal/evaluation.json (refusal and over-refusal rates on held-out
prompts, on the tuning's validation prompts and on the prompt sets written in other styles
(refusal.styled_harmful / styled_harmless), each set on its own, perplexity on general text
against the base model), and results/<study>/refusal/
{rollouts, fractions, first_horizon}.parquet: typed rollouts of the unintervened audited model.
With rollouts.shard_size > 0, one refusal_rollouts job per shard of that many prompts (temporary
tables under refusal/shards/) and a merge_refusal_rollouts job that writes the same three tables;
and the evaluation runs as evaluate_refusal_part jobs (each model's rollouts of a range of that
many evaluation prompts), an evaluate_refusal_perplexity job per model, and a
merge_refusal_evaluation job that joins them into the same evaluation.json and
evaluation_rollouts.parquet (a model judge scores its calibration sets there, on the CPU).
"""


if TUNED is not None:

    rule prepare_tuning_prompts:
        input:
            source=prompt_source,
        output:
            table=tuning_prompt_table(),
        params:
            cli=NEURONAUDIT,
            options=stage_options("prepare_prompts"),
        resources:
            mem_mb=job_resource("prepare_prompts", "mem_mb", manifest=None),
            runtime=job_resource("prepare_prompts", "runtime", manifest=None),
            gpu=job_resource("prepare_prompts", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            f"{TUNED}/logs/prompts/{{prompt_set}}.log",
        shell:
            "{params.cli} prepare-prompts --name {wildcards.prompt_set} --source {input.source:q} "
            "--out {output.table:q} --options {params.options:q} > {log:q} 2>&1"


    rule tune_refusal:
        input:
            base=model_manifest(),
            harmful=tuning_prompt_table("harmful"),
            harmless=tuning_prompt_table("harmless"),
            extra=[tuning_prompt_table(s) for s in config["refusal"]["extra_harmless_sets"]],
        output:
            manifest=f"{TUNED}/manifest.json",
            recipe=f"{TUNED}/recipe.json",
        params:
            cli=NEURONAUDIT,
            options=stage_options("tune_refusal"),
            extra=named_paths({s: tuning_prompt_table(s) for s in config["refusal"]["extra_harmless_sets"]}),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("tune_refusal", "mem_mb", manifest="base"),
            runtime=job_resource("tune_refusal", "runtime", manifest="base"),
            gpu=job_resource("tune_refusal", "gpu", manifest="base"),
            disk_mb=job_resource("tune_refusal", "disk_mb", manifest="base"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "tune"),
        benchmark:
            benchmark_file("refusal", "tune")
        shell:
            "{params.cli} tune-refusal --base-manifest {input.base:q} --harmful {input.harmful:q} "
            "--harmless {input.harmless:q} --extra-harmless {params.extra} --out-dir $(dirname {output.manifest:q}) "
            "--threads {threads} --options {params.options:q} > {log:q} 2>&1"


    rule use_tuned_model:
        input:
            manifest=f"{TUNED}/manifest.json",
            recipe=f"{TUNED}/recipe.json",
        output:
            manifest=f"{RESULTS}/tune/manifest.json",
            recipe=f"{RESULTS}/tune/recipe.json",
        resources:
            mem_mb=job_resource("use_tuned_model", "mem_mb", manifest=None),
            runtime=job_resource("use_tuned_model", "runtime", manifest=None),
            gpu=job_resource("use_tuned_model", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "use_tuned_model"),
        shell:
            "(cp {input.manifest:q} {output.manifest:q} && cp {input.recipe:q} {output.recipe:q}) > {log:q} 2>&1"


    # cheap steps where the workflow runs, not cluster jobs
    localrules:
        prepare_tuning_prompts,
        use_tuned_model,


if config["rollouts"]["shard_size"]:

    rule evaluate_refusal_part:
        input:
            manifest=audited_manifest(),
            base=model_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
            generic=prompt_table("generic"),
            styled=list(styled_refusal_tables().values()),
        output:
            table=temp(stage_file("refusal", "shards/evaluation.{which}.{shard}.parquet")),
        params:
            cli=NEURONAUDIT,
            options=stage_options("evaluate_refusal"),
            styled=styled_refusal_args(),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("evaluate_refusal_part", "mem_mb"),
            runtime=job_resource("evaluate_refusal_part", "runtime"),
            gpu=job_resource("evaluate_refusal_part", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "evaluate.{which}.{shard}"),
        benchmark:
            benchmark_file("refusal", "evaluate.{which}.{shard}")
        shell:
            "{params.cli} evaluate-refusal-part --which {wildcards.which} --shard {wildcards.shard} "
            "--manifest {input.manifest:q} --base-manifest {input.base:q} "
            "--harmful {input.harmful:q} --harmless {input.harmless:q} --generic {input.generic:q} "
            "--styled {params.styled} --out-table {output.table:q} "
            "--threads {threads} --options {params.options:q} > {log:q} 2>&1"

    rule evaluate_refusal_perplexity:
        input:
            manifest=audited_manifest(),
            base=model_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
            generic=prompt_table("generic"),
            styled=list(styled_refusal_tables().values()),
        output:
            table=temp(stage_file("refusal", "shards/perplexity.{which}.parquet")),
        params:
            cli=NEURONAUDIT,
            options=stage_options("evaluate_refusal"),
            styled=styled_refusal_args(),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("evaluate_refusal_perplexity", "mem_mb"),
            runtime=job_resource("evaluate_refusal_perplexity", "runtime"),
            gpu=job_resource("evaluate_refusal_perplexity", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "evaluate.{which}.perplexity"),
        benchmark:
            benchmark_file("refusal", "evaluate.{which}.perplexity")
        shell:
            "{params.cli} evaluate-refusal-part --which {wildcards.which} "
            "--manifest {input.manifest:q} --base-manifest {input.base:q} "
            "--harmful {input.harmful:q} --harmless {input.harmless:q} --generic {input.generic:q} "
            "--styled {params.styled} --out-table {output.table:q} "
            "--threads {threads} --options {params.options:q} > {log:q} 2>&1"

    rule merge_refusal_evaluation:
        input:
            manifest=audited_manifest(),
            base=model_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
            generic=prompt_table("generic"),
            styled=list(styled_refusal_tables().values()),
            tuned_shards=refusal_evaluation_shards("tuned"),
            base_shards=refusal_evaluation_shards("base"),
            tuned_nll=stage_file("refusal", "shards/perplexity.tuned.parquet"),
            base_nll=stage_file("refusal", "shards/perplexity.base.parquet"),
        output:
            summary=stage_file("refusal", "evaluation.json"),
            rollouts=stage_file("refusal", "evaluation_rollouts.parquet"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("evaluate_refusal"),
            styled=styled_refusal_args(),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("merge_refusal_evaluation", "mem_mb", manifest=None),
            runtime=job_resource("merge_refusal_evaluation", "runtime", manifest=None),
            gpu=job_resource("merge_refusal_evaluation", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "evaluate"),
        benchmark:
            benchmark_file("refusal", "evaluate.merge")
        shell:
            "{params.cli} evaluate-refusal --manifest {input.manifest:q} --base-manifest {input.base:q} "
            "--harmful {input.harmful:q} --harmless {input.harmless:q} --generic {input.generic:q} "
            "--styled {params.styled} --tuned-shards {input.tuned_shards:q} --base-shards {input.base_shards:q} "
            "--tuned-perplexity {input.tuned_nll:q} --base-perplexity {input.base_nll:q} "
            "--out-json {output.summary:q} --out-rollouts {output.rollouts:q} "
            "--threads {threads} --options {params.options:q} > {log:q} 2>&1"

else:

    rule evaluate_refusal:
        input:
            manifest=audited_manifest(),
            base=model_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
            generic=prompt_table("generic"),
            styled=list(styled_refusal_tables().values()),
        output:
            summary=stage_file("refusal", "evaluation.json"),
            rollouts=stage_file("refusal", "evaluation_rollouts.parquet"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("evaluate_refusal"),
            styled=styled_refusal_args(),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("evaluate_refusal", "mem_mb"),
            runtime=job_resource("evaluate_refusal", "runtime"),
            gpu=job_resource("evaluate_refusal", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "evaluate"),
        benchmark:
            benchmark_file("refusal", "evaluate")
        shell:
            "{params.cli} evaluate-refusal --manifest {input.manifest:q} --base-manifest {input.base:q} "
            "--harmful {input.harmful:q} --harmless {input.harmless:q} --generic {input.generic:q} "
            "--styled {params.styled} --out-json {output.summary:q} --out-rollouts {output.rollouts:q} "
            "--threads {threads} --options {params.options:q} > {log:q} 2>&1"


if config["rollouts"]["shard_size"]:

    rule refusal_rollouts:
        input:
            manifest=audited_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
        output:
            rollouts=temp(stage_file("refusal", "shards/rollouts.{shard}.parquet")),
        params:
            cli=NEURONAUDIT,
            interventions=json.dumps({"none": []}),
            options=stage_options("refusal_rollouts"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("refusal_rollouts", "mem_mb"),
            runtime=job_resource("refusal_rollouts", "runtime"),
            gpu=job_resource("refusal_rollouts", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "rollouts.{shard}"),
        benchmark:
            benchmark_file("refusal", "rollouts.{shard}")
        shell:
            "{params.cli} rollouts --manifest {input.manifest:q} "
            "--prompts harmful={input.harmful:q} harmless={input.harmless:q} --split heldout "
            "--interventions {params.interventions:q} --shard {wildcards.shard} "
            "--out-rollouts {output.rollouts:q} --threads {threads} "
            "--options {params.options:q} > {log:q} 2>&1"

    rule merge_refusal_rollouts:
        input:
            shards=refusal_rollout_shards,
        output:
            rollouts=stage_file("refusal", "rollouts.parquet"),
            fractions=stage_file("refusal", "fractions.parquet"),
            first_horizon=stage_file("refusal", "first_horizon.parquet"),
        params:
            cli=NEURONAUDIT,
        resources:
            mem_mb=job_resource("merge_refusal_rollouts", "mem_mb", manifest=None),
            runtime=job_resource("merge_refusal_rollouts", "runtime", manifest=None),
            gpu=job_resource("merge_refusal_rollouts", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "rollouts.merge"),
        benchmark:
            benchmark_file("refusal", "rollouts.merge")
        shell:
            "{params.cli} merge-rollouts --shards {input.shards:q} --out-rollouts {output.rollouts:q} "
            "--out-fractions {output.fractions:q} --out-first-horizon {output.first_horizon:q} > {log:q} 2>&1"

else:

    rule refusal_rollouts:
        input:
            manifest=audited_manifest(),
            harmful=prompt_table("harmful"),
            harmless=prompt_table("harmless"),
        output:
            rollouts=stage_file("refusal", "rollouts.parquet"),
            fractions=stage_file("refusal", "fractions.parquet"),
            first_horizon=stage_file("refusal", "first_horizon.parquet"),
        params:
            cli=NEURONAUDIT,
            interventions=json.dumps({"none": []}),
            options=stage_options("refusal_rollouts"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("refusal_rollouts", "mem_mb"),
            runtime=job_resource("refusal_rollouts", "runtime"),
            gpu=job_resource("refusal_rollouts", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("refusal", "rollouts"),
        benchmark:
            benchmark_file("refusal", "rollouts")
        shell:
            "{params.cli} rollouts --manifest {input.manifest:q} "
            "--prompts harmful={input.harmful:q} harmless={input.harmless:q} --split heldout "
            "--interventions {params.interventions:q} "
            "--out-rollouts {output.rollouts:q} --out-fractions {output.fractions:q} "
            "--out-first-horizon {output.first_horizon:q} --threads {threads} "
            "--options {params.options:q} > {log:q} 2>&1"
