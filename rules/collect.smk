"""Activation collection: per-neuron streaming statistics and last-token activations.

Needs: the audited model's manifest (the refusal-tuned copy when refusal.tune) and a prepared
prompt table.
Writes: results/<study>/collect/<set>.stats.parquet (count, mean, std, mean |a|, max |a|,
fraction positive per layer and neuron) and <set>.last_token.parquet (each prompt's activation
vector at its last prompt token, per layer), both with provenance in the Parquet metadata.
"""


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
