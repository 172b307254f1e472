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
        heldout=config["prompts"]["heldout_fraction"],
        seed=config["prompts"]["split_seed"],
        limit=f"--limit {config['prompts']['limit']}" if config["prompts"]["limit"] else "",
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("prompts"),
    benchmark:
        benchmark_file("prompts")
    shell:
        "{params.cli} prepare-prompts --name {wildcards.prompt_set} --source {input.source:q} "
        "--heldout-fraction {params.heldout} --seed {params.seed} {params.limit} "
        "--out {output.table:q} > {log:q} 2>&1"
