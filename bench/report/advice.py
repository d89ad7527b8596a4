"""The report's answer to "which should I pick?" (its first section) and the per-class view of that pick.

The choices are made in `recommend` (on validation, within the budget); here they become words and tables.
"""

from __future__ import annotations

import pandas as pd

from bench.report import fmt, perclass, race
from bench.report.context import ReportData
from bench.report.fmt import Section
from bench.report.plots import make_plots
from bench.report.recommend import LIMITS, QUESTIONS, Advice

VAL = "val top-1 % (selects)"
TEST = "test top-1 % (reported)"
MAX_TIES = 8  # ties named in the text; the leaderboard marks every one


def describe(row: pd.Series, extra: list[str]) -> str:
    """A config in words: 'resnet18 at 128 px, batch 32, fine-tuned end to end, lr 0.01'."""
    parts = [f"{row['model']} at {fmt.text(row['resolution'])} px", f"batch {fmt.text(row['batch_size'])}",
             _freeze_words(str(row["freeze"]))]
    parts += [_field_words(c, row[c]) for c in extra if c in row.index]
    suite = f"{row['suite']}: " if "suite" in extra else ""
    return suite + ", ".join(p for p in parts if p)


def _freeze_words(freeze: str) -> str:
    if freeze == "none":
        return "fine-tuned end to end"
    if freeze == "all":
        return "linear probe (backbone frozen)"
    if freeze.lstrip("-").isdigit():
        return f"last {freeze} layers trained"
    try:
        return f"first {100 * float(freeze):.0f}% of the backbone frozen"
    except ValueError:
        return f"freeze {freeze}"


def _field_words(column: str, value: object) -> str:
    if column == "suite":
        return ""
    if column == "train_subset":
        return "all training images" if pd.isna(value) else f"{int(value):,} training images"
    if column == "epochs" and pd.notna(value):
        return f"{fmt.text(value)} epochs"
    if column == "pretrained" and pd.notna(value):
        return "pretrained" if bool(value) else "from scratch"
    if column == "weights" and isinstance(value, str) and "/" in value:
        return f"weights {value.rsplit('/', 1)[-1]}"  # a file's name reads; its folder is in the leaderboard's column
    return f"{column} {fmt.text(value)}"


def _hours(row: pd.Series) -> str:
    return f"{fmt.hours(row['train_hours'])} {row['train_device']}-h"


def _cost(key: str, row: pd.Series, best: pd.Series) -> str:
    """The figures a pick wins on, and how far it improves on the best pick."""
    if key == "best":
        figures = [f"train {fmt.seconds(row['train_s_mean'])} ({_hours(row)})"]
        if pd.notna(row["infer_latency_ms_p50"]):
            figures.append(f"{fmt.ms(row['infer_latency_ms_p50'])} at batch 1")
        if pd.notna(row["total_params"]):
            figures.append(f"{fmt.count(row['total_params'])} params")
        return ", ".join(figures)
    if key == "cheapest":
        text, ratio = f"train {fmt.seconds(row['train_s_mean'])} ({_hours(row)})", _ratio(best, row, "train_s_mean")
    elif key == "fastest":
        text = (f"{fmt.ms(row['infer_latency_ms_p50'])} at batch 1 (p95 {fmt.ms(row['infer_latency_ms_p95'])}), "
                f"{fmt.rate(row['infer_images_per_s'])} images/s at batch {fmt.text(row['batch_size'])}")
        ratio = _ratio(best, row, "infer_latency_ms_p50")
    else:
        vram = f", {fmt.nbytes(row['peak_vram_train_bytes'])} training VRAM" if pd.notna(row["peak_vram_train_bytes"]) else ""
        text = f"{fmt.count(row['total_params'])} params, {fmt.nbytes(row['model_bytes'])} of weights{vram}"
        ratio = _ratio(best, row, "total_params")
    if row["group_id"] == best["group_id"]:
        return f"{text}; the best pick itself"
    return f"{text}; {ratio:.1f}x less than the best pick" if ratio and ratio >= 1.05 else text


def _ratio(best: pd.Series, row: pd.Series, column: str) -> float | None:
    mine, theirs = row[column], best[column]
    return float(theirs) / float(mine) if pd.notna(mine) and pd.notna(theirs) and float(mine) > 0 else None


def _question(key: str, advice: Advice) -> str:
    title = _title(key)
    return title if key == "best" else f"{title} (within {advice.budget.within_pts:g} pt)"


