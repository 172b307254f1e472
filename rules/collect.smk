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
        model=model_args(),
        layers=layers_arg(),
        split=config["collect"]["split"],
        positions=config["collect"]["positions"],
        batch_size=config["collect"]["batch_size"],
        max_length=config["collect"]["max_length"],
        seed=config["seed"],
    threads: config["threads"]
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("collect"),
    benchmark:
        benchmark_file("collect")
    shell:
        "{params.cli} collect --manifest {input.manifest:q} --prompts {input.prompts:q} "
        "{params.model} --split {params.split} --layers {params.layers} "
        "--positions {params.positions} --batch-size {params.batch_size} "
        "--max-length {params.max_length} --seed {params.seed} --threads {threads} "
        "--out-stats {output.stats:q} --out-last-token {output.last_token:q} > {log:q} 2>&1"
