"""Progress (bench/progress.py): with several cells running at once (`--gpus`), each running cell has its own bar,
moved only by its own events (they carry its cell_id) and removed when it finishes, under the suite's bar; without a
terminal, one plain line per finished cell."""

from __future__ import annotations

import io
import re

from bench.progress import Progress, label
from bench.suite import Cell

A = Cell(model="tv:resnet18", resolution=32, batch_size=8)
B = Cell(model="tv:resnet50", resolution=64, batch_size=4, seed=1)
C = Cell(model="tv:mobilenet_v2", resolution=32, batch_size=8)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def row(cell: Cell, **extra) -> dict:
    return {**cell.model_dump(), "cell_id": cell.id, "status": "ok", "top1": 0.5, **extra}


def last_shown(stream: io.StringIO, cell: Cell) -> str:
    """What the terminal shows last on the cell's bar: the last redraw that starts with its label."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "\n", stream.getvalue())  # cursor moves between the bars' lines
    draws = [d for d in re.split(r"[\r\n]", text) if d.startswith(label(cell.model_dump()))]
    return draws[-1] if draws else ""


def test_interleaved_events_of_two_cells_move_their_own_bars():
    stream = Terminal()
    progress = Progress(stream, cells=[A, B, C])
    events = [{"kind": "suite", "total": 3, "skipped": 0},
              {"kind": "start", "total_steps": 100, "cell_id": A.id},
              {"kind": "start", "total_steps": 50, "cell_id": B.id},
              {"kind": "step", "step": 20, "cell_id": A.id},
              {"kind": "step", "step": 20, "cell_id": B.id},
              {"kind": "step", "step": 40, "cell_id": A.id},
              {"kind": "epoch", "step": 45, "cell_id": B.id, "epoch": 0},
              {"kind": "step", "step": 60, "cell_id": A.id}]
    with progress:
        for event in events:
            progress.handle(event)
        assert {cell_id: bar.n for cell_id, bar in progress.running.items()} == {A.id: 60, B.id: 45}
        assert progress.lines == {A.id: 1, B.id: 2}  # each on its own line under the suite's
        assert " 60/100 " in last_shown(stream, A) and " 45/50 " in last_shown(stream, B)

        progress.handle({"kind": "cell_done", "row": row(A)})
        assert set(progress.running) == {B.id} and progress.cells.n == 1
        progress.handle({"kind": "start", "total_steps": 10, "cell_id": C.id})
        progress.handle({"kind": "step", "step": 7, "cell_id": C.id})
        assert progress.lines == {B.id: 2, C.id: 1}  # the finished cell's line is reused
        assert progress.running[B.id].n == 45 and progress.running[C.id].n == 7
        assert "2 running" in stream.getvalue()
    assert "[1/3] tv:resnet18 32px bs8 freeze=none seed0: ok, top1 0.500" in stream.getvalue()


def test_events_of_a_cell_without_a_bar_move_no_other_bar():
    stream = Terminal()
    with Progress(stream, cells=[A]) as progress:
        progress.handle({"kind": "suite", "total": 2, "skipped": 0})
        progress.handle({"kind": "start", "total_steps": 100, "cell_id": A.id})
        progress.handle({"kind": "step", "step": 30, "cell_id": A.id})
        progress.handle({"kind": "step", "step": 80, "cell_id": "not-started"})
        assert progress.running[A.id].n == 30 and list(progress.running) == [A.id]
        assert progress.running[A.id].desc == label(A.model_dump())


def test_a_cell_started_again_keeps_its_line():
    with Progress(Terminal(), cells=[A, B]) as progress:
        for event in ({"kind": "suite", "total": 2, "skipped": 0}, {"kind": "start", "total_steps": 9, "cell_id": A.id},
                      {"kind": "start", "total_steps": 9, "cell_id": B.id}, {"kind": "step", "step": 5, "cell_id": A.id},
                      {"kind": "start", "total_steps": 9, "cell_id": A.id}):
            progress.handle(event)
        assert progress.lines == {A.id: 1, B.id: 2} and progress.running[A.id].n == 0


def test_without_a_terminal_one_plain_line_per_finished_cell():
    stream = io.StringIO()
    with Progress(stream, cells=[A, B]) as progress:
        for event in ({"kind": "suite", "total": 2, "skipped": 0}, {"kind": "start", "total_steps": 9, "cell_id": A.id},
                      {"kind": "step", "step": 5, "cell_id": A.id},
                      {"kind": "cell_done", "row": row(B, status="oom", error="CUDA out of memory")},
                      {"kind": "cell_done", "row": row(A)}):
            progress.handle(event)
        assert not progress.running
    assert stream.getvalue().splitlines() == [
        "[1/2] tv:resnet50 64px bs4 freeze=none seed1: oom (CUDA out of memory)",
        "[2/2] tv:resnet18 32px bs8 freeze=none seed0: ok, top1 0.500"]


def test_a_paused_cell_leaves_its_line_and_warnings_and_rungs_are_said():
    stream = Terminal()
    progress = Progress(stream, cells=[A, B])
    with progress:
        for event in ({"kind": "suite", "total": 2, "skipped": 0},
                      {"kind": "start", "total_steps": 10, "cell_id": A.id},
                      {"kind": "start", "total_steps": 10, "cell_id": B.id},
                      {"kind": "cell_paused", "cell_id": A.id},
                      {"kind": "race", "text": "race rung 1 of 2 (1 epoch): 1 of 2 configs go on"},
                      {"kind": "warning", "cell_id": B.id, "text": "saved state unreadable"}):
            progress.handle(event)
        assert list(progress.running) == [B.id] and progress.lines == {B.id: 2}
    shown = stream.getvalue()
    assert "race rung 1 of 2 (1 epoch): 1 of 2 configs go on" in shown and "warning: saved state unreadable" in shown
    plain = io.StringIO()
    with Progress(plain) as progress:
        progress.handle({"kind": "warning", "text": "the race log belongs to another race"})
    assert plain.getvalue() == "warning: the race log belongs to another race\n"
