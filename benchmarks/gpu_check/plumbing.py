"""The GPU check's plumbing: what a step leaves, the run's context (commands under the step's deadline,
`bench run`), bench's rows, the children's environment, the CIFAR-10 JPEGs, the wheels, the payload, and the
helpers that turn rows into Markdown."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import table
from benchmarks.gpu_check.config import CHECKOUT, PAYLOAD_LIMIT_BYTES, TARBALL, Sizes


@dataclass
class Outcome:
    """What one step leaves: a status, one line why, Markdown figures, and the same figures as data."""

    status: str  # ok | failed | skipped | timeout
    note: str = ""
    body: str = ""
    figures: dict = field(default_factory=dict)
    goals: list[dict] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Proc:
    rc: int | None
    text: str
    timed_out: bool


@dataclass
class Context:
    """One check's run: where things go, the children's environment, and the clocks."""

    out: Path
    data: Path
    sizes: Sizes
    argv: list[str]
    env: dict
    deadline: float  # time.monotonic() by which the whole run must end
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    step: str = ""
    step_deadline: float = math.inf
    cifar: Path | None = None
    bench_ready: str | None = None  # None when bench imports; else why not
    modules: dict = field(default_factory=dict)  # module name: importable by the children
    gpu: dict = field(default_factory=dict)
    stop: str | None = None  # set when the remaining steps cannot mean anything (no CUDA on a GPU run)
    rows: list[dict] = field(default_factory=list)  # every bench row of this run, for the VRAM check
    commit: str = field(default_factory=lambda: git_head())

    @property
    def python(self) -> str:
        return sys.executable

    @property
    def results(self) -> Path:
        return self.out / "results"

    def left(self) -> float:
        return min(self.step_deadline, self.deadline) - time.monotonic()

    def run(self, label: str, argv: list[str]) -> Proc:
        """Run a command from the checkout with the step's time left; its output goes to logs/STEP-LABEL.log."""
        log = self.out / "logs" / f"{self.step}-{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        left = self.left()
        with open(log, "w") as fh:
            header = f"$ {shlex.join(argv)}\n"
            fh.write(header)
            fh.flush()
            if left < 2:
                fh.write("not started: the step's time budget is spent\n")
                return Proc(None, "", True)
            # Its own process group, so a timeout kills DataLoader workers too; bench's cell workers die
            # with their runner (PR_SET_PDEATHSIG).
            proc = subprocess.Popen(argv, cwd=CHECKOUT, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc, timed_out = proc.wait(timeout=left), False
            except subprocess.TimeoutExpired:
                rc, timed_out = None, True
            except KeyboardInterrupt:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
            if timed_out:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return Proc(rc, log.read_bytes()[len(header.encode()):].decode(errors="replace"), timed_out)

    def bench_run(self, label: str, suite: dict, extra: tuple[str, ...] = ()) -> tuple[Proc, list[dict]]:
        """Write SUITE to suites/, `bench run` it into results/, and return this run's rows in run order."""
        import yaml

        path = self.out / "suites" / f"{suite['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(suite, sort_keys=False))
        since = datetime.now(timezone.utc)
        argv = [self.python, "-m", "bench.cli", "run", str(path), "--results", str(self.results), "--data-root",
                str(self.data / "bench-data"), "--no-download", "--rerun", "--device", self.sizes.device,
                "--cell-timeout", str(self.sizes.cell_timeout_s), *extra]
        proc = self.run(label, argv)
        rows = read_rows(self.results, suite["name"], since)
        self.rows += rows
        return proc, rows


def read_rows(results: Path, suite: str, since: datetime, epochs: bool = False) -> list[dict]:
    """Rows (or epoch rows) of SUITE recorded since SINCE, oldest first, via bench's own reader."""
    from bench.store import ResultStore

    found = ResultStore(results).read()
    cells = found.cells
    if cells.empty:
        return []
    cells = cells[(cells["suite"] == suite) & (cells["started_at"] >= since)].sort_values("started_at")
    if not epochs:
        return cells.to_dict("records")
    frame = found.epochs
    keep = frame["run_id"].isin(cells["run_id"]) & frame["cell_id"].isin(cells["cell_id"])
    return frame[keep].sort_values(["cell_id", "epoch"]).to_dict("records")


def git_head() -> str:
    try:
        return subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here: name it when you paste)"


def child_env(sizes: Sizes) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(CHECKOUT), env.get("PYTHONPATH", "")] if p)
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # see bench/runner.py: spinning OpenMP threads on a shared machine
    env.setdefault("PYTHONUNBUFFERED", "1")
    if sizes.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on a GPU machine stays on the CPU, benchmarks included
    return env


# ---------------------------------------------------------------- setup


def find_tarball() -> Path | None:
    """The CIFAR-10 JPEG tarball: $BENCH_ASSETS, else the checkout's .data/, else ../shared/assets."""
    if os.environ.get("BENCH_ASSETS"):
        places = [Path(os.environ["BENCH_ASSETS"])]
    else:
        places = [CHECKOUT / ".data", CHECKOUT.parent / "shared" / "assets"]
    return next((p / TARBALL for p in places if (p / TARBALL).is_file()), None)