def recommend(data: ReportData) -> Section:
    section = Section("recommend", "Which should I pick?")
    advice = data.advice
    if data.leaderboard.empty:
        return section.add("note", "No cell finished training successfully, so there is nothing to recommend yet.")
    if advice.ranked == 0:
        return section.add("note", "No config has validation accuracy (val_fraction 0, or none recorded): choosing "
                                   "among them would mean choosing on test, so nothing is recommended.")
    if advice.best is None:
        return _nothing_meets(section, data)
    best = advice.best
    alone = _one_answer(advice)  # one config answers every question: one row, not the same row four times
    columns = [
        ("question", lambda r: alone or _question(r["question"], advice), False),
        ("pick", lambda r: describe(r, data.extra), False),
        (VAL, lambda r: fmt.pct(r["val_mean"], r["val_std"]), True),
        (TEST, lambda r: fmt.pct(r["top1_mean"], r["top1_std"]), True),
        ("what it costs", lambda r: _cost(r["question"], r, best), False),
        ("config id", lambda r: fmt.text(r["group_id"]), False),
    ]
    within = f"Within your budget ({_limits_text(advice)}), pick" if advice.budget.limits() else "Pick"
    section.add("lead", f"{within} {_named(data, best)}: the best validation top-1, {fmt.pct(best['val_mean'])}%; "
                        f"test {fmt.pct(best['top1_mean'])}%." + _lead_alone(advice, alone) + _lead_ties(advice))
    picks = advice.picks.iloc[:1] if alone else advice.picks
    section.add("table", fmt.table("", picks, columns, css=lambda r: "near" if r["question"] == "best" else ""))
    for line in filter(None, [race.pick_note(data), _ties_note(data), *_unanswered(advice), _budget_note(data),
                              _datasets(data), _rules(advice)]):
        section.add("note", line)
    return section


def _one_answer(advice: Advice) -> str:
    """'all 4: best accuracy; cheapest to train, ...' when every answered question picks one config, else ""."""
    picks = advice.picks
    if len(picks) < 2 or picks["group_id"].nunique() > 1:
        return ""
    others = [_title(key) for key in picks["question"] if key != "best"]
    return (f"all {len(picks)}: best accuracy; {', '.join(others)} (within {advice.budget.within_pts:g} pt)")


def _lead_alone(advice: Advice, alone: str) -> str:
    if not alone:
        return ""
    others = [_title(key) for key in advice.picks["question"] if key != "best"]
    named = others[0] if len(others) == 1 else f"{', '.join(others[:-1])} and {others[-1]}"
    return (f" It is also the {named} within {advice.budget.within_pts:g} pt: one config answers all "
            f"{len(advice.picks)} questions.")


def _title(key: str) -> str:
    return next(q.title for q in QUESTIONS if q.key == key)


def _lead_ties(advice: Advice) -> str:
    n = len(advice.ties)
    return f" {n} other config{'s are' if n > 1 else ' is'} as good within noise (below)." if n else ""


def _named(data: ReportData, row: pd.Series) -> str:
    return f"{describe(row, data.extra)} ({row['group_id']})"


def _ties_note(data: ReportData) -> str:
    ties, best = data.advice.ties, data.advice.best
    if ties.empty:
        seeds = "" if best["n"] > 1 else " (one seed: no spread over seeds to judge a tie by)"
        return f"No other config is within noise of the best pick{seeds}."
    parts = []
    for rule, words in (("McNemar", "not significantly worse on the same test images (paired sign test, McNemar's "
                                    "with one seed, Holm-corrected; ≈ best in the leaderboard)"),
                        ("one std", "within one standard deviation over seeds on validation (no paired test data)")):
        rows = ties[ties["tie_rule"] == rule]
        if len(rows):
            named = "; ".join(_named(data, r) for _, r in rows.head(MAX_TIES).iterrows())
            more = f"; and {len(rows) - MAX_TIES} more" if len(rows) > MAX_TIES else ""
            parts.append(f"{words}: {named}{more}")
    return f"As good as the best pick, within noise ({len(ties)}): " + ". ".join(parts) + "."


def _unanswered(advice: Advice) -> list[str]:
    why = {"fastest": "no config within the margin recorded its inference latency (infer_bench off, or rows from "
                      "before bench measured it)",
           "smallest": "no config within the margin recorded its parameter count",
           "cheapest": "no config within the margin recorded its train time"}
    return [f"{_question(key, advice).capitalize()}: {why.get(key, reason)}." for key, reason in advice.unanswered.items()]


def _datasets(data: ReportData) -> str:
    ranked = data.leaderboard[data.leaderboard["rank"].notna()]
    names = sorted(ranked["dataset"].dropna().astype(str).unique()) if "dataset" in ranked else []
    if len(names) < 2:
        return ""
    return (f"These configs ran on {len(names)} datasets ({', '.join(names)}), ranked together: pass --suite to "
            "choose among the configs of one.")


def _limits_text(advice: Advice) -> str:
    units = {"max_vram_bytes": fmt.nbytes, "max_latency_ms": fmt.ms, "max_train_hours": lambda h: f"{h:g} device-h"}
    return ", ".join(f"{limit.what} ≤ {units[limit.option](value)} ({limit.flag})" for limit, value in advice.budget.limits())


