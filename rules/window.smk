"""The control-window law: dose sweeps, measured and predicted collapse ceilings, triggers,
verdicts on held-out neurons with bootstrap error bars.

Needs: the audited model, every behaviour's screen table, the prompt table each behaviour is
swept on (refusal: harmful prompts; mode switches: the prompts lacking the behaviour), generic
prompts, window.*, judge.*.
With window.shard_size > 0, each behaviour's candidates are swept in blocks of that many by
window_sweep jobs (temporary tables under window/shards/), which the window job merges.
Writes: results/<study>/window/{sweeps, single_pass, window}.parquet and summary.json (held-out
MAE with CIs, verdict accuracy vs the majority baseline, failure modes, refusal pivots, how the
ceilings and verdicts move with the collapse thresholds ×0.75 / ×1.25), and
results/<study>/attribution/{scores.parquet, summary.json}: gradient vs forward scores of the
same neurons against their measured control.
"""


if config["window"]["shard_size"]:

    rule window_sweep:
        input:
            preconditions=preconditions_json(),
            manifest=audited_manifest(),
            screens=[screen_table("scores", b) for b in config["behaviours"]],
            prompts=lambda w: prompt_table(swept_set(config["behaviours"][w.behaviour])),
            generic=prompt_table("generic"),
        output:
            sweeps=temp(f"{RESULTS}/window/shards/{{behaviour}}.{{shard}}.parquet"),
        params:
            cli=NEURONAUDIT,
            screens=named_paths({b: screen_table("scores", b) for b in config["behaviours"]}),
            behaviours=verbatim(json.dumps(config["behaviours"])),
            options=stage_options("window"),
            requires=precondition_scopes("window"),
        threads: config["threads"]
        resources:
            mem_mb=job_resource("window_sweep", "mem_mb"),
            runtime=job_resource("window_sweep", "runtime"),
            gpu=job_resource("window_sweep", "gpu"),
        conda:
            "../workflow/envs/neuronaudit.yaml"
        log:
            log_file("window", "sweep.{behaviour}.{shard}"),
        benchmark:
            benchmark_file("window", "sweep.{behaviour}.{shard}")
        shell:
            "{params.cli} window-sweep --manifest {input.manifest:q} --screens {params.screens} "
            "--prompts {wildcards.behaviour}={input.prompts:q} --generic {input.generic:q} "
            "--behaviours {params.behaviours:q} --behaviour {wildcards.behaviour} --shard {wildcards.shard} "
            "--out-sweeps {output.sweeps:q} --threads {threads} --options {params.options:q} "
            "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"


rule window:
    input:
        preconditions=preconditions_json(),
        manifest=audited_manifest(),
        screens=[screen_table("scores", b) for b in config["behaviours"]],
        prompts=[prompt_table(swept_set(spec)) for spec in config["behaviours"].values()],
        generic=prompt_table("generic"),
        sweep_shards=window_sweep_tables(),
    output:
        sweeps=stage_file("window", "sweeps.parquet"),
        single_pass=stage_file("window", "single_pass.parquet"),
        window=stage_file("window", "window.parquet"),
        summary=stage_file("window", "summary.json"),
    params:
        cli=NEURONAUDIT,
        screens=named_paths({b: screen_table("scores", b) for b in config["behaviours"]}),
        prompts=named_paths({b: prompt_table(swept_set(s)) for b, s in config["behaviours"].items()}),
        behaviours=verbatim(json.dumps(config["behaviours"])),
        options=stage_options("window"),
        requires=precondition_scopes("window"),
    threads: config["threads"]
    resources:
        mem_mb=job_resource("window", "mem_mb"),
        runtime=job_resource("window", "runtime"),
        gpu=job_resource("window", "gpu"),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("window", "window"),
    benchmark:
        benchmark_file("window", "window")
    shell:
        "{params.cli} window --manifest {input.manifest:q} --screens {params.screens} "
        "--prompts {params.prompts} --generic {input.generic:q} --behaviours {params.behaviours:q} "
        "--out-sweeps {output.sweeps:q} "
        "--out-single-pass {output.single_pass:q} --out-window {output.window:q} "
        "--out-summary {output.summary:q} --threads {threads} --options {params.options:q} "
        "--sweep-shards {input.sweep_shards:q} "
        "--preconditions {input.preconditions:q} --requires {params.requires:q} > {log:q} 2>&1"


rule attribution:
    input:
        manifest=audited_manifest(),
        window=stage_file("window", "window.parquet"),
        sweeps=stage_file("window", "sweeps.parquet"),
        screens=[screen_table("scores", b) for b in config["behaviours"]],
        prompts=[prompt_table(swept_set(spec)) for spec in config["behaviours"].values()],
    output:
        scores=stage_file("attribution", "scores.parquet"),
        summary=stage_file("attribution", "summary.json"),
    params:
        cli=NEURONAUDIT,
        screens=named_paths({b: screen_table("scores", b) for b in config["behaviours"]}),
        prompts=named_paths({b: prompt_table(swept_set(s)) for b, s in config["behaviours"].items()}),
        behaviours=verbatim(json.dumps(config["behaviours"])),
        options=stage_options("attribution"),
    threads: config["threads"]
    resources:
        mem_mb=job_resource("attribution", "mem_mb"),
        runtime=job_resource("attribution", "runtime"),
        gpu=job_resource("attribution", "gpu"),
    conda:
        "../workflow/envs/neuronaudit.yaml"
    log:
        log_file("attribution", "attribution"),
    benchmark:
        benchmark_file("attribution", "attribution")
    shell:
        "{params.cli} attribution --manifest {input.manifest:q} --window {input.window:q} "
        "--sweeps {input.sweeps:q} --screens {params.screens} --prompts {params.prompts} "
        "--behaviours {params.behaviours:q} --out-scores {output.scores:q} "
        "--out-summary {output.summary:q} --threads {threads} --options {params.options:q} "
        "> {log:q} 2>&1"
