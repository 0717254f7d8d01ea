# The paper's tables, each as CSV, Markdown and LaTeX (booktabs).


localrules:
    table,


rule table:
    input:
        measurements="results/measurements.parquet",
    output:
        csv="results/tables/{table}.csv",
        md=report(
            "results/tables/{table}.md",
            caption="../report/caption.rst",
            category="Tables",
        ),
        tex="results/tables/{table}.tex",
    log:
        "logs/tables/{table}.log",
    benchmark:
        "results/benchmarks/tables/{table}.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    params:
        caption=lambda wildcards: table_caption(wildcards.table),
    script:
        "../scripts/table.py"
