"""Prompt sets: load, validate, hash and split each named set.

Needs: prompts.sets (local files or hf:<id>), prompts.heldout_fraction, prompts.split_seed.
Writes: results/<study>/prompts/<set>.parquet (prompt_id, text, split, extra; content hash and
split seed in the Parquet metadata).
"""


rule prepare_prompts:
    input:
        source=prompt_source,
    output:
        table=prompt_table(),
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
        log_file("prompts"),
    benchmark:
        benchmark_file("prompts")
    shell:
        "{params.cli} prepare-prompts --name {wildcards.prompt_set} --source {input.source:q} "
        "--out {output.table:q} --options {params.options:q} > {log:q} 2>&1"
