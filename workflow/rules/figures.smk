# Figures: PDF for the paper, PNG twin for quick looks and the report.


localrules:
    pareto,
    timeline,
    study_figure,


rule pareto:
    input:
        measurements="results/models/{model}.parquet",
    output:
        pdf="figures/pareto_{model}.pdf",
        png=report(
            "figures/pareto_{model}.png",
            caption="../report/caption.rst",
            category="Figures",
            subcategory="Pareto fronts",
        ),
    log:
        "logs/figures/pareto_{model}.log",
    benchmark:
        "results/benchmarks/figures/pareto_{model}.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    params:
        caption=lambda wildcards: figure_caption("pareto", model=wildcards.model),
    script:
        "../scripts/pareto.py"


rule timeline:
    input:
        record=timeline_record,
    output:
        pdf="figures/timeline_{model}.pdf",
        png=report(
            "figures/timeline_{model}.png",
            caption="../report/caption.rst",
            category="Figures",
            subcategory="Power timelines",
        ),
    log:
        "logs/figures/timeline_{model}.log",
    benchmark:
        "results/benchmarks/figures/timeline_{model}.tsv"
    conda:
        "../../envs/phasewatt.yaml"
    params:
        caption=lambda wildcards: figure_caption("timeline", model=wildcards.model),
    script:
        "../scripts/timeline.py"


rule study_figure:
    input:
        measurements="results/measurements.parquet",
    output:
        pdf="figures/{figure}.pdf",
        png=report(
            "figures/{figure}.png",
            caption="../report/caption.rst",
            category="Figures",
            subcategory="Across models",
        ),
    log:
        "logs/figures/{figure}.log",
    benchmark:
        "results/benchmarks/figures/{figure}.tsv"
    wildcard_constraints:
        figure="|".join(FIGURES),
    conda:
        "../../envs/phasewatt.yaml"
    params:
        caption=lambda wildcards: figure_caption(wildcards.figure),
    script:
        "../scripts/study_figure.py"
