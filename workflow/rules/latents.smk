# Captions are deliberately not inputs here: editing one never re-encodes a latent.
rule cache_latents:
    input:
        images=get_dataset_images,
        base=get_latent_base,
    output:
        index="results/latents/{ds}/{spec}/index.json",
    log:
        "logs/cache_latents/{ds}/{spec}.log",
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "{LORABAKE} cache-latents --dataset {wildcards.ds} --spec {wildcards.spec} > {log} 2>&1"
