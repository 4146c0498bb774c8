rule dataset_report:
    output:
        json="results/datasets/{ds}/report.json",
        md="results/datasets/{ds}/report.md",
        plot=report("results/datasets/{ds}/buckets.png", caption="../report/buckets.rst", category="Datasets"),
    params:
        digest=get_report_params,
        images=get_image_digest,
    log:
        "logs/dataset_report/{ds}.log",
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    shell:
        "{LORABAKE} dataset report --dataset {wildcards.ds} > {log} 2>&1"
