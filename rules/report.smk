"""The audit report: one self-contained HTML page per study, and the figures as files.

Needs: the model manifest, every collected statistics table, every stage's final tables, the
resolved config (passed as text; the report command writes report/config.json atomically, as
every output of every rule is written: under a temporary name, renamed when complete).
Writes: results/<study>/report/index.html (figures embedded; provenance and per-rule run times
read from the benchmark files) and results/<study>/report/figures/<stage>/<figure>.png with a
manifest.json: the same figures, marked for `snakemake --report` with one category per stage,
each figure's one-sentence caption (package data neuronaudit/report/captions/<figure>.rst, through
workflow/report/figure.rst) and the
tables behind it as labels.
"""

from neuronaudit.report.captions import rst_captions, snakemake_category, snakemake_labels


report: "../workflow/report/workflow.rst"


rule report:
    input:
        manifest=audited_manifest(),
        stats=expand(stats_table(), prompt_set=COLLECT_SETS),
        stages=stage_outputs(),
    output:
        html=report(report_html(), category="Audit page", caption="../workflow/report/page.rst"),
        figures=report(
            directory(f"{RESULTS}/report/figures"),
            patterns=["{stage}/{figure}.png"],
            category=snakemake_category,
            labels=snakemake_labels,
            caption="../workflow/report/figure.rst",
        ),
        config=f"{RESULTS}/report/config.json",
    params:
        cli=NEURONAUDIT,
        study=STUDY,
        stats=" ".join(f"{s}={stats_table(s)}" for s in COLLECT_SETS),
        config=verbatim(config_json(config)),
        benchmarks=f"{RESULTS}/benchmarks",
        captions=rst_captions(),
    resources:
        mem_mb=job_resource("report", "mem_mb", manifest=None),
        runtime=job_resource("report", "runtime", manifest=None),
        gpu=job_resource("report", "gpu", manifest=None),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("report", "report"),
    benchmark:
        benchmark_file("report", "report")
    shell:
        "{params.cli} report --study {params.study} --manifest {input.manifest:q} "
        "--stats {params.stats} --config-text {params.config:q} --config-json {output.config:q} "
        "--benchmark-dir {params.benchmarks:q} --study-dir $(dirname $(dirname {output.html:q})) "
        "--figures-dir {output.figures:q} --out {output.html:q} > {log:q} 2>&1"
