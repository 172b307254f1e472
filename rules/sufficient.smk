"""Sufficient neuron sets (WASD): for a few prompts of each task, a minimal set of neuron
predicates that keeps the model's next token on perturbed inputs, checked on fresh perturbations
beside the top-|S| neurons of gradient × activation and of the contrastive screen, its stability,
and its control when clamped onto prompts that lack the target.

Needs: the audited model, each task's prepared prompt tables (a prompt set with answer spans, or
a behaviour's positive and negative sets), sufficient.*, judge.*.
Writes: results/<study>/sufficient/{sets,precision,control,perturbations}.parquet and summary.json.
"""


rule sufficient:
    input:
        preconditions=preconditions_json(),
        manifest=audited_manifest(),
        tables=list(sufficient_tables().values()),
    output:
        sets=stage_file("sufficient", "sets.parquet"),
        precision=stage_file("sufficient", "precision.parquet"),
        control=stage_file("sufficient", "control.parquet"),
        perturbations=stage_file("sufficient", "perturbations.parquet"),
        summary=stage_file("sufficient", "summary.json"),
    params:
        cli=NEURONAUDIT,
        tables=named_paths(sufficient_tables()),
        options=stage_options("sufficient"),
        requires=precondition_scopes(*[f"sufficient.{task}" for task in config["sufficient"]["tasks"]]),
    threads: config["threads"]
    resources:
        mem_mb=job_resource("sufficient", "mem_mb"),
        runtime=job_resource("sufficient", "runtime"),
        gpu=job_resource("sufficient", "gpu"),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("sufficient", "sufficient"),
    benchmark:
        benchmark_file("sufficient", "sufficient")
    shell:
        "{params.cli} sufficient --manifest {input.manifest:q} --tables {params.tables} "
        "--out-sets {output.sets:q} --out-precision {output.precision:q} --out-control {output.control:q} "
        "--out-perturbations {output.perturbations:q} --out-summary {output.summary:q} "
        "--threads {threads} --options {params.options:q} "
        "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"
