# Config validation, pre-flight checks, the grid, and the input functions of every rule.
from phasewatt.analysis import captions
from phasewatt.config import exit_on_error, jobs, validate
from phasewatt.gpu.specs import gpu_spec
from phasewatt.workflow import preflight, timeline_run

config.update(exit_on_error(validate, config))
DEVICE = exit_on_error(preflight, config)
SIMULATED = DEVICE == "sim"
GPU_NAME = gpu_spec(config["gpu"]).name
JOBS = jobs(config)
MODELS = list(config["grid"]["models"])
FIGURES = [
    "roofline_decode",
    "roofline_prefill",
    "power_vs_cap",
    "energy_vs_seqlen",
    "request_energy",
    "clock_sustained",
]
TABLES = ["decode_power", "cap_binding", "savings", "dvfs_classes", "request_energy"]
TABLE_FORMATS = ["csv", "md", "tex"]


wildcard_constraints:
    model="|".join(MODELS),
    batch=r"\d+",
    seqlen=r"\d+",
    dvfs=r"default|pl\d+|sm\d+",
    table="|".join(TABLES),


def run_record(job):
    return f"results/runs/{job.run_id}.json"


def model_records(wildcards):
    return [run_record(job) for job in JOBS if job.model == wildcards.model]


def model_traces(wildcards):
    return [
        run_record(job).replace(".json", ".trace.parquet")
        for job in JOBS
        if job.model == wildcards.model
    ]


def timeline_record(wildcards):
    return run_record(timeline_run(config, wildcards.model))


def all_outputs():
    figures = [f"figures/{name}.pdf" for name in FIGURES]
    figures += [f"figures/pareto_{model}.pdf" for model in MODELS]
    figures += [f"figures/timeline_{model}.pdf" for model in MODELS]
    tables = [
        f"results/tables/{name}.{fmt}" for name in TABLES for fmt in TABLE_FORMATS
    ]
    return (
        ["results/measurements.parquet", "results/measurements.csv"] + figures + tables
    )


def figure_caption(name, model=None):
    return captions.figure_caption(
        name, simulated=SIMULATED, gpu_name=GPU_NAME, model=model
    )


def table_caption(name):
    return captions.table_caption(name, simulated=SIMULATED, gpu_name=GPU_NAME)
