rule dataset_report:
    output:
        json=paths.dataset_report("{ds}"),
        md=paths.dataset_report_md("{ds}"),
        plot=report(paths.bucket_plot("{ds}"), caption="../report/buckets.rst", category="Datasets"),
    params:
        digest=get_report_params,
        images=get_image_digest,
        cli=LORABAKE,
    log:
        paths.job_log("dataset_report", "{ds}"),
    threads: 1
    resources:
        gpu=0,
        mem_mb=2000,
        runtime=10,
    conda:
        CONDA_ENV
    shell:
        "{params.cli} dataset report --dataset {wildcards.ds} > {log} 2>&1"
