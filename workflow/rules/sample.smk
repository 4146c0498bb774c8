rule sample_grid:
    input:
        lora=paths.run_lora("{run}"),
        epochs=paths.epochs_dir("{run}"),
        base=get_run_base,
    output:
        grid=report(paths.sample_grid("{run}"), caption="../report/grid.rst", category="Samples"),
        samples=directory(paths.sample_dir("{run}")),
        scores=paths.sample_scores("{run}"),
    params:
        samples=get_sample_params,
        cli=LORABAKE,
    log:
        paths.job_log("sample_grid", "{run}"),
    threads: 1
    resources:
        gpu=get_sample_gpu,
        mem_mb=8000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} sample --run {wildcards.run} > {log} 2>&1"


rule comparison:
    input:
        unpack(get_comparison_inputs),
    output:
        folder=report(directory(paths.comparison_dir("{name}")), htmlindex="index.html", category="Comparisons"),
    params:
        spec=get_comparison_params,
        cli=LORABAKE,
    log:
        paths.job_log("comparison", "{name}"),
    threads: 1
    resources:
        gpu=get_comparison_gpu,
        mem_mb=8000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} compare --name {wildcards.name} > {log} 2>&1"
