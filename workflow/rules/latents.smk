# Captions are deliberately not inputs here: editing one never re-encodes a latent.
rule cache_latents:
    input:
        base=get_latent_base,
    output:
        index=paths.latent_index("{ds}", "{spec}"),
    params:
        images=get_latent_params,
        cli=LORABAKE,
    log:
        paths.job_log("cache_latents", "{ds}", "{spec}"),
    threads: 1
    resources:
        gpu=get_latent_gpu,
        mem_mb=8000,
        runtime=60,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} cache-latents --dataset {wildcards.ds} --spec {wildcards.spec} > {log} 2>&1"
