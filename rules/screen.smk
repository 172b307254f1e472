"""Contrastive screening, CNA circuit scaling and keystone neurons.

Needs: last-token activation tables and prompt tables of every behaviour's positive and negative
sets and of the diverse / task-group sets; the audited model; screen.*, cna.*, keystone.*.
Writes: results/<study>/screen/<behaviour>.{scores,circuit}.parquet (every neuron's δ,
standardised δ, bootstrap CI, universal flag; the top-k circuit with signs),
results/<study>/cna/{rollouts,fractions,summary}.parquet (circuit scaling vs random circuit vs
CAA at each swept residual layer and strength: refusal, quality, capability; the best CNA and
CAA rows at matched quality marked) and results/<study>/keystone/{scores,curve,stability}.parquet
with summary.json.
With cna.shard_size > 0, cna_part jobs each roll out the held-out prompts under a block of that many
interventions and measure capability under each (temporary tables under cna/shards/), and a
merge_cna job writes the same three tables; with keystone.shard_size > 0, keystone_part jobs each
measure a block of that many ablation conditions (temporary tables under keystone/shards/), and a
merge_keystone job computes the scores and stability and writes the same tables and summary.
"""


rule screen:
    input:
        unpack(screen_inputs),
        preconditions=preconditions_json(),
    output:
        scores=screen_table("scores"),
        circuit=screen_table("circuit"),
    params:
        cli=NEURONAUDIT,
        options=stage_options("screen"),
        requires=precondition_scopes("screen.{behaviour}"),
    resources:
        mem_mb=job_resource("screen", "mem_mb", manifest=None),
        runtime=job_resource("screen", "runtime", manifest=None),
        gpu=job_resource("screen", "gpu", manifest=None),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("screen", "{behaviour}"),
    benchmark:
        benchmark_file("screen", "{behaviour}")
    shell:
        "{params.cli} screen --behaviour {wildcards.behaviour} "
        "--pos-last-token {input.pos_last_token:q} --neg-last-token {input.neg_last_token:q} "
        "--pos-prompts {input.pos_prompts:q} --neg-prompts {input.neg_prompts:q} "
        "--diverse {input.diverse:q} --out-scores {output.scores:q} "
        "--out-circuit {output.circuit:q} --options {params.options:q} "
        "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"


