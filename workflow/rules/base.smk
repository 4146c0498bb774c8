rule base_model:
    output:
        json="results/base/{base}/base.json",
    params:
        spec=lambda w: WS.base_params(w.base),
    log:
        "logs/base_model/{base}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "{LORABAKE} base --base {wildcards.base} > {log} 2>&1"
