"""Prepare the model: a cached, loadable copy of model.source (and of the reasoning stage's
second model when reasoning.transfer_model names a source of its own).

Needs: model.source (embedded:<name>, .gguf file, model directory or hub id), reasoning.transfer_model.
Writes: results/models/<slug>/manifest.json (path, architecture, weight SHA-256) and, for GGUF
sources, the dequantised safetensors copy beside it (done once; about 15 s for SmolLM2-135M).
"""


rule prepare_model:
    output:
        manifest=model_manifest(),
    params:
        cli=NEURONAUDIT,
        source=model_source_arg(),
        revision=config["model"]["revision"] or "main",
    resources:
        mem_mb=job_resource("prepare_model", "mem_mb", manifest=None),
        runtime=job_resource("prepare_model", "runtime", manifest=None),
        gpu=job_resource("prepare_model", "gpu", manifest=None),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        f"results/models/{MODEL.slug}/prepare_model.log",
    benchmark:
        f"results/models/{MODEL.slug}/prepare_model.benchmark.tsv"
    shell:
        "{params.cli} prepare-model --source {params.source:q} --revision {params.revision:q} "
        "--out-dir $(dirname {output.manifest:q}) > {log:q} 2>&1"


if TRANSFER is not None and TRANSFER.slug != MODEL.slug:

    rule prepare_transfer_model:
        output:
            manifest=f"results/models/{TRANSFER.slug}/manifest.json",
        params:
            cli=NEURONAUDIT,
            source=TRANSFER.spec if TRANSFER.spec.startswith("embedded:") or TRANSFER.kind == "hub" else TRANSFER.path,
            revision="main",
        resources:
            mem_mb=job_resource("prepare_model", "mem_mb", manifest=None, source=TRANSFER),
            runtime=job_resource("prepare_model", "runtime", manifest=None, source=TRANSFER),
            gpu=job_resource("prepare_model", "gpu", manifest=None, source=TRANSFER),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            f"results/models/{TRANSFER.slug}/prepare_model.log",
        benchmark:
            f"results/models/{TRANSFER.slug}/prepare_model.benchmark.tsv"
        shell:
            "{params.cli} prepare-model --source {params.source:q} --revision {params.revision:q} "
            "--out-dir $(dirname {output.manifest:q}) > {log:q} 2>&1"
