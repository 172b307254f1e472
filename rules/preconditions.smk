"""Audit preconditions: tokenizer coverage of every prompt set, each behaviour's rate at baseline
on its positive and negative prompts with the oracle's readability, the judge's accuracy on fresh
hand labels, the chat template in use.

Needs: the audited model, every prepared prompt table, preconditions.*, judge.*.
Writes: results/<study>/preconditions.json, always; with preconditions.on_fail: stop each stage
that reads a failed precondition's scope stops with one line before it starts (its --requires),
and the stages that do not read it run.
"""


rule preconditions:
    input:
        manifest=audited_manifest(),
        prompts=expand(prompt_table(), prompt_set=PROMPT_SETS),
    output:
        json=preconditions_json(),
    params:
        cli=NEURONAUDIT,
        prompts=named_paths({s: prompt_table(s) for s in PROMPT_SETS}),
        options=stage_options("preconditions"),
    threads: config["threads"]
    resources:
        mem_mb=job_resource("preconditions", "mem_mb"),
        runtime=job_resource("preconditions", "runtime"),
        gpu=job_resource("preconditions", "gpu"),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("preconditions", "preconditions"),
    benchmark:
        benchmark_file("preconditions", "preconditions")
    shell:
        "{params.cli} preconditions --manifest {input.manifest:q} --prompts {params.prompts} "
        "--out-json {output.json:q} --threads {threads} --options {params.options:q} > {log:q} 2>&1"
