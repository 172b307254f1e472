"""Activation collection: per-neuron streaming statistics and last-token activations.

Needs: the audited model's manifest (the refusal-tuned copy when refusal.tune) and a prepared
prompt table.
Writes: results/<study>/collect/<set>.stats.parquet (count, mean, std, mean |a|, max |a|,
fraction positive per layer and neuron) and <set>.last_token.parquet (each prompt's activation
vector at its last prompt token, per layer), both with provenance in the Parquet metadata.
With collect.shard_size > 0, one job per shard of that many prompts (temporary tables under
collect/shards/) and a merge job per set that writes the same two tables.
"""


if config["collect"]["shard_size"]:

    rule collect_activations:
        input:
            manifest=audited_manifest(),
            prompts=prompt_table(),
        output:
            stats=temp(shard_table("stats")),
            last_token=temp(shard_table("last_token")),
        params:
            cli=NEURONAUDIT,
            options=stage_options("collect_activations"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("collect_activations", "mem_mb"),
            runtime=job_resource("collect_activations", "runtime"),
            gpu=job_resource("collect_activations", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("collect", "{prompt_set}.{shard}"),
        benchmark:
            benchmark_file("collect", "{prompt_set}.{shard}")
        shell:
            "{params.cli} collect --manifest {input.manifest:q} --prompts {input.prompts:q} --shard {wildcards.shard} "
            "--out-stats {output.stats:q} --out-last-token {output.last_token:q} --threads {threads} "
            "--options {params.options:q} > {log:q} 2>&1"

    rule merge_activations:
        input:
            stats=collect_shards("stats"),
            last_token=collect_shards("last_token"),
        output:
            stats=stats_table(),
            last_token=last_token_table(),
        params:
            cli=NEURONAUDIT,
        resources:
            mem_mb=job_resource("merge_activations", "mem_mb", manifest=None),
            runtime=job_resource("merge_activations", "runtime", manifest=None),
            gpu=job_resource("merge_activations", "gpu", manifest=None),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("collect", "{prompt_set}.merge"),
        benchmark:
            benchmark_file("collect", "{prompt_set}.merge")
        shell:
            "{params.cli} merge-collect --stats {input.stats:q} --last-token {input.last_token:q} "
            "--out-stats {output.stats:q} --out-last-token {output.last_token:q} > {log:q} 2>&1"

else:

    rule collect_activations:
        input:
            manifest=audited_manifest(),
            prompts=prompt_table(),
        output:
            stats=stats_table(),
            last_token=last_token_table(),
        params:
            cli=NEURONAUDIT,
            options=stage_options("collect_activations"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("collect_activations", "mem_mb"),
            runtime=job_resource("collect_activations", "runtime"),
            gpu=job_resource("collect_activations", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("collect"),
        benchmark:
            benchmark_file("collect")
        shell:
            "{params.cli} collect --manifest {input.manifest:q} --prompts {input.prompts:q} "
            "--out-stats {output.stats:q} --out-last-token {output.last_token:q} --threads {threads} "
            "--options {params.options:q} > {log:q} 2>&1"
