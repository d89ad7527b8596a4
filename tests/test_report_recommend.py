"""The report's recommendations (best, cheapest, fastest, smallest within a margin, under a budget) on constructed
results, and `bench results` (runs and cells; the leaderboard as CSV and JSON, whose numbers must round-trip)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.errors import ReportError
from bench.report import build_report
from bench.report import plots as report_plots
from bench.report.build import load
from bench.report.export import RENAMED
from bench.report.recommend import Budget, parse_size
from bench.store import ResultStore
from bench.suite import Cell

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
N_TEST = 1000
GIB = 2**30


def right_on(*spans: tuple[int, int]) -> str:
    """test_correct of a cell right on the test images in the given [start, end) spans."""
    v = np.zeros(N_TEST, dtype=bool)
    for start, end in spans:
        v[start:end] = True
    return base64.b64encode(np.packbits(v).tobytes()).decode("ascii")


# name -> (cell fields, per-seed validation, test, train s, latency ms, params, training VRAM GiB, test_correct)
CONFIGS = {
    # #1 on validation, but the slowest and largest of the four within 1 pt.
    "A": (dict(model="convnext_tiny"), [0.900], 0.890, 1000.0, 10.0, 28_000_000, 9.0, right_on((0, 890))),
    # Differs from A on 4 test images (2 each way): "≈ best" by McNemar.
    "B": (dict(model="resnet50"), [0.895], 0.890, 600.0, 6.0, 25_000_000, 6.0, right_on((0, 888), (890, 892))),
    # Cheapest and fastest within 1 pt; significantly worse than A on test.
    "C": (dict(model="resnet18"), [0.892], 0.700, 300.0, 3.0, 11_000_000, 4.0, right_on((0, 700))),
    # Smallest within 1 pt; no paired test data.
    "D": (dict(model="efficientnet_b0"), [0.891], 0.880, 800.0, 8.0, 5_000_000, 7.0, None),
    # Cheaper, faster and smaller than all, but 5 pts below A: outside a 1-pt margin.
    "E": (dict(model="mobilenet_v2", resolution=128, freeze="all"), [0.850], 0.840, 50.0, 1.0, 3_000_000, 1.0, None),
    # Two seeds, mean 0.894 ± 0.0071: within one std of A; expensive in every way.
    "F": (dict(model="vgg16"), [0.889, 0.899], 0.880, 2000.0, 20.0, 138_000_000, 20.0, None),
}


def write_configs(root: Path, *, cpu: bool = False) -> dict[str, str]:
    """Write every config of CONFIGS (one row per seed); returns name -> group id."""
    store = ResultStore(root)
    groups = {}
    for name, (fields, vals, top1, train_s, latency, params, vram, correct) in CONFIGS.items():
        for seed, val in enumerate(vals):
            cell = Cell(suite="rec", dataset="cifar10", seed=seed, **{"resolution": 224, **fields})
            groups[name] = cell.group_id
            store.write({
                **cell.model_dump(), "freeze": str(cell.freeze), "run_id": "r1", "cell_id": cell.id,
                "group_id": cell.group_id, "status": "ok", "top1": top1, "val_top1_best": val, "test_images": N_TEST,
                "test_correct": correct, "train_s": train_s + seed, "images_per_s": 1000.0,
                "infer_latency_ms_p50": latency, "infer_latency_ms_p95": 1.5 * latency,
                "infer_images_per_s": 1000.0 / latency, "total_params": params, "model_bytes": 4 * params,
                "peak_vram_train_bytes": None if cpu else int(vram * GIB), "device": "cpu" if cpu else "cuda:0",
                "gpu_name": None if cpu else "NVIDIA H100 80GB HBM3", "started_at": T0, "finished_at": T0,
            }, [])
    return groups


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("rec") / "results"
    return root, write_configs(root)


def picks(root: Path, budget: Budget = Budget()) -> dict[str, str]:
    advice = load(root, budget=budget).data.advice
    return dict(zip(advice.picks["question"], advice.picks["group_id"]))


def names(groups: dict[str, str], chosen: dict[str, str]) -> dict[str, str]:
    back = {g: n for n, g in groups.items()}
    return {q: back[g] for q, g in chosen.items()}


def test_picks_within_one_point(results):
    root, groups = results
    assert names(groups, picks(root)) == {"best": "A", "cheapest": "C", "fastest": "C", "smallest": "D"}


def test_a_wider_margin_lets_the_cheap_config_in(results):
    root, groups = results
    assert names(groups, picks(root, Budget(within_pts=5))) == {
        "best": "A", "cheapest": "E", "fastest": "E", "smallest": "E"}
    # A margin of 0: only configs as good as the best on validation, which is the best alone.
    assert set(names(groups, picks(root, Budget(within_pts=0))).values()) == {"A"}


def test_ties_by_mcnemar_and_by_one_std(results):
    root, groups = results
    ties = load(root).data.advice.ties
    back = {g: n for n, g in groups.items()}
    assert {back[g]: rule for g, rule in zip(ties["group_id"], ties["tie_rule"])} == {"B": "McNemar", "F": "one std"}


def test_budget_filters_and_moves_the_best(results, tmp_path, monkeypatch):
    root, groups = results
    advice = load(root, budget=Budget(max_vram_bytes=parse_size("8GiB"))).data.advice
    assert advice.eligible == 4 and advice.ranked == 6  # A (9 GiB) and F (20 GiB) do not fit
    assert names(groups, dict(zip(advice.picks["question"], advice.picks["group_id"]))) == {
        "best": "B", "cheapest": "C", "fastest": "C", "smallest": "D"}
    # McNemar again, now against B: C is worse on test, D and E have no paired data and one seed.
    assert advice.ties.empty
    monkeypatch.setattr(report_plots, "PLOTS", {})
    markdown = build_report(root, tmp_path / "out", budget=Budget(max_vram_bytes=8 * GIB)).markdown.read_text()
    assert (f"**Within your budget (VRAM on the card ≤ 8.00 GiB (--max-vram)), pick resnet50 at 224 px, batch 128, "
            f"fine-tuned end to end ({groups['B']}): the best validation top-1, 89.50%; test 89.00%.**") in markdown
    assert "4 of 6 ranked configs meet it. It leaves out the overall #1, convnext_tiny" in markdown
    within_hour = picks(root, Budget(max_train_hours=0.1))  # 360 s: C (300 s) and E (50 s)
    assert names(groups, within_hour) == {"best": "C", "cheapest": "C", "fastest": "C", "smallest": "C"}
    assert names(groups, picks(root, Budget(max_latency_ms=5, within_pts=5))) == {
        "best": "C", "cheapest": "E", "fastest": "E", "smallest": "E"}


def test_a_budget_nothing_meets_names_the_closest(results, tmp_path, monkeypatch):
    root, groups = results
    # E is the closest: 1 GiB is 2x a 0.5 GiB limit (and 1 ms meets 2 ms); C needs 8x.
    advice = load(root, budget=Budget(max_vram_bytes=GIB // 2, max_latency_ms=2)).data.advice
    assert advice.picks.empty and advice.eligible == 0
    assert advice.closest["group_id"] == groups["E"]
    assert advice.excess == pytest.approx({"max_vram_bytes": 2.0, "max_latency_ms": 0.5})
    monkeypatch.setattr(report_plots, "PLOTS", {})
    out = CliRunner().invoke(main, ["report", "--results", str(root), "--out", str(tmp_path / "rep"),
                                    "--max-vram", "512MiB", "--max-latency-ms", "2"])
    assert out.exit_code == 0, out.output
    markdown = (tmp_path / "rep" / "leaderboard.md").read_text()
    section = markdown[markdown.index("## Which should I pick?"):markdown.index("## Leaderboard")]
    assert ("**No config meets your budget (VRAM on the card ≤ 512 MiB (--max-vram), latency at batch 1 (median) ≤ "
            "2.0 ms (--max-latency-ms)), so nothing is recommended.**") in section
    assert "The closest is mobilenet_v2 at 128 px, batch 128, linear probe (backbone frozen)" in section
    assert groups["E"] in section
    assert "2.00x the limit" in section and "meets it" in section


def test_a_budget_on_a_column_nobody_recorded(tmp_path):
    root = tmp_path / "results"
    write_configs(root, cpu=True)
    advice = load(root, budget=Budget(max_vram_bytes=8 * GIB)).data.advice
    assert advice.picks.empty and advice.closest is None and advice.unknown == ["vram_card_bytes"]
    outcome = build_report(root, tmp_path / "out", budget=Budget(max_vram_bytes=8 * GIB))
    assert "No config recorded peak_vram_process_bytes or peak_vram_train_bytes" in outcome.markdown.read_text()


def test_the_section_comes_first_and_says_the_config_in_words(results, tmp_path, monkeypatch):
    root, groups = results
    monkeypatch.setattr(report_plots, "PLOTS", {})
    outcome = build_report(root, tmp_path / "out")
    markdown, page = outcome.markdown.read_text(), outcome.html.read_text()
    assert markdown.index("## Which should I pick?") < markdown.index("## Leaderboard")
    assert page.index('<section id="recommend">') < page.index('<section id="leaderboard">')
    assert (f"**Pick convnext_tiny at 224 px, batch 128, fine-tuned end to end ({groups['A']}): the best validation "
            "top-1, 90.00%; test 89.00%.") in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| cheapest to train (within 1 pt)")]
    assert len(rows) == 1 and groups["C"] in rows[0] and "train 5.0 min (0.0833 GPU-h)" in rows[0] and "3.3x less than the best pick" in rows[0]
    assert "resnet50 at 224 px" in markdown and "McNemar" in markdown and "within one standard deviation" in markdown


def test_one_config_that_answers_every_question_is_one_line(results, tmp_path, monkeypatch):
    """Within 0 pt of A only A remains: it is the best, the cheapest, the fastest and the smallest, said once."""
    root, groups = results
    monkeypatch.setattr(report_plots, "PLOTS", {})
    markdown = build_report(root, tmp_path / "out", budget=Budget(within_pts=0)).markdown.read_text()
    section = markdown[markdown.index("## Which should I pick?"):markdown.index("## Leaderboard")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| question", "| ---"))]
    assert len(rows) == 1 and groups["A"] in rows[0]
    assert rows[0].startswith("| all 4: best accuracy; cheapest to train, fastest to serve, smallest (within 0 pt) |")
    assert ("It is also the cheapest to train, fastest to serve and smallest within 0 pt: one config answers all 4 "
            "questions.") in section
    # Several configs answering: a row per question, as before.
    section = build_report(root, tmp_path / "out1").markdown.read_text().split("## Leaderboard")[0]
    assert "one config answers" not in section and section.count("| smallest (within 1 pt) |") == 1


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * GIB), ("512MiB", 512 * 2**20), ("8GB", 8 * 10**9), ("1.5 GiB", int(1.5 * GIB)), ("8gib", 8 * GIB),
    ("100kB", 100_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8", "eight", "8 GiB of VRAM", "0GiB", "-1GiB", "8GiBs", ""])
def test_parse_size_refuses_with_one_line(text):
    with pytest.raises(ReportError, match="--max-vram"):
        parse_size(text)


def test_bad_budget_on_the_command_line_is_one_error_line(results, tmp_path):
    root, _ = results
    out = CliRunner().invoke(main, ["report", "--results", str(root), "--out", str(tmp_path), "--max-vram", "8"])
    assert out.exit_code == 2 and out.output.startswith("error: --max-vram '8' is not a size")
    assert "Traceback" not in out.output and not (tmp_path / "leaderboard.md").exists()


# ---------------------------------------------------------------- bench results


def test_csv_round_trips_the_leaderboard(results, tmp_path):
    root, groups = results
    board = load(root).data.leaderboard
    path = tmp_path / "board.csv"
    out = CliRunner().invoke(main, ["results", "--results", str(root), "--format", "csv", "--out", str(path)])
    assert out.exit_code == 0, out.output
    back = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert len(back) == len(board) == 6 and list(back["config_id"]) == list(board["group_id"])
    numeric = ["val_mean", "val_std", "top1_mean", "top1_std", "train_s_mean", "train_hours", "infer_latency_ms_p50",
               "infer_images_per_s", "model_bytes", "peak_vram_train_bytes", "total_params", "p_holm", "rank", "n"]
    for column in numeric:
        mine = board[column].astype(float).to_numpy()
        theirs = back[RENAMED.get(column, column)].astype(float).to_numpy()
        np.testing.assert_array_equal(theirs, mine, err_msg=column)  # exactly: the CSV holds full precision
    assert list(back["vs_best"].fillna("")) == list(board["vs_best"])
    assert back.loc[0, "recommended"] == "best"
    assert set(back.loc[back["config_id"] == groups["C"], "recommended"]) == {"cheapest, fastest"}


def memory_rows(root: Path) -> dict[str, str]:
    """Two configs: one with every memory figure, one from before PSS and the per-process VRAM were recorded."""
    store, groups = ResultStore(root), {}
    figures = {"resnet18": dict(peak_host_pss_bytes=2 * GIB, peak_host_rss_bytes=5 * GIB,
                                peak_vram_process_bytes=int(8.6 * GIB), peak_vram_train_bytes=7 * GIB),
               "resnet50": dict(peak_host_rss_bytes=3 * GIB, peak_vram_train_bytes=5 * GIB)}
    for i, (model, memory) in enumerate(figures.items()):
        cell = Cell(suite="mem", dataset="cifar10", model=model)
        groups[model] = cell.group_id
        store.write({**cell.model_dump(), "freeze": "none", "run_id": "r1", "cell_id": cell.id,
                     "group_id": cell.group_id, "status": "ok", "top1": 0.8 + i / 100, "val_top1_best": 0.8 + i / 100,
                     "train_s": 100.0, "device": "cuda:0", "gpu_name": "NVIDIA H100 80GB HBM3", "started_at": T0,
                     "finished_at": T0, **memory}, [])
    return groups


def test_the_export_has_the_memory_figures_the_report_shows(tmp_path):
    """Host RAM as PSS (RSS only for an older row, flagged), VRAM on the card (the allocator's peak for an older
    row, flagged): the leaderboard's figures, not the raw RSS column."""
    from bench.report.export import leaderboard_frame

    groups = memory_rows(tmp_path / "results")
    frame = leaderboard_frame(load(tmp_path / "results").data).set_index("config_id")
    assert "peak_host_rss_bytes" not in frame
    new, old = frame.loc[groups["resnet18"]], frame.loc[groups["resnet50"]]
    assert (new["peak_host_bytes"], bool(new["host_rss_fallback"])) == (2 * GIB, False)
    assert (old["peak_host_bytes"], bool(old["host_rss_fallback"])) == (3 * GIB, True)
    assert (new["vram_card_bytes"], bool(new["vram_allocator_fallback"])) == (int(8.6 * GIB), False)
    assert (old["vram_card_bytes"], bool(old["vram_allocator_fallback"])) == (5 * GIB, True)


