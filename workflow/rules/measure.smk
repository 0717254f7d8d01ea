# One job per (model, batch, prompt length, DVFS setting): the only rule that touches a GPU.


rule measure:
    output:
        record="results/runs/{model}/bs{batch}_seq{seqlen}/{dvfs}.json",
        trace="results/runs/{model}/bs{batch}_seq{seqlen}/{dvfs}.trace.parquet",
    log:
        "logs/measure/{model}/bs{batch}_seq{seqlen}/{dvfs}.log",
    benchmark:
        "results/benchmarks/measure/{model}/bs{batch}_seq{seqlen}/{dvfs}.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    resources:
        gpu=1,
        runtime=config["resources"].get("measure_runtime_min", 60),
        mem_mb=config["resources"].get("measure_mem_mb", 32000),
    params:
        journal_dir="results/dvfs_journal",
    script:
        "../scripts/measure.py"
