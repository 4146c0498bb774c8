rule base_model:
    output:
        json=paths.base_json("{base}"),
    params:
        spec=get_base_params,
        cli=LORABAKE,
    log:
        paths.job_log("base_model", "{base}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} base --base {wildcards.base} > {log} 2>&1"
