"""The audit report: one self-contained HTML page per study.

Needs: the model manifest, every collected statistics table, every stage's final tables, the
resolved config.
Writes: results/<study>/report/index.html (figures embedded; provenance and per-rule run times
read from the benchmark files).
"""


rule report:
    input:
        manifest=audited_manifest(),
        stats=expand(stats_table(), prompt_set=COLLECT_SETS),
        stages=stage_outputs(),
    output:
        html=report_html(),
        config=f"{RESULTS}/report/config.json",
    params:
        cli=NEURONAUDIT,
        study=STUDY,
        stats=" ".join(f"{s}={stats_table(s)}" for s in COLLECT_SETS),
        config=config_json(config),
        benchmarks=f"{RESULTS}/benchmarks",
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("report", "report"),
    benchmark:
        benchmark_file("report", "report")
    shell:
        "echo {params.config:q} > {output.config:q} && "
        "{params.cli} report --study {params.study} --manifest {input.manifest:q} "
        "--stats {params.stats} --config-json {output.config:q} "
        "--benchmark-dir {params.benchmarks:q} --study-dir $(dirname $(dirname {output.html:q})) --out {output.html:q} > {log:q} 2>&1"
