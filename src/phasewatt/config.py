"""Load and validate config.yaml, and expand it into the grid of measurement jobs.

Validation happens before Snakemake builds its DAG and before any GPU work: every problem
is one line naming the field and what is allowed.
"""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from phasewatt.errors import ConfigError
from phasewatt.gpu.dvfs import parse_dvfs
from phasewatt.gpu.specs import gpu_spec
from phasewatt.models.spec import ModelSpec

SCHEMA_NAME = "config.schema.yaml"


def schema_text(name: str = SCHEMA_NAME) -> str:
    return resources.files("phasewatt.schemas").joinpath(name).read_text()


def load_schema(name: str = SCHEMA_NAME) -> dict:
    return yaml.safe_load(schema_text(name))


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _schema_message(error: jsonschema.ValidationError) -> str:
    """One line for one schema violation: the field, the bad value and what is allowed."""
    where = _field(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    if kind == "required":
        missing = error.message.split("'")[1]
        return f"{_field(list(error.absolute_path) + [missing])}: missing; it is required"
    if kind == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = error.message.split("'")[1] if "'" in error.message else "?"
        tail = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{_field(list(error.absolute_path) + [extra])}: unknown key{tail}"
    if kind == "enum":
        allowed = ", ".join(str(v) for v in error.validator_value)
        return f"{where}: {error.instance!r} is not allowed; allowed: {allowed}"
    if kind == "anyOf" and "x-allowed" in schema:
        return f"{where}: {error.instance!r} is not allowed; allowed: {schema['x-allowed']}"
    if kind == "pattern":
        allowed = schema.get("x-allowed", f"a string matching {error.validator_value}")
        return f"{where}: {error.instance!r} is not allowed; allowed: {allowed}"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        return f"{where}: {error.instance!r} is out of range; it must be {sign} {error.validator_value}"
    if kind == "type":
        return f"{where}: {error.instance!r} is not of type {error.validator_value}"
    if kind == "uniqueItems":
        return f"{where}: has duplicate entries"
    if kind in ("minItems", "minProperties"):
        return f"{where}: must not be empty"
    return f"{where}: {error.message}"


@dataclass(frozen=True)
class Job:
    """One measurement configuration: one Snakemake `measure` job."""

    model: str
    batch: int
    seqlen: int
    dvfs: str

    @property
    def run_id(self) -> str:
        return f"{self.model}/bs{self.batch}_seq{self.seqlen}/{self.dvfs}"


def validate(config: dict) -> dict:
    """Validate a config dict; return a copy with defaults filled in. Raises ConfigError."""
    config = copy.deepcopy(dict(config))
    schema = load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise ConfigError(_schema_message(errors[0]))
    for key, sub in schema["properties"].items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
    for name, entry in config["models"].items():
        ModelSpec.from_config(name, entry)
    known = sorted(config["models"])
    for i, name in enumerate(config["grid"]["models"]):
        if name not in config["models"]:
            raise ConfigError(f"grid.models[{i}]: unknown model {name!r}; allowed: {', '.join(known)}")
    spec = gpu_spec(config["gpu"])
    for i, token in enumerate(config["grid"]["dvfs"]):
        parse_dvfs(token, spec, field=f"grid.dvfs[{i}]")
    for name in config.get("checkpoints", {}):
        if name not in config["models"]:
            raise ConfigError(f"checkpoints.{name}: unknown model; allowed: {', '.join(known)}")
    return config


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config: file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path} must hold a mapping of keys")
    return validate(raw)


def jobs(config: dict) -> list[Job]:
    grid = config["grid"]
    return [
        Job(model, int(batch), int(seqlen), dvfs)
        for model in grid["models"]
        for batch in grid["batch_sizes"]
        for seqlen in grid["prompt_lengths"]
        for dvfs in grid["dvfs"]
    ]


def model_spec(config: dict, name: str) -> ModelSpec:
    return ModelSpec.from_config(name, config["models"][name])


def select_model_specs(entries: dict, names: str | None, source: str) -> list[ModelSpec]:
    """The specs of the comma-separated `names` (all when empty) among a config's `models`
    entries, for the benchmarks' --models; an unknown name is one line naming the known ones."""
    wanted = [m.strip() for m in names.split(",") if m.strip()] if names else list(entries)
    unknown = [m for m in wanted if m not in entries]
    if unknown:
        raise ConfigError(f"--models: {', '.join(unknown)} not in {source}; allowed: {', '.join(entries)}")
    return [ModelSpec.from_config(m, entries[m]) for m in wanted]


def exit_on_error(func, *args, **kwargs):
    """Call func; on a PhasewattError print its one line to stderr and exit 1 (no traceback)."""
    from phasewatt.errors import PhasewattError

    try:
        return func(*args, **kwargs)
    except PhasewattError as err:
        print(f"phasewatt: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def validate_record(record: dict) -> None:
    """Check a run record against the run-record schema (raises ConfigError, one line)."""
    validator = jsonschema.Draft202012Validator(load_schema("run_record.schema.yaml"))
    errors = sorted(validator.iter_errors(record), key=lambda e: len(e.absolute_path))
    if errors:
        raise ConfigError(f"run record {record.get('run_id', '?')}: {_schema_message(errors[0])}")
