# Captions enter through `params` (a digest of the normalized text), so a whitespace edit or a
# `touch` costs nothing, and a tag edit retrains exactly the runs that use that dataset.
rule train:
    input:
        unpack(get_train_inputs),
    output:
        lora=paths.run_lora("{run}"),
        epochs=directory(paths.epochs_dir("{run}")),
        steps=directory(paths.steps_dir("{run}")),
        log=paths.train_log("{run}"),
        plot=report(paths.loss_plot("{run}"), caption="../report/loss.rst", category="Training"),
        config=paths.run_config("{run}"),
    params:
        digest=get_train_params,
        cli=LORABAKE,
    log:
        paths.job_log("train", "{run}"),
    threads: get_train_threads
    resources:
        gpu=get_train_gpu,
        mem_mb=get_train_mem_mb,
        runtime=get_train_runtime,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} train --run {wildcards.run} > {log} 2>&1"
