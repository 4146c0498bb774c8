rule merge:
    input:
        unpack(get_merge_inputs),
    output:
        checkpoint=paths.merged("{name}"),
    params:
        spec=get_merge_spec,
        cli=LORABAKE,
    log:
        paths.job_log("merge", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} merge --name {wildcards.name} > {log} 2>&1"


rule extract:
    input:
        unpack(get_extract_inputs),
    output:
        lora=paths.extracted("{name}"),
    params:
        spec=get_extract_spec,
        cli=LORABAKE,
    log:
        paths.job_log("extract", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} extract --name {wildcards.name} > {log} 2>&1"


rule merge_diffusers:
    input:
        checkpoint=paths.merged("{name}"),
    output:
        folder=directory(paths.merged_diffusers("{name}")),
    params:
        cli=LORABAKE,
    log:
        paths.job_log("merge_diffusers", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=8000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} merge-diffusers --name {wildcards.name} > {log} 2>&1"


rule resize:
    input:
        lora=get_resize_input,
    output:
        lora=paths.resized("{name}"),
        report=paths.resize_report("{name}"),
    params:
        spec=get_resize_spec,
        cli=LORABAKE,
    log:
        paths.job_log("resize", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} resize --name {wildcards.name} > {log} 2>&1"


rule svd_merge:
    input:
        loras=get_svd_merge_inputs,
    output:
        lora=paths.svd_merged("{name}"),
    params:
        spec=get_svd_merge_spec,
        cli=LORABAKE,
    log:
        paths.job_log("svd_merge", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} svd-merge --name {wildcards.name} > {log} 2>&1"


# The run's epoch files come with its `epochs/` folder, a directory output of `train`; which files the
# EMA averages (and that the run keeps them) is checked when the workflow loads (WS.check_emas).
rule ema:
    input:
        epochs=get_ema_input,
    output:
        lora=paths.posthoc_ema("{name}"),
    params:
        spec=get_ema_spec,
        cli=LORABAKE,
    log:
        paths.job_log("ema", "{name}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=4000,
        runtime=30,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} ema --name {wildcards.name} > {log} 2>&1"
