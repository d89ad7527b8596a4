"""Progress while a suite runs: a bar over cells and one over the current cell's steps on a
terminal; one plain line per finished cell otherwise, so CI logs stay readable."""

from __future__ import annotations

import sys
import threading

import click


def describe(row: dict) -> str:
    """One line for a finished cell: what it was, how it ended, accuracy, time and memory."""
    what = f"{row['model']} {row['resolution']}px bs{row['batch_size']} freeze={row['freeze']} seed{row['seed']}"
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
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.cells = self.steps = None
        self.done = self.total = 0
        self.lock = threading.Lock()  # events come from one relay thread per running cell

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        for bar in (self.steps, self.cells):
            if bar is not None:
                bar.close()

    def handle(self, event: dict) -> None:
        with self.lock:
            self._handle(event)

    def _handle(self, event: dict) -> None:
        kind = event.get("kind")
        if kind == "suite":
            self.total = event["total"]
            if self.tty:
                from tqdm import tqdm

                self.cells = tqdm(total=self.total, desc="cells", position=0, file=self.stream)
        elif kind == "start" and self.tty:
            from tqdm import tqdm

            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(total=event["total_steps"], desc="steps", position=1, leave=False, file=self.stream)
        elif kind in ("step", "epoch") and self.steps is not None:
            self.steps.n = event["step"]
            self.steps.refresh()
        elif kind == "cell_done":
            self.done += 1
            line = f"[{self.done}/{self.total}] {describe(event['row'])}"
            if self.cells is not None:
                self.cells.update(1)
                self.cells.set_postfix_str(line[:80])
                self.cells.write(line, file=self.stream)
            else:
                click.echo(line, file=self.stream)