def test_the_vram_front_is_drawn_on_the_vram_the_budget_judges(tmp_path):
    """The VRAM plot's points are VRAM on the card, as --max-vram judges it, not the allocator's training peak."""
    import matplotlib as mpl

    from bench.report import fronts
    from bench.report.plotkit import RC

    memory_rows(tmp_path / "results")
    data = load(tmp_path / "results", budget=Budget(max_vram_bytes=8 * GIB)).data
    with mpl.rc_context(RC):
        fig = fronts.accuracy_vs_vram(data)
    ax = fig.axes[0]
    assert {round(float(x), 3) for c in ax.collections for x, _ in c.get_offsets()} == {8.6, 5.0}  # GiB
    (budget,) = [line for line in ax.lines if line.get_label() == "your budget"]
    assert budget.get_xdata()[0] == 8.0
    assert "VRAM on the card" in ax.get_xlabel() and "1 config(s) recorded before it" in ax.get_xlabel()


def mcnemar_holm(best: str, names: list[str]) -> dict[str, float]:
    """Exact two-sided McNemar p of each config against BEST on the same test images, Holm-adjusted over them
    (written here from the definitions, not with bench's statistics)."""
    right = {n: np.unpackbits(np.frombuffer(base64.b64decode(CONFIGS[n][7]), np.uint8))[:N_TEST].astype(bool)
             for n in names + [best]}
    raw = {}
    for n in names:
        b, c = int((right[best] & ~right[n]).sum()), int((~right[best] & right[n]).sum())
        raw[n] = min(1.0, 2 * sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c))
    adjusted, running = {}, 0.0
    for i, n in enumerate(sorted(names, key=raw.get)):
        running = max(running, min(1.0, (len(names) - i) * raw[n]))
        adjusted[n] = running
    return adjusted


