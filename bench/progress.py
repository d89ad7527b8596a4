"""Progress while a suite runs. On a terminal: the suite's bar over cells, and one bar per running cell over its
steps (with `--gpus` several run at once; each cell's events carry its cell_id, so each moves its own bar), removed
when the cell finishes. Otherwise one plain line per finished cell, so CI logs stay readable."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from tqdm import tqdm


def label(cell: Mapping) -> str:
    """A cell in a few words: the fields that tell a suite's cells apart most often."""
    return f"{cell['model']} {cell['resolution']}px bs{cell['batch_size']} freeze={cell['freeze']} seed{cell['seed']}"


def describe(row: dict) -> str:
    """One line for a finished cell: what it was, how it ended, accuracy, time and memory."""
    what = label(row)
    if row["status"] != "ok":
        return f"{what}: {row['status']} ({row.get('error') or 'no message'})"
    parts = [f"top1 {row['top1']:.3f}" if row.get("top1") is not None else None,
             f"train {row['train_s']:.1f}s" if row.get("train_s") is not None else None,
             f"{row['images_per_s']:.0f} img/s" if row.get("images_per_s") else None,
             f"host {host / 2**30:.2f} GiB" if (host := row.get("peak_host_pss_bytes") or row.get("peak_host_rss_bytes"))
             else None,
             f"vram {row['peak_vram_allocated_bytes'] / 2**30:.2f} GiB" if row.get("peak_vram_allocated_bytes") else None]
    return f"{what}: ok, " + ", ".join(p for p in parts if p)


class Progress:
    """Turns the runner's events into bars (on a terminal) or lines. Events come from one relay thread per
    running cell, so `handle` takes a lock; each cell's bar is found by the cell_id its events carry."""

    def __init__(self, stream=None, cells: Iterable = ()):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.labels = {c.id: label(c.model_dump()) for c in cells}
        self.cells: tqdm | None = None  # the suite's bar, at the top
        self.running: dict[str, tqdm] = {}  # cell_id -> that cell's step bar, while it runs
        self.lines: dict[str, int] = {}  # cell_id -> its bar's line under the suite's (tqdm's position)
        self.done = self.total = 0
        self.lock = threading.Lock()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in [*self.running.values(), self.cells]:
            if bar is not None:
                bar.close()
        self.running.clear()
        self.lines.clear()

    def handle(self, event: dict) -> None:
        with self.lock:
            self._handle(event)

    def _handle(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "suite":
            self.total = event["total"]
            if self.tty:
                from tqdm import tqdm

                self.cells = tqdm(total=self.total, desc="cells", unit="cell", position=0, file=self.stream)
        elif kind == "start" and self.tty and event.get("cell_id"):
            self._start(event["cell_id"], event["total_steps"])
        elif kind in ("step", "epoch") and event.get("cell_id") in self.running:
            bar = self.running[event["cell_id"]]
            bar.n = event["step"]
            bar.refresh()
        elif kind == "cell_done":
            self._finished(event["row"])
        elif kind == "cell_paused":  # a race's rung: the cell goes on later, or is dropped, with its own line then
            self._remove(event.get("cell_id"))
        elif kind in ("warning", "race"):
            self._say(("warning: " if kind == "warning" else "") + event["text"])

    def _start(self, cell_id: str, total_steps: int) -> None:
        """A bar for the cell on the lowest free line under the suite's (a cell that starts again keeps its line)."""
        from tqdm import tqdm

        if cell_id in self.running:
            self.running.pop(cell_id).close()
        else:
            taken = set(self.lines.values())
            self.lines[cell_id] = next(i for i in range(1, len(taken) + 2) if i not in taken)
        self.running[cell_id] = tqdm(total=total_steps, desc=self.labels.get(cell_id, cell_id), unit="step",
                                     position=self.lines[cell_id], leave=False, file=self.stream)
        self._show_running()

    def _finished(self, row: dict) -> None:
        self.done += 1
        self._remove(row.get("cell_id"))
        if self.cells is not None:
            self.cells.update(1)
        self._say(f"[{self.done}/{self.total}] {describe(row)}")

    def _remove(self, cell_id: str | None) -> None:
        bar = self.running.pop(cell_id, None)
        self.lines.pop(cell_id, None)
        if bar is not None:
            bar.close()
        self._show_running()

    def _say(self, line: str) -> None:
        if self.cells is not None:
            self.cells.write(line, file=self.stream)
        else:
            click.echo(line, file=self.stream)

    def _show_running(self) -> None:
        if self.cells is not None:
            self.cells.set_postfix_str(f"{len(self.running)} running")