def vram_card_text(row: pd.Series) -> str:
    """The VRAM figure --max-vram judges, said as what it is."""
    text = fmt.nbytes(row["vram_card_bytes"])
    return f"{text} (allocator's training peak: no per-process figure recorded)" if row["vram_allocator_fallback"] else text


def _vram_fallback_note(data: ReportData) -> str:
    """Which ranked configs --max-vram judges on the allocator's training peak, smaller than the card needs."""
    if data.advice.budget.max_vram_bytes is None:
        return ""
    ranked = data.leaderboard[data.leaderboard["rank"].notna()]
    older = int(ranked["vram_allocator_fallback"].fillna(False).astype(bool).sum())
    if not older:
        return ""
    return (f" --max-vram judges the VRAM the cell's process held on its GPU (NVML); {older} ranked config(s) "
            "recorded before that figure are judged on the allocator's training peak instead, which leaves out the "
            "CUDA context and the allocator's reserve (about 0.5 GB or more): they may need more than it says.")


def _budget_note(data: ReportData) -> str:
    advice = data.advice
    if not advice.budget.limits():
        return ""
    text = f"Budget: {_limits_text(advice)}. {advice.eligible} of {advice.ranked} ranked configs meet it."
    first = data.leaderboard.iloc[0]
    if advice.best["group_id"] != first["group_id"]:
        text += f" It leaves out the overall #1, {_named(data, first)}, at {fmt.pct(first['val_mean'])}% validation."
    return text + _vram_fallback_note(data)


def _nothing_meets(section: Section, data: ReportData) -> Section:
    advice = data.advice
    section.add("lead", f"No config meets your budget ({_limits_text(advice)}), so nothing is recommended.")
    text = ""
    if advice.closest is not None:
        row = advice.closest
        misses = []
        for limit, _ in advice.budget.limits():
            if limit.option in advice.excess:
                ratio = advice.excess[limit.option]
                misses.append(f"{limit.what} {_value(limit.option, row)} "
                              f"({'meets it' if ratio <= 1 else f'{ratio:.2f}x the limit'})")
        text = (f"The closest is {_named(data, row)}: {', '.join(misses)}; validation {fmt.pct(row['val_mean'])}%, "
                f"test {fmt.pct(row['top1_mean'])}%.")
    for column in advice.unknown:
        limit = next(lm for lm in LIMITS if lm.column == column)
        named = "peak_vram_process_bytes or peak_vram_train_bytes" if column == "vram_card_bytes" else column
        text += (f" No config recorded {named} ({limit.what}; CPU runs record no VRAM), so none is known to meet "
                 f"{limit.flag}.")
    text += _vram_fallback_note(data)
    return section.add("note", text.strip()).add("note", _rules(advice))


def _value(option: str, row: pd.Series) -> str:
    if option == "max_vram_bytes":
        return vram_card_text(row)
    if option == "max_latency_ms":
        return fmt.ms(row["infer_latency_ms_p50"])
    return f"{_hours(row)} ({fmt.seconds(row['train_s_mean'])})"


def _rules(advice: Advice) -> str:
    within = f"{advice.budget.within_pts:g}"
    return (f"How these are chosen: on validation top-1 (mean over seeds), among the leaderboard's configs "
            f"{'that meet the budget' if advice.budget.limits() else '(no budget given)'}; test is reported, never "
            f"used to choose. Best accuracy: the highest validation mean. The others: among configs whose validation "
            f"mean is within {within} pt of the best pick's (--within), the least train time (device-hours = train "
            f"time x 1 device), the lowest median latency at batch 1 (then the highest throughput), the fewest "
            f"parameters (then the smallest weights and training VRAM); ties go to the higher validation mean.")


def per_class(data: ReportData) -> Section:
    section = Section("per_class", "Per class: the recommended config")
    found = perclass.classes(data)
    if isinstance(found, str):
        section.add("note", f"No per-class view: {found}.")
    else:
        rows = perclass.worst(found)
        columns = [
            ("class", lambda r: fmt.text(r["class"]), False),
            ("test top-1 % (class)", lambda r: fmt.pct(r["top1"]), True),
            ("most often predicted instead", lambda r: r["mistaken_for"] or fmt.DASH, False),
            ("share of the class", lambda r: fmt.pct(r["mistaken_share"]), True),
            ("test images", lambda r: fmt.text(round(r["images"], 1)), True),
        ]
        who = f"{describe(found.config, data.extra)} ({found.config['group_id']}), {found.why}"
        if rows.empty:
            section.add("note", f"{who}: every test image of every class right ({found.seeds} seed(s)).")
        else:
            note = (f"{who}: the {len(rows)} of {len(found.names)} classes it gets most wrong on the test set, from "
                    f"its {found.seeds} seed(s)' confusion matrices summed (test images: per seed).")
            section.add("table", fmt.table("Classes it gets most wrong", rows, columns, note))
    for plot in make_plots(data, "per_class"):
        section.add("plot", plot)
    return section
