rule sample_grid:
    input:
        lora="results/runs/{run}/{run}.safetensors",
        epochs="results/runs/{run}/epochs",
        base=get_run_base,
    output:
        grid=report("results/runs/{run}/grid.png", caption="../report/grid.rst", category="Samples"),
        samples=directory("results/runs/{run}/samples"),
    params:
        samples=get_sample_params,
    log:
        "logs/sample_grid/{run}.log",
    threads: 1
    resources:
        gpu=lambda w: min(1, WS.run(w.run).resources.gpu),
        mem_mb=8000,
        runtime=60,
    shell:
        "{LORABAKE} sample --run {wildcards.run} > {log} 2>&1"
