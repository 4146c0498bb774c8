# Captions enter through `params` (a digest of the normalized text), so a whitespace edit or a
# `touch` costs nothing, and a tag edit retrains exactly the runs that use that dataset.
rule train:
    input:
        unpack(get_train_inputs),
    output:
        lora="results/runs/{run}/{run}.safetensors",
        epochs=directory("results/runs/{run}/epochs"),
        steps=directory("results/runs/{run}/steps"),
        log="results/runs/{run}/train.jsonl",
        plot=report("results/runs/{run}/loss.png", caption="../report/loss.rst", category="Training"),
        config="results/runs/{run}/config.json",
    params:
        digest=get_train_params,
    log:
        "logs/train/{run}.log",
    threads: get_train_threads
    resources:
        gpu=lambda w: WS.run(w.run).resources.gpu,
        mem_mb=lambda w: WS.run(w.run).resources.mem_mb,
        runtime=lambda w: WS.run(w.run).resources.runtime,
    shell:
        "{LORABAKE} train --run {wildcards.run} > {log} 2>&1"
