"""CI: both workflow files pass plain `actionlint`, and the nightly script's stages run on the CPU against the smoke
suite (one cell): a first night with nothing to compare passes and says so; a night worse than a faked previous
night fails with its regressions in the step summary. No network and no `gh`: the previous night comes from a
local folder (BENCH_PREVIOUS_RESULTS)."""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
SCRIPT = ROOT / "ci" / "nightly.sh"
BIN = Path(sys.executable).parent  # the virtual environment's scripts: bench, actionlint, shellcheck


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.skip(f"{name} is not installed; `pip install -e '.[dev]'` brings it")
    return found


def actionlint(cwd: Path) -> subprocess.CompletedProcess:
    """Plain `actionlint`, no flags, as a user types it: it finds the workflows and .github/actionlint.yaml itself.
    shellcheck beside it on PATH: actionlint then checks the `run:` scripts too."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([tool("actionlint")], cwd=cwd, env=env, capture_output=True, text=True)


def test_plain_actionlint_passes_from_the_repository_root():
    out = actionlint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_without_its_config_actionlint_rejects_the_gpu_label(tmp_path):
    # What the config is for: the same workflows, the config left out, fail on the self-hosted label.
    shutil.copytree(WORKFLOWS, tmp_path / ".github" / "workflows")
    (tmp_path / ".git").mkdir()  # actionlint looks for the repository's root by its .git
    out = actionlint(tmp_path)
    assert out.returncode == 1 and 'label "gpu" is unknown' in out.stdout, out.stdout + out.stderr


def test_nightly_script_passes_shellcheck():
    out = subprocess.run([tool("shellcheck"), str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def load_workflow(name: str) -> dict:
    flow = yaml.safe_load((WORKFLOWS / name).read_text())
    flow["on"] = flow.pop(True, flow.get("on"))  # YAML 1.1 reads the key `on` as true
    return flow


def test_ci_workflow_runs_the_readme_tests_on_push_and_pull_request():
    flow = load_workflow("ci.yml")
    assert {"push", "pull_request"} <= set(flow["on"])
    (job,) = flow["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["cache"] == "pip"
    assert any(".ci/run" in s.get("run", "") for s in job["steps"])


def test_nightly_workflow_shape():
    flow = load_workflow("nightly.yml")
    assert flow["on"]["schedule"][0]["cron"]
    assert {"suites", "only", "max_cells"} <= set(flow["on"]["workflow_dispatch"]["inputs"])
    assert flow["concurrency"]["cancel-in-progress"] is False
    (job,) = flow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"] and job["timeout-minutes"] >= 600
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert runs and all(r.startswith("ci/nightly.sh ") for r in runs)  # every step is the tested script
    uploads = {s["with"]["name"]: s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")}
    assert {"nightly-results", "nightly-reports"} <= set(uploads)
    assert all(s["if"] == "${{ always() }}" for s in uploads.values())
    assert 'ARTIFACT="nightly-results"' in SCRIPT.read_text()  # what `previous` downloads is what is uploaded


def nightly(work: Path, previous: Path | None, **env: str) -> subprocess.CompletedProcess:
    """Run the script's previous, run and report stages on the smoke suite's first cell, as the workflow does."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "BENCH_"))}
    base.update(BENCH=str(BIN / "bench"), BENCH_NIGHTLY_DIR=str(work), BENCH_NIGHTLY_SUITES="bench/suites/smoke.yaml",
                BENCH_NIGHTLY_MAX_CELLS="1", BENCH_PREVIOUS_RESULTS=str(previous or work / "none"),
                BENCH_CACHE=str(work / "cache"), GITHUB_STEP_SUMMARY=str(work / "summary.md"), **env)
    script = f"set -e; {SCRIPT} previous; {SCRIPT} run; {SCRIPT} report"
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=base, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def first_night(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path_factory.mktemp("night1")
    return work, nightly(work, None)


def test_first_night_passes_and_says_so(first_night):
    work, out = first_night
    assert out.returncode == 0, out.stdout + out.stderr
    assert "first night: no previous results to compare with" in out.stdout
    assert "smoke: no regression" in out.stdout
    assert len(list((work / "results" / "smoke" / "cells").glob("*.parquet"))) == 1
    assert (work / "reports" / "smoke" / "leaderboard.html").is_file()
    summary = (work / "summary.md").read_text()
    assert "First night: no previous results to compare with" in summary
    assert "## smoke" in summary and "![" not in summary  # the leaderboard, its plots left to the artifact


def worse_than(results: Path, target: Path) -> None:
    """A previous night, a day older, that did better: every cell right, three times the speed."""
    for path in (results / "smoke" / "cells").glob("*.parquet"):
        table = pq.read_table(path)
        row = table.to_pylist()[0]
        day = dt.timedelta(days=1)
        n = row["test_images"]
        row.update(run_id="20000101T000000Z-before", top1=1.0, val_top1_best=1.0, images_per_s=3 * (row["images_per_s"] or 1),
                   started_at=row["started_at"] - day, finished_at=row["finished_at"] - day,
                   test_correct=base64.b64encode(np.packbits(np.ones(n, dtype=bool)).tobytes()).decode())
        folder = target / "smoke" / "cells"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([row], schema=table.schema), folder / f"{row['cell_id']}--{row['run_id']}.parquet")


def test_a_worse_night_fails_with_its_regressions(first_night, tmp_path):
    work, _ = first_night
    previous = tmp_path / "previous"
    worse_than(work / "results", previous)
    night = tmp_path / "night2"
    out = nightly(night, previous, BENCH_HISTORY=str(tmp_path / "history"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "previous nights: 1 runs, 1 cell files" in out.stdout
    assert "regression: smoke:" in out.stdout and "smoke: REGRESSION against the earlier nights" in out.stdout
    summary = (night / "summary.md").read_text()
    assert "Regressions against the earlier nights" in summary and "\n- smoke: " in summary
    # One earlier night: the one-run rule, and the summary says so (tests/test_nightly_history.py: a history).
    assert ("**Compared:** smoke: 1 config compared: 1 against run 20000101T000000Z-before (1 earlier run; a history "
            "needs 5)") in summary
    assert "First night" not in summary
    # The uploaded results are tonight's alone; the previous night was only read beside them.
    assert [p.name for p in (night / "results" / "smoke" / "cells").glob("*.parquet")] != [
        "20000101T000000Z-before.run.parquet"]
    assert len(list((night / "results" / "smoke" / "cells").glob("*.parquet"))) == 1
    # The long-lived history got tonight's run, compacted into one file.
    assert len(list((tmp_path / "history" / "smoke" / "cells").glob("*.run.parquet"))) == 1
