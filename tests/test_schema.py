"""The JSON Schema of suite files (`bench schema`): derived from the models, committed as bench/suites/schema.json
(suites/schema.json links to it) and named on every shipped suite's first line, so editors check and complete suites; it accepts every shipped suite
and the README's examples, and rejects what `bench validate` rejects."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

jsonschema = pytest.importorskip("jsonschema")

from bench.cli import main  # noqa: E402
from bench.errors import SuiteError  # noqa: E402
from bench.schema import schema_text, suite_schema  # noqa: E402
from bench.suite import CELL_FIELDS, parse_suite  # noqa: E402
from bench.validate import resolve_cells  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "bench" / "suites" / "schema.json"  # shipped in the package; suites/schema.json links to it
SHIPPED = sorted((ROOT / "suites").rglob("*.yaml")) + [ROOT / "bench" / "suites" / "smoke.yaml"]
FIRST_LINE = re.compile(r"# yaml-language-server: \$schema=(\S+)\n")


@pytest.fixture(scope="module")
def validator():
    schema = suite_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, raw) -> list[str]:
    return [error.message for error in validator.iter_errors(raw)]


def test_the_committed_schema_is_what_bench_generates():
    assert COMMITTED.read_text(encoding="utf-8") == schema_text(), (
        "suites/schema.json is out of date: regenerate it with `bench schema --out suites/schema.json`")
    printed = CliRunner().invoke(main, ["schema"])
    assert printed.exit_code == 0 and json.loads(printed.output) == suite_schema()


def test_the_schema_documents_every_cell_field_with_its_default(validator):
    defaults = suite_schema()["properties"]["defaults"]["properties"]
    assert set(defaults) == (set(CELL_FIELDS) - {"suite", "dataset"}) | {"seeds"}
    undocumented = [name for name, field in defaults.items() if not field.get("description")]
    assert not undocumented
    assert defaults["resolution"]["default"] == 32 and defaults["freeze"]["default"] == "none"
    grid = suite_schema()["properties"]["grid"]["properties"]
    assert grid["resolution"]["type"] == "array" and grid["resolution"]["description"]
    assert "hf:OWNER/NAME" in suite_schema()["properties"]["dataset"]["description"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_suite_names_the_schema_and_follows_it(path, validator):
    text = path.read_text(encoding="utf-8")
    named = FIRST_LINE.match(text)
    assert named, f"{path} must start with `# yaml-language-server: $schema=...`"
    assert (path.parent / named.group(1)).resolve() == COMMITTED
    assert _errors(validator, yaml.safe_load(text)) == []


def _readme_suites() -> list[dict]:
    """The suites the README and its suite-files page show."""
    texts = [(ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "docs" / "suites.md").read_text(encoding="utf-8")]
    blocks = [b for text in texts for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)]
    return [yaml.safe_load(block) for block in blocks if "dataset:" in block]


def test_the_readme_examples_follow_the_schema(validator):
    suites = _readme_suites()
    assert len(suites) >= 2 and any(str(s["dataset"]).startswith("hf:") for s in suites)
    for suite in suites:
        assert _errors(validator, suite) == []


BASE = {"name": "ok", "dataset": "cifar10", "defaults": {"epochs": 1}, "grid": {"model": ["resnet18"]}}
MALFORMED = {
    "unknown cell field": {**BASE, "defaults": {"epoch": 3}},
    "unknown top-level key": {**BASE, "grids": {}},
    "grid value not a list": {**BASE, "grid": {"model": "resnet18"}},
    "empty grid list": {**BASE, "grid": {"model": ["resnet18"], "resolution": []}},
    "value out of range": {**BASE, "defaults": {"resolution": 4}},
    "value not in the choices": {**BASE, "defaults": {"precision": "fp64"}},
    "negative learning rate": {**BASE, "defaults": {"lr": -0.1}},
    "freeze not a depth": {**BASE, "include": [{"model": "resnet18", "freeze": "half"}]},
    "seeds not a list": {**BASE, "defaults": {"seeds": 3}},
    "name with a space": {**BASE, "name": "my suite"},
    "unknown dataset": {**BASE, "dataset": "cifar11"},
    "dataset missing": {k: v for k, v in BASE.items() if k != "dataset"},
    "race eta below 2": {**BASE, "race": {"eta": 1}},
    "exclude with an unknown key": {**BASE, "exclude": [{"modle": "resnet18"}]},
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_the_schema_rejects_what_bench_validate_rejects(raw, validator):
    with pytest.raises(SuiteError):
        resolve_cells(parse_suite(raw, source="malformed.yaml"))
    assert _errors(validator, raw), f"the schema accepts a suite bench rejects: {raw}"


def test_the_base_of_the_malformed_suites_is_itself_fine(validator):
    assert resolve_cells(parse_suite(BASE)) and _errors(validator, BASE) == []