def test_json_holds_the_same_numbers(results):
    root, groups = results
    out = CliRunner().invoke(main, ["results", "--results", str(root), "--format", "json"])
    assert out.exit_code == 0, out.output
    records = json.loads(out.output)
    order = sorted(CONFIGS, key=lambda n: -statistics.mean(CONFIGS[n][1]))  # ranked by mean validation top-1
    assert [r["config_id"] for r in records] == [groups[n] for n in order]
    assert [r["rank"] for r in records] == list(range(1, len(order) + 1))
    p = mcnemar_holm(order[0], [n for n in order[1:] if CONFIGS[n][7] is not None])
    for record, name in zip(records, order):
        fields, vals, top1, train_s, latency, params, _, _ = CONFIGS[name]
        train_mean = statistics.mean(train_s + seed for seed in range(len(vals)))  # write_configs adds the seed
        assert record == {**record, "model": fields["model"], "resolution": fields.get("resolution", 224),
                          "freeze": fields.get("freeze", "none"), "seeds": len(vals),
                          "val_top1_mean": pytest.approx(statistics.mean(vals)),
                          "val_top1_std": pytest.approx(statistics.stdev(vals)) if len(vals) > 1 else None,
                          "test_top1_mean": pytest.approx(top1), "train_s_mean": pytest.approx(train_mean),
                          "train_hours": pytest.approx(train_mean / 3600), "infer_latency_ms_p50": latency,
                          "infer_images_per_s": pytest.approx(1000 / latency), "total_params": params,
                          "model_bytes": 4 * params, "p_holm": pytest.approx(p[name], rel=1e-9, abs=0) if name in p else None}
        assert isinstance(record["rank"], int) and isinstance(record["model_bytes"], int)
    assert {r["config_id"]: r["recommended"] for r in records if r["recommended"]} == {
        groups["A"]: "best", groups["C"]: "cheapest, fastest", groups["D"]: "smallest"}


