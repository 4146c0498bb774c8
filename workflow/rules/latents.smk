# Captions are deliberately not inputs here: editing one never re-encodes a latent.
rule cache_latents:
    input:
        base=get_latent_base,
    output:
        index="results/latents/{ds}/{spec}/index.json",
    params:
        images=get_image_digest,
    log:
        "logs/cache_latents/{ds}/{spec}.log",
    threads: 1
    resources:
        gpu=get_latent_gpu,
        mem_mb=8000,
        runtime=60,
    shell:
        "{LORABAKE} cache-latents --dataset {wildcards.ds} --spec {wildcards.spec} > {log} 2>&1"
