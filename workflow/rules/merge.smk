rule merge:
    input:
        unpack(get_merge_inputs),
    output:
        checkpoint="results/merged/{name}.safetensors",
    params:
        spec=lambda w: get_merge(w).model_dump(mode="json"),
    log:
        "logs/merge/{name}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    shell:
        "{LORABAKE} merge --name {wildcards.name} > {log} 2>&1"


rule extract:
    input:
        unpack(get_extract_inputs),
    output:
        lora="results/extracted/{name}.safetensors",
    params:
        spec=lambda w: get_extract(w).model_dump(mode="json"),
    log:
        "logs/extract/{name}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    shell:
        "{LORABAKE} extract --name {wildcards.name} > {log} 2>&1"


rule merge_diffusers:
    input:
        checkpoint="results/merged/{name}.safetensors",
    output:
        folder=directory("results/merged/{name}.diffusers"),
    log:
        "logs/merge_diffusers/{name}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    shell:
        "{LORABAKE} merge-diffusers --name {wildcards.name} > {log} 2>&1"


rule resize:
    input:
        lora=lambda w: paths.run_lora(get_resize(w).run),
    output:
        lora="results/resized/{name}.safetensors",
        report="results/resized/{name}.json",
    params:
        spec=lambda w: get_resize(w).model_dump(mode="json"),
    log:
        "logs/resize/{name}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "{LORABAKE} resize --name {wildcards.name} > {log} 2>&1"


rule svd_merge:
    input:
        loras=lambda w: [paths.run_lora(lora.run) for lora in get_svd_merge(w).loras],
    output:
        lora="results/svd-merged/{name}.safetensors",
    params:
        spec=lambda w: get_svd_merge(w).model_dump(mode="json"),
    log:
        "logs/svd_merge/{name}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    shell:
        "{LORABAKE} svd-merge --name {wildcards.name} > {log} 2>&1"
