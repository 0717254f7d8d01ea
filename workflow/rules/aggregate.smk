# Records -> tidy tables: per model first (so one model's figure needs only its runs), then all.


localrules:
    aggregate_model,
    aggregate,


rule aggregate_model:
    input:
        records=model_records,
    output:
        measurements="results/models/{model}.parquet",
        status="results/models/{model}.status.csv",
    log:
        "logs/aggregate/{model}.log",
    benchmark:
        "results/benchmarks/aggregate/{model}.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    script:
        "../scripts/aggregate_model.py"


rule aggregate:
    input:
        measurements=expand("results/models/{model}.parquet", model=MODELS),
        status=expand("results/models/{model}.status.csv", model=MODELS),
    output:
        parquet="results/measurements.parquet",
        csv="results/measurements.csv",
        status="results/run_status.csv",
    log:
        "logs/aggregate/all.log",
    benchmark:
        "results/benchmarks/aggregate/all.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    script:
        "../scripts/aggregate.py"