def wheels_dir() -> Path:
    return Path(os.environ.get("BENCH_WHEELS", CHECKOUT / ".whl"))


def unpack_cifar(tarball: Path, target: Path, per_class: tuple[int, int] | None) -> Path:
    """Unpack the JPEGs once (all, or the first N train and M test images per class) into TARGET."""
    if (target / "test").is_dir():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)

    def wanted(name: str) -> bool:
        parts = name.split("/")
        if per_class is None or len(parts) < 3:
            return True
        cap = per_class[0] if parts[0] == "train" else per_class[1]
        return parts[2].split(".")[0].isdigit() and int(parts[2].split(".")[0]) < cap

    if per_class is None and shutil.which("tar"):  # GNU tar: 3 s for the 60,000 files, Python's tarfile 20 s
        partial.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(partial)], check=True, timeout=300)
    else:
        with tarfile.open(tarball) as tar:
            members = [m for m in tar if wanted(m.name)]
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(partial, members=members, **kwargs)
    os.replace(partial, target)
    return target


def install_wheels(wheels: Path, target: Path, python: str) -> str:
    """Install every wheel in WHEELS into TARGET without the network; returns what was done, raises on failure."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise FileNotFoundError(f"no wheels in {wheels}: copy ../shared/gpu-wheels/*.whl there or set BENCH_WHEELS")
    target.mkdir(parents=True, exist_ok=True)
    argv = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
            "--target", str(target), *map(str, found)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if "No module named pip" in done.stderr:  # a wheel is a zip laid out for site-packages; these need no build
        for wheel in found:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        return f"pip is absent: unpacked {len(found)} wheels from {wheels} into {target}"
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise RuntimeError(f"pip could not install the wheels in {wheels} (a wheel for another Python?): "
                           f"{lines[-1] if lines else done.returncode}")
    return f"installed {len(found)} wheels from {wheels} into {target}"


def payload_bytes(tarball: Path | None, wheels: Path) -> dict:
    """What a GPU machine must be sent: the tracked files, the CIFAR-10 tarball and the wheels."""
    try:
        listed = subprocess.run(["git", "-C", str(CHECKOUT), "ls-files", "-z"], capture_output=True, timeout=30,
                                check=True).stdout.decode().split("\0")
        checkout = sum((CHECKOUT / p).stat().st_size for p in listed if p and (CHECKOUT / p).is_file())
    except (OSError, subprocess.SubprocessError):
        checkout = None  # no git here (a copied checkout): the figure comes from the machine that sent it
    parts = {"checkout_bytes": checkout, "tarball_bytes": tarball.stat().st_size if tarball else 0,
             "wheels_bytes": sum(p.stat().st_size for p in wheels.glob("*.whl")) if wheels.is_dir() else 0}
    total = sum(v or 0 for v in parts.values())
    return {**parts, "total_bytes": total, "limit_bytes": PAYLOAD_LIMIT_BYTES,
            "under_limit": total < PAYLOAD_LIMIT_BYTES}


# ---------------------------------------------------------------- helpers


def cells_status(proc: Proc | None, rows: list[dict], expected: int, bad: list[str]) -> str:
    if proc is not None and proc.timed_out and len(rows) < expected:
        return "timeout"
    return "ok" if len(rows) == expected and not bad else "failed"


def exit_problem(proc: Proc | None) -> list[str]:
    """Why a `bench run` ended badly (it exits 0 when cells fail: their rows say why)."""
    if proc is None or proc.rc == 0:
        return []
    return ["bench run ran past the step's budget" if proc.timed_out else f"bench run: {last_line(proc.text)}"]


def num(value) -> float | None:
    """A number from a row, or None for a missing value (pandas gives NaN or None)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def as_text(value) -> str:
    """A string from a row ('' for a missing value, which pandas gives as None or NaN)."""
    return value if isinstance(value, str) else ""


def gib(value: float | None) -> float | None:
    return None if value is None else round(value / 2**30, 3)


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def brief(r: dict) -> dict:
    return {"model": r["model"], "resolution": r["resolution"], "batch_size": r["batch_size"], "status": r["status"],
            "precision": r.get("precision"), "top1": num(r.get("top1")), "train_s": num(r.get("train_s")),
            "wall_s": num(r.get("wall_s")), "images_per_s": num(r.get("images_per_s")),
            "host_pss_GiB": gib(host_bytes(r)),
            "vram_alloc_GiB": gib(num(r.get("peak_vram_allocated_bytes")))}


def host_bytes(r: dict) -> float | None:
    """Peak host RAM as bench reports it: the process tree's PSS, RSS for rows from before PSS was recorded."""
    pss = num(r.get("peak_host_pss_bytes"))
    return pss if pss is not None else num(r.get("peak_host_rss_bytes"))


def goal(name: str, target: str, measured, met: bool | None) -> dict:
    return {"goal": name, "target": target, "measured": fmt(measured) if not isinstance(measured, str) else measured,
            "met": "n/a" if met is None else "yes" if met else "no"}


def md(rows: list[dict]) -> str:
    """A Markdown table of ROWS (columns of the first), with missing values left blank."""
    return table([{k: "" if v is None else v for k, v in r.items()} for r in rows], list(rows[0]))


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def tail(text: str, n: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])