if config["cna"]["shard_size"]:

    rule cna_part:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            circuit=screen_table("circuit", config["cna"]["behaviour"]),
            harmful=prompt_table(behaviour_sets(config["cna"]["behaviour"])[0]),
            negative=prompt_table(behaviour_sets(config["cna"]["behaviour"])[1]),
            generic=prompt_table("generic"),
            knowledge=prompt_table("task_knowledge"),
            arithmetic=prompt_table("task_arithmetic"),
        output:
            table=temp(stage_file("cna", "shards/part.{shard}.parquet")),
        params:
            cli=NEURONAUDIT,
            options=stage_options("cna"),
            requires=precondition_scopes("cna"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("cna_part", "mem_mb"),
            runtime=job_resource("cna_part", "runtime"),
            gpu=job_resource("cna_part", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("cna", "part.{shard}"),
        benchmark:
            benchmark_file("cna", "part.{shard}")
        shell:
            "{params.cli} cna-part --shard {wildcards.shard} --manifest {input.manifest:q} "
            "--circuit {input.circuit:q} --harmful {input.harmful:q} --negative {input.negative:q} "
            "--generic {input.generic:q} "
            "--tasks task_knowledge={input.knowledge:q} task_arithmetic={input.arithmetic:q} "
            "--out-table {output.table:q} --threads {threads} --options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"

    rule merge_cna:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            circuit=screen_table("circuit", config["cna"]["behaviour"]),
            harmful=prompt_table(behaviour_sets(config["cna"]["behaviour"])[0]),
            negative=prompt_table(behaviour_sets(config["cna"]["behaviour"])[1]),
            generic=prompt_table("generic"),
            knowledge=prompt_table("task_knowledge"),
            arithmetic=prompt_table("task_arithmetic"),
            parts=cna_part_tables(),
        output:
            rollouts=stage_file("cna", "rollouts.parquet"),
            fractions=stage_file("cna", "fractions.parquet"),
            summary=stage_file("cna", "summary.parquet"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("cna"),
            requires=precondition_scopes("cna"),
        resources:
            mem_mb=job_resource("merge_cna", "mem_mb", manifest=None),
            runtime=job_resource("merge_cna", "runtime", manifest=None),
            gpu=job_resource("merge_cna", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("cna", "merge"),
        benchmark:
            benchmark_file("cna", "merge")
        shell:
            "{params.cli} cna --manifest {input.manifest:q} --circuit {input.circuit:q} "
            "--harmful {input.harmful:q} --negative {input.negative:q} --generic {input.generic:q} "
            "--tasks task_knowledge={input.knowledge:q} task_arithmetic={input.arithmetic:q} "
            "--parts {input.parts:q} --out-rollouts {output.rollouts:q} "
            "--out-fractions {output.fractions:q} --out-summary {output.summary:q} "
            "--options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"

else:

    rule cna:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            circuit=screen_table("circuit", config["cna"]["behaviour"]),
            harmful=prompt_table(behaviour_sets(config["cna"]["behaviour"])[0]),
            negative=prompt_table(behaviour_sets(config["cna"]["behaviour"])[1]),
            generic=prompt_table("generic"),
            knowledge=prompt_table("task_knowledge"),
            arithmetic=prompt_table("task_arithmetic"),
        output:
            rollouts=stage_file("cna", "rollouts.parquet"),
            fractions=stage_file("cna", "fractions.parquet"),
            summary=stage_file("cna", "summary.parquet"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("cna"),
            requires=precondition_scopes("cna"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("cna", "mem_mb"),
            runtime=job_resource("cna", "runtime"),
            gpu=job_resource("cna", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("cna", "cna"),
        benchmark:
            benchmark_file("cna", "cna")
        shell:
            "{params.cli} cna --manifest {input.manifest:q} --circuit {input.circuit:q} "
            "--harmful {input.harmful:q} --negative {input.negative:q} --generic {input.generic:q} "
            "--tasks task_knowledge={input.knowledge:q} task_arithmetic={input.arithmetic:q} "
            "--out-rollouts {output.rollouts:q} "
            "--out-fractions {output.fractions:q} --out-summary {output.summary:q} "
            "--threads {threads} --options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"


if config["keystone"]["shard_size"]:

    rule keystone_part:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            stats=expand(stats_table(), prompt_set=config["keystone"]["groups"]),
            prompts=expand(prompt_table(), prompt_set=config["keystone"]["groups"]),
        output:
            table=temp(stage_file("keystone", "shards/part.{shard}.parquet")),
        params:
            cli=NEURONAUDIT,
            options=stage_options("keystone"),
            requires=precondition_scopes("keystone"),
            stats=named_paths({g: stats_table(g) for g in config["keystone"]["groups"]}),
            prompts=named_paths({g: prompt_table(g) for g in config["keystone"]["groups"]}),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("keystone_part", "mem_mb"),
            runtime=job_resource("keystone_part", "runtime"),
            gpu=job_resource("keystone_part", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("keystone", "part.{shard}"),
        benchmark:
            benchmark_file("keystone", "part.{shard}")
        shell:
            "{params.cli} keystone-part --shard {wildcards.shard} --manifest {input.manifest:q} "
            "--stats {params.stats} --prompts {params.prompts} --out-table {output.table:q} "
            "--threads {threads} --options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"

    rule merge_keystone:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            stats=expand(stats_table(), prompt_set=config["keystone"]["groups"]),
            last_token=expand(last_token_table(), prompt_set=config["keystone"]["groups"]),
            prompts=expand(prompt_table(), prompt_set=config["keystone"]["groups"]),
            parts=keystone_part_tables(),
        output:
            scores=stage_file("keystone", "scores.parquet"),
            curve=stage_file("keystone", "curve.parquet"),
            stability=stage_file("keystone", "stability.parquet"),
            summary=stage_file("keystone", "summary.json"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("keystone"),
            requires=precondition_scopes("keystone"),
            stats=named_paths({g: stats_table(g) for g in config["keystone"]["groups"]}),
            last_token=named_paths({g: last_token_table(g) for g in config["keystone"]["groups"]}),
            prompts=named_paths({g: prompt_table(g) for g in config["keystone"]["groups"]}),
        resources:
            mem_mb=job_resource("merge_keystone", "mem_mb", manifest=None),
            runtime=job_resource("merge_keystone", "runtime", manifest=None),
            gpu=job_resource("merge_keystone", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("keystone", "merge"),
        benchmark:
            benchmark_file("keystone", "merge")
        shell:
            "{params.cli} keystone --manifest {input.manifest:q} --stats {params.stats} "
            "--last-token {params.last_token} --prompts {params.prompts} --parts {input.parts:q} "
            "--out-scores {output.scores:q} --out-curve {output.curve:q} "
            "--out-stability {output.stability:q} --out-summary {output.summary:q} "
            "--options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"

else:

    rule keystone:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            stats=expand(stats_table(), prompt_set=config["keystone"]["groups"]),
            last_token=expand(last_token_table(), prompt_set=config["keystone"]["groups"]),
            prompts=expand(prompt_table(), prompt_set=config["keystone"]["groups"]),
        output:
            scores=stage_file("keystone", "scores.parquet"),
            curve=stage_file("keystone", "curve.parquet"),
            stability=stage_file("keystone", "stability.parquet"),
            summary=stage_file("keystone", "summary.json"),
        params:
            cli=NEURONAUDIT,
            options=stage_options("keystone"),
            requires=precondition_scopes("keystone"),
            stats=named_paths({g: stats_table(g) for g in config["keystone"]["groups"]}),
            last_token=named_paths({g: last_token_table(g) for g in config["keystone"]["groups"]}),
            prompts=named_paths({g: prompt_table(g) for g in config["keystone"]["groups"]}),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("keystone", "mem_mb"),
            runtime=job_resource("keystone", "runtime"),
            gpu=job_resource("keystone", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("keystone", "keystone"),
        benchmark:
            benchmark_file("keystone", "keystone")
        shell:
            "{params.cli} keystone --manifest {input.manifest:q} --stats {params.stats} "
            "--last-token {params.last_token} --prompts {params.prompts} "
            "--out-scores {output.scores:q} --out-curve {output.curve:q} "
            "--out-stability {output.stability:q} --out-summary {output.summary:q} "
            "--threads {threads} --options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"
