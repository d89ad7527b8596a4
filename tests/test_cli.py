"""The command line end to end: the smoke suite to a leaderboard, resume, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.store import ResultStore

ROOT = Path(__file__).resolve().parent.parent

# `--slurm gpu` here: without SLURM, the missing sbatch; with a SLURM install (CI brings up a test cluster), the
# controller out of reach or no partition named gpu. One line naming the option either way.
SLURM_GPU_SAID = "sbatch is not on this machine's PATH" if shutil.which("sbatch") is None else "error: --slurm gpu: "


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The README's first command, minus the install: run the smoke suite, then report."""
    work = tmp_path_factory.mktemp("smoke")
    ran = bench("run", str(ROOT / "suites" / "smoke.yaml"), cwd=work)
    reported = bench("report", cwd=work)
    return work, ran, reported


def test_smoke_run_leaves_its_rows_in_one_compacted_file(smoke):
    work, ran, _ = smoke
    assert ran.returncode == 0, ran.stdout + ran.stderr
    # Each cell was written as its own file, then the completed run folded them into one (every row kept).
    files = sorted((work / "results" / "smoke" / "cells").glob("*.parquet"))
    assert len(files) == 1 and files[0].name.endswith(".run.parquet")
    rows = ResultStore(work / "results").read().cells
    assert set(rows["status"]) == {"ok"} and rows["cell_id"].is_unique
    assert set(rows["model"]) == {"tv:squeezenet1_1", "tv:resnet18"} and set(rows["resolution"]) == {32, 64}
    # what a newcomer sees first: both models learn, at least twice chance (10 classes) on validation
    assert (rows["val_top1_tested"] >= 0.2).all(), rows[["model", "resolution", "val_top1_tested"]]
    assert (rows["peak_host_rss_bytes"] > 0).all() and (rows["train_s"] > 0).all()
    assert "4 cells run, 0 already done" in ran.stdout
    for cell_id in rows["cell_id"]:
        assert cell_id in ran.stdout  # the closing summary table lists every cell


def test_smoke_report_lists_every_cell_in_both_files(smoke):
    work, _, reported = smoke
    assert reported.returncode == 0, reported.stderr
    md = (work / "reports" / "leaderboard.md").read_text()
    html = (work / "reports" / "leaderboard.html").read_text()
    rows = ResultStore(work / "results").read().cells
    for cell_id in rows["cell_id"]:
        assert cell_id in md and cell_id in html
    assert "<img" in html and "data:image/png;base64," in html
    assert list((work / "reports").glob("*.png"))
    # The first section answers the question, above the leaderboard, in both files.
    for text in (md, html):
        assert "Which should I pick?" in text and text.index("Which should I pick?") < text.index("Leaderboard")
    assert "skipped: " not in md.split("Which should I pick?")[1].split("Leaderboard")[0]


def test_second_run_redoes_nothing_and_adds_no_rows(smoke):
    work, _, _ = smoke
    again = bench("run", str(ROOT / "suites" / "smoke.yaml"), cwd=work)
    assert again.returncode == 0 and "0 cells run, 4 already done" in again.stdout
    assert len(ResultStore(work / "results").read().cells) == 4


def test_report_survives_a_corrupt_file_and_names_it(smoke, tmp_path):
    work, _, _ = smoke
    import shutil

    results = tmp_path / "results"
    shutil.copytree(work / "results", results)
    bad = results / "smoke" / "cells" / "deadbeef--broken.parquet"
    bad.write_bytes(b"this is not parquet")
    out = bench("report", "--results", str(results), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert out.returncode == 0 and str(bad) in out.stderr
    assert (tmp_path / "rep" / "leaderboard.html").is_file()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("name: t\ndataset: synthetic\ngrid: {model: [resnet18]\n", "not valid YAML"),
        ("name: t\ndataset: synthetic\ngrid: {model: [resnet18], colour: [red]}\n", "grid.colour: unknown key"),
        ("name: t\ndataset: synthetic\ngrid: {model: [resnt18]}\n", "resnet18"),
        ("name: t\ndataset: synthetic\ndefaults: {batch_size: [8, 16]}\ngrid: {model: [resnet18]}\n", "defaults.batch_size"),
        ("name: t\ndataset: synthetic\ngrid: {}\n", "no cells"),
        ("name: t\ndataset: synthetic\ngrid: {model: [inception_v3], resolution: [32]}\n", "inception_v3"),
        ("name: t\ndataset: cifar11\ngrid: {model: [resnet18]}\n", "cifar10"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a UTF-8 YAML file"),  # a binary file by mistake
        ("name: t\ndataset: synthetic\ngrid: {model: [r\xe9snet18]}\n".encode("latin-1"), "not a UTF-8 YAML file"),
    ],
)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_malformed_suites_fail_with_one_line_and_exit_2(tmp_path, text, expected, command):
    suite = tmp_path / "bad.yaml"
    suite.write_bytes(text if isinstance(text, bytes) else text.encode())
    extra = ["--results", str(tmp_path / "r")] if command == "run" else []
    out = bench(command, str(suite), *extra, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert str(suite) in lines[0] and expected in lines[0]
    assert not (tmp_path / "r").exists()  # nothing ran, nothing was written


def test_full_suite_validates(tmp_path):
    out = bench("validate", str(ROOT / "suites" / "cifar_full.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "204 cells" in out.stdout and "tv:vit_b_16" in out.stdout and "tv:inception_v3" in out.stdout


def test_models_lists_a_pattern(tmp_path):
    out = bench("models", "resnet*", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "tv:resnet50" in out.stdout and "tv:vgg16" not in out.stdout and "IMAGENET1K" in out.stdout
    unknown = bench("models", "resnt50", cwd=tmp_path)
    assert unknown.returncode == 2 and "resnet50" in unknown.stderr


@pytest.mark.parametrize("args, expected", [(["--device", "bogus"], "not a device"), (["--device", "cuda:7"], "not on this machine"),
                                            (["--gpus", "x"], "CUDA"), (["--max-cells", "0"], "max-cells"),
                                            (["--set", "batch_sise=3"], "did you mean: batch_size"),
                                            (["--ray", "local", "--gpus", "all"], "drop --device and --gpus"),
                                            (["--slurm", "local", "--device", "cpu"], "drop --device and --gpus"),
                                            (["--ray", "local", "--slurm", "gpu"], "pass one of them"),
                                            (["--executor", "local", "--ray", "local"], "contradicts --ray"),
                                            (["--slurm", "gpu"], SLURM_GPU_SAID)])
def test_bad_run_options_fail_with_one_line(tmp_path, args, expected):
    out = bench("run", *args, "--results", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device, gpus, expected", [(None, "all", ("cuda:0", "cuda:1", "cuda:2", "cuda:3")),
                                                    (None, "0,2", ("cuda:0", "cuda:2")), ("cuda:1", None, ("cuda:1",)),
                                                    (None, None, ("cuda:0",)), ("cpu", None, ("cpu",))])
def test_device_options_on_a_machine_with_four_gpus(monkeypatch, device, gpus, expected):
    import torch

    from bench.cli import _default_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _default_devices(device, gpus) == expected


@pytest.mark.parametrize("device, gpus, expected", [(None, "4", "has 4"), ("cuda:9", None, "not on this machine"),
                                                    (None, "0,0", "twice")])
def test_device_options_beyond_the_gpus_there_are(monkeypatch, device, gpus, expected):
    import torch

    from bench.cli import _default_devices
    from bench.errors import BenchError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(BenchError, match=expected):
        _default_devices(device, gpus)