def test_results_table_lists_runs_and_cells(tmp_path):
    root = tmp_path / "results"
    store = ResultStore(root)
    for run, when, statuses in (("r1", T0, ("ok", "oom")), ("r2", T0 + dt.timedelta(days=1), ("ok", "ok"))):
        for seed, status in enumerate(statuses):
            cell = Cell(suite="s", dataset="cifar10", model="resnet18", seed=seed)
            store.write({**cell.model_dump(), "freeze": "none", "run_id": run, "cell_id": cell.id,
                         "group_id": cell.group_id, "status": status, "top1": 0.5 if status == "ok" else None,
                         "val_top1_best": 0.6 if status == "ok" else None, "train_s": 12.0, "wall_s": 20.0,
                         "started_at": when, "finished_at": when + dt.timedelta(minutes=5)}, [])
    out = CliRunner().invoke(main, ["results", "--results", str(root)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "2 run(s)" and lines[1].split() == ["suite", "run_id", "cells", "ok", "failed", "started",
                                                          "finished"]
    assert lines[2].split()[:5] == ["s", "r1", "2", "1", "1"] and lines[3].split()[:5] == ["s", "r2", "2", "2", "0"]
    cells = lines[lines.index("2 cell(s), the newest row of each") + 2:]
    assert [c.split()[1] for c in cells] == ["r2", "r2"] and all("50.00" in c and "12.0 s" in c for c in cells)
    only = CliRunner().invoke(main, ["results", "--results", str(root), "--run", "r1"])
    assert only.output.splitlines()[0] == "1 run(s)" and "oom" in only.output
    missing = CliRunner().invoke(main, ["results", "--results", str(root), "--suite", "nope"])
    assert missing.exit_code == 2 and missing.output.startswith("error: no results for suite 'nope'")


# ---------------------------------------------------------------- the leaderboard sorts in the browser


def test_leaderboard_sorts_by_any_column_in_a_browser(results, tmp_path, monkeypatch):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); the sorting script was not run")
    root, groups = results
    monkeypatch.setattr(report_plots, "PLOTS", {})
    page = build_report(root, tmp_path / "out").html.read_text()
    # Click "train time" twice, as a user would, and read the column back after each click.
    click = """<script>
    var table = document.querySelector("#leaderboard table"), heads = table.querySelectorAll("thead th");
    var col = Array.prototype.findIndex.call(heads, function (h) { return h.textContent.trim() === "train time"; });
    function column() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
      return r.cells[col].textContent; }).join("|"); }
    heads[col].click(); var up = column(); heads[col].click();
    document.title = up + " / " + column();
    </script></body>"""
    (tmp_path / "click.html").write_text(page.replace("</body>", click))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (tmp_path / "click.html").as_uri()],
                         check=True, capture_output=True, text=True, timeout=90).stdout
    title = dom.split("<title>")[1].split("</title>")[0]
    # E 50 s, C 300 s, B 600 s, D 800 s, A 1000 s, F 2000.5 s: seconds and minutes compared by value, not as text.
    ascending = "50.0 s|5.0 min|10.0 min|13.3 min|16.7 min|33.3 min"
    assert title == f"{ascending} / {'|'.join(reversed(ascending.split('|')))}"


def test_a_weights_file_is_named_by_its_file_in_words_not_its_folder():
    """The pick's sentence names a `weights: FILE` config by the file's name (its folder is a temporary or a
    user's path; the leaderboard's column keeps it whole)."""
    from bench.report.advice import describe

    row = pd.Series({"model": "timm:tf_efficientnet_lite1", "resolution": 96, "batch_size": 32, "freeze": "none",
                     "weights": "/tmp/bench-race-k5air67k/lite1.pth"})
    words = describe(row, ["weights"])
    assert words.endswith("weights lite1.pth") and "/tmp" not in words
    row["weights"] = "DEFAULT"  # a torchvision weights name is not a path: said as it is
    assert describe(row, ["weights"]).endswith("weights DEFAULT")
