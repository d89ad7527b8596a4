"""The JSON Schema of suite files (`bench schema`), derived from the pydantic models in `bench/suite.py`.

Its committed copy, bench/suites/schema.json (shipped beside the embedded smoke suite; suites/schema.json links to
it, as suites/smoke.yaml does to the smoke suite), is named on the first line of every shipped suite, `#
yaml-language-server: $schema=./schema.json`, so editors with the YAML language server (VS Code's YAML extension
and others) complete and check suites as they are typed. bench parses suites with the models; the schema is for
editors.
"""

from __future__ import annotations

import json
from typing import Any

from bench.data import dataset_pattern
from bench.suite import Cell, Suite

SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"
SEEDS_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "title": "Seeds",
                "description": "Each cell runs once per seed; the report folds seeds into mean and spread."}


def suite_schema() -> dict[str, Any]:
    """The JSON Schema of suite files: the Suite model's, with the keys of defaults, grid, include and exclude
    described as the Cell fields they set (grid's as lists of them), so editors complete and check suites as they
    are typed. bench parses suites with the models themselves; the schema is for editors (and a test)."""
    schema = Suite.model_json_schema()
    cell = Cell.model_json_schema()
    fields = {k: v for k, v in cell["properties"].items() if k not in ("suite", "dataset")}
    values = {k: {"$ref": f"#/$defs/{k}"} for k in fields}  # each field's values once; every section refers to them
    props = schema["properties"]
    props.pop("source", None)  # filled in by bench from the file's path, never written
    props["dataset"]["pattern"] = dataset_pattern()
    props["defaults"] = _object(props["defaults"], {**{k: {**_about(v), **values[k]} for k, v in fields.items()},
                                                    "seeds": SEEDS_SCHEMA})
    props["grid"] = _object(props["grid"], {k: _list_of(v, values[k]) for k, v in fields.items()})
    entry = {k: {**_about(v), "anyOf": [values[k], _list_of({}, values[k])]} for k, v in fields.items()}
    for key in ("include", "exclude"):
        props[key] = {**_about(props[key]), "type": "array", "items": _object({}, entry)}
    defs = {**cell.get("$defs", {}), **schema.get("$defs", {}), **{k: _value(v) for k, v in fields.items()}}
    body = {k: v for k, v in schema.items() if k not in ("title", "$defs")}
    return {"$schema": SCHEMA_DRAFT, "title": "bench suite", **body, "$defs": defs}


def _about(field: dict[str, Any]) -> dict[str, Any]:
    return {k: field[k] for k in ("title", "description", "default") if k in field}


def _value(field: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in field.items() if k not in ("title", "description", "default")}


def _object(field: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    return {**_about(field), "type": "object", "properties": properties, "additionalProperties": False}


def _list_of(field: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    return {**_about(field), "type": "array", "items": value, "minItems": 1}


def schema_text() -> str:
    """The schema as `bench schema` prints it and suites/schema.json holds it."""
    return json.dumps(suite_schema(), indent=2, ensure_ascii=False) + "\n"
