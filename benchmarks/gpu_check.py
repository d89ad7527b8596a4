"""The GPU proof (issue #16): everything that needs a GPU, in one run that fits a short GPU window.

    python -m benchmarks.gpu_check [--out DIR]        # on a CUDA machine, from the checkout: at most 8 minutes
    python -m benchmarks.gpu_check --cpu --out DIR    # the rehearsal: the same steps with tiny sizes, on the CPU
    benchmarks/gpu_check.sh [...]                     # the same from any directory

Steps, in order: 0 setup (pydantic from wheels, the CIFAR-10 JPEGs, what is missing, the payload's size),
1 environment, 2 `pytest -m gpu`, 3 throughput beside published figures, 4 harness vs bare loop, 5 device
loader vs DataLoader, 6 real CIFAR-10 (ResNet-18 sanity run, ResNet-50 at 224 and 32 px, host RAM, VRAM),
7 a cell that runs out of memory, then one that must run. Each step has a time budget: past it, its
processes are killed, it is recorded as `timeout` with what it had measured, and the next step runs; a
failed step is recorded with its reason and the run goes on. `summary.md` and `summary.json` in the
output folder are rewritten after every step, so a run killed at any moment leaves what it measured.
Raw results: `results/` (bench's Parquet), `logs/` (every command's output), `raw/` (benchmark JSON),
`suites/` (the suite files run).

Only the standard library is imported up front: this file runs before pydantic is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import table

CHECKOUT = Path(__file__).resolve().parents[1]
PAYLOAD_LIMIT_BYTES = 64 * 2**20  # what a GPU machine gets copied: checkout + CIFAR-10 JPEGs + wheels
TARBALL = "cifar10-jpg.tar.gz"
GB = 1e9

# Published training throughput to read ours beside (never a pass/fail: other GPUs, precisions, batches, and
# timm's own implementations of the same architectures). timm: RTX 3090, AMP (fp16), channels_last, PyTorch
# 1.12, CUDA 11.3, each model at its own batch size, from huggingface/pytorch-image-models
# results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv (the same figures at commits 5e7d47ca105a and
# c865028c34fc; the file's newest training benchmark, and its channels_last one, as bench trains).
TIMM_RTX3090_FILE = "pytorch-image-models/results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv"
TIMM_RTX3090_AMP = {  # bench model: (timm model, train_samples_per_sec, train_batch_size)
    "tv:resnet50": ("resnet50", 1218.01, 512),
    "tv:efficientnet_b0": ("efficientnet_b0", 1751.72, 512),
    "tv:vit_b_16": ("vit_base_patch16_224", 392.99, 192),
    "tv:convnext_tiny": ("convnext_tiny", 819.24, 256),
}
# NVIDIA DeepLearningExamples (commit 291f0d02e815), PyTorch/Classification/ConvNets/resnet50v1.5/README.md,
# "Training performance: NVIDIA DGX A100 (8x A100 80GB)": 1 GPU, mixed precision, pytorch-21.03 NGC container,
# ImageNet through DALI.
NVIDIA_A100_RESNET50_AMP = 2470.0

# Modules bench needs to run cells, and what each is for; find_spec only, so probing them costs nothing.
NEEDED = {"torch": "everything", "torchvision": "backbones", "numpy": "data", "pandas": "results",
          "pyarrow": "results", "psutil": "host RAM", "click": "the bench command", "yaml": "suite files",
          "PIL": "image folders", "pydantic": "the suite schema"}
WANTED = {"pynvml": "the NVML VRAM column (nvidia-ml-py)", "pytest": "step 2 (pytest -m gpu)",
          "timm": "timm backbones (none used here)"}


@dataclass(frozen=True)
class Sizes:
    """What the GPU run and the CPU rehearsal do differently: sizes and budgets, never which steps run."""

    device: str
    total_s: float
    budgets_s: dict[str, float]
    throughput_models: tuple[str, ...]
    throughput: dict  # fields over suites/throughput.yaml's defaults
    harness: tuple[str, ...]  # benchmarks/harness_overhead.py arguments
    loader: tuple[str, ...]  # benchmarks/loader_throughput.py arguments
    cifar_per_class: tuple[int, int] | None  # (train, test) JPEGs per class to unpack; None: all 60,000
    sanity: dict  # the ResNet-18 cell at 32 px
    resnet50: dict  # the ResNet-50 cells at 224 and 32 px
    oom: dict  # a cell that must run out of memory
    after_oom: dict  # and one that must then run
    max_host_mem_gib: float | None  # the rehearsal's way to an oom row: the runner's host-RAM limit
    cell_timeout_s: float


GPU = Sizes(
    device="cuda",
    total_s=480,
    # Measured on an H200 (2026-11-27, benchmarks/RESULTS.md), each Python process with torch and CUDA costing
    # about 5 s: setup 4, env 15, throughput 3 cells in 102 s (EfficientNet-B0's cuDNN autotuning alone 39 s),
    # harness 36, loader 20, real 77 (15 epochs), oom 35. Limits sum to the 480 s at which the run is cut.
    budgets_s={"setup": 10, "env": 20, "pytest": 60, "throughput": 180, "harness": 45, "loader": 30, "real": 95,
               "oom": 40},
    throughput_models=("resnet50", "efficientnet_b0", "vit_b_16", "convnext_tiny"),
    # 20 warm-up + 100 timed steps, 224 px, bf16, channels_last: the suite's
    throughput={"batch_size": 256, "infer_budget_s": 2},
    harness=("--config", "tv:resnet50:224:128", "--config", "tv:resnet18:32:512", "--repeats", "3"),
    loader=(),  # 8,192 images, batch 128, a DataLoader with one worker per core
    cifar_per_class=None,
    sanity={"model": "resnet18", "resolution": 32, "batch_size": 512, "epochs": 25, "lr": 0.2},  # 15: 0.791
    resnet50={"model": "resnet50", "batch_size": 128, "epochs": 1, "steps": 40, "test_subset": 2000},
    # ResNet-152 at 224 px in fp32 saves 281 MiB of activations per image for the backward pass (counted on
    # the CPU with saved-tensor hooks): 1,024 images need 281 GiB, twice an H200's 141 GB, with no tensor
    # past 2^31 elements (so no 32-bit-indexing error can come first). Synthetic data has 1,800 training images.
    oom={"model": "resnet152", "resolution": 224, "batch_size": 1024, "precision": "fp32",
         "throughput_warmup_steps": 1, "throughput_steps": 1},
    after_oom={"model": "resnet18", "resolution": 32, "batch_size": 128, "throughput_warmup_steps": 2,
               "throughput_steps": 5},
    max_host_mem_gib=None,
    cell_timeout_s=75,
)

CPU = Sizes(
    device="cpu",
    total_s=900,
    budgets_s={"setup": 60, "env": 60, "pytest": 90, "throughput": 150, "harness": 90, "loader": 90, "real": 180,
               "oom": 120},
    throughput_models=("resnet50",),
    # bf16 is about 14x slower than fp32 on this kind of CPU (benchmarks/RESULTS.md)
    throughput={"batch_size": 2, "resolution": 64, "throughput_warmup_steps": 1, "throughput_steps": 2,
                "precision": "fp32"},
    harness=("--config", "tv:resnet50:32:2", "--config", "tv:resnet18:32:8", "--repeats", "1", "--warmup", "1",
             "--steps", "2"),
    loader=("--images", "128", "--batch-size", "16", "--workers", "2"),
    cifar_per_class=(60, 20),
    sanity={"model": "resnet18", "resolution": 32, "batch_size": 16, "epochs": 2, "steps": 3, "test_subset": 32},
    resnet50={"model": "resnet50", "batch_size": 2, "epochs": 1, "steps": 1, "test_subset": 8},
    oom={"model": "resnet152", "resolution": 224, "batch_size": 16, "precision": "fp32",
         "throughput_warmup_steps": 1, "throughput_steps": 1},
    after_oom={"model": "resnet18", "resolution": 32, "batch_size": 8, "throughput_warmup_steps": 1,
               "throughput_steps": 2},
    max_host_mem_gib=2.0,  # a worker with torch loaded holds about 1.1 GiB; ResNet-152 at batch 16 wants 4.5 GiB more
    cell_timeout_s=150,
)


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


def probe_modules(ctx: Context) -> dict:
    """Which modules the children can import, and whether bench itself imports (one subprocess)."""
    code = ("import importlib.util as u, json\nnames = %r\nfound = {m: u.find_spec(m) is not None for m in names}\n"
            "try:\n    import bench.runner, bench.validate\n    err = None\nexcept Exception as e:\n"
            "    err = f'{type(e).__name__}: {e}'\nprint(json.dumps({'found': found, 'bench': err}))")
    done = subprocess.run([ctx.python, "-c", code % [*NEEDED, *WANTED]], cwd=CHECKOUT, env=ctx.env,
                          capture_output=True, text=True, timeout=max(5, ctx.left()))
    return json.loads(done.stdout.strip().splitlines()[-1])


def step_setup(ctx: Context) -> Outcome:
    notes, lines = [], []
    probe = probe_modules(ctx)
    need = [m for m in ("pydantic", "pytest") if not probe["found"][m]]  # what $BENCH_WHEELS is for
    if need:
        site = Path(tempfile.gettempdir()) / f"bench-gpu-check-site-py{sys.version_info[0]}{sys.version_info[1]}"
        try:
            lines.append(f"{' and '.join(need)} missing: " + install_wheels(wheels_dir(), site, ctx.python))
            ctx.env["PYTHONPATH"] = os.pathsep.join([str(site), ctx.env["PYTHONPATH"]])
            sys.path.insert(0, str(site))
            probe = probe_modules(ctx)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            lines.append(f"{' and '.join(need)} missing and not installed: {exc}")
            notes += lines[-1:] if "pydantic" in need else []
    else:
        lines.append("pydantic and pytest are importable: no wheels needed")
    ctx.modules = probe["found"]
    missing = [f"{m} ({why})" for m, why in {**NEEDED, **WANTED}.items() if not probe["found"][m]]
    lines.append("missing: " + ("; ".join(missing) if missing else "nothing"))
    ctx.bench_ready = probe["bench"]
    if ctx.bench_ready:
        notes.append(f"bench does not import: {ctx.bench_ready}")
        lines.append(notes[-1])
    tarball = find_tarball()
    if tarball:
        name = "cifar10-jpg" if ctx.sizes.cifar_per_class is None else "cifar10-jpg-%dx%d" % ctx.sizes.cifar_per_class
        ctx.cifar = unpack_cifar(tarball, ctx.data / name, ctx.sizes.cifar_per_class)
        ctx.env["BENCH_CIFAR_JPG"] = str(ctx.cifar)  # benchmarks/common.py's cifar_folder() takes it as is
        lines.append(f"CIFAR-10 JPEGs: {tarball} unpacked into {ctx.cifar}")
    else:
        lines.append(f"CIFAR-10 JPEGs: {TARBALL} not found in $BENCH_ASSETS, .data/ or ../shared/assets: step 6 skips")
    payload = payload_bytes(tarball, wheels_dir())
    size = "unknown (no git here)" if payload["checkout_bytes"] is None else f"{payload['total_bytes'] / 2**20:.1f} MiB"
    lines.append(f"payload to copy to a GPU machine (git ls-files + tarball + wheels): {size} of 64 MiB")
    for extra in (".data", ".whl"):  # what a copy of these folders would carry beyond the tarball and the wheels
        held = sum(f.stat().st_size for f in (CHECKOUT / extra).rglob("*") if f.is_file() and f.suffix not in
                   (".gz", ".whl")) if (CHECKOUT / extra).is_dir() else 0
        if held > 2**20:
            lines.append(f"warning: {extra}/ holds {held / 2**20:.0f} MiB besides the tarball and wheels; "
                         "copy only those")
    status = "failed" if ctx.bench_ready else "ok"
    return Outcome(status, "; ".join(notes) or lines[0], "\n".join(f"- {ln}" for ln in lines),
                   {"missing": missing, "payload": payload, "cifar": str(ctx.cifar) if ctx.cifar else None})


# ---------------------------------------------------------------- 1, 2: environment and GPU tests

TORCH_PROBE = """import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                bf16=torch.cuda.is_bf16_supported(), gpus=torch.cuda.device_count())
print(json.dumps(info), flush=True)
from bench.cli import main  # `bench env` itself, in the same process: one torch import instead of two
main(["env"], standalone_mode=False)"""


def step_env(ctx: Context) -> Outcome:
    parts, notes = [], []
    smi = shutil.which("nvidia-smi")
    if smi:
        parts.append(f"```\n{ctx.run('nvidia-smi', [smi]).text.strip()}\n```")
    else:
        notes.append("nvidia-smi not found (no NVIDIA driver)")
    env = ctx.run("torch-and-bench-env", [ctx.python, "-c", TORCH_PROBE])
    lines = env.text.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.startswith('{"torch"')), None)
    if at is None:
        return Outcome("failed", f"torch does not import: {last_line(env.text)}", f"```\n{tail(env.text, 15)}\n```")
    ctx.gpu = json.loads(lines[at])
    parts += [md([ctx.gpu]), "`bench env`:\n```\n" + "\n".join(lines[:at] + lines[at + 1:]).strip() + "\n```"]
    if env.rc != 0:
        notes.append(f"bench env failed: {last_line(env.text)}")
    if ctx.sizes.device == "cuda" and not ctx.gpu["cuda_available"]:
        ctx.stop = "torch sees no CUDA device; run with --cpu for the rehearsal"
        return Outcome("failed", ctx.stop, "\n\n".join(parts), ctx.gpu)
    where = ctx.gpu.get("gpu") or "CPU only (rehearsal)"
    return Outcome("failed" if env.rc else "ok", "; ".join([where, *notes]), "\n\n".join(parts), ctx.gpu)


def step_pytest(ctx: Context) -> Outcome:
    if not ctx.modules.get("pytest"):
        return Outcome("skipped", "pytest is not installed: put its wheels (pytest, pluggy, iniconfig, packaging) "
                                  "in $BENCH_WHEELS")
    # Only the modules holding GPU tests: collecting all of them imports Ray, timm and more (about 14 s).
    files = sorted(str(p.relative_to(CHECKOUT)) for p in (CHECKOUT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    proc = ctx.run("pytest", [ctx.python, "-m", "pytest", "-m", "gpu", "-v", "--durations=5", "-p", "no:cacheprovider",
                              *(files or ["tests"])])
    final = last_line(proc.text)  # pytest's last line: "1 passed, 449 deselected in 9.53s"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", final)}
    body = f"```\n{tail(proc.text, 25)}\n```"
    if proc.timed_out:
        return Outcome("timeout", "pytest ran past its budget", body, counts)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "deselected")
    if proc.rc != 0:
        return Outcome("failed", summary or final, body, counts)
    if ctx.sizes.device == "cuda" and not counts.get("passed"):
        return Outcome("failed", f"no GPU test ran ({summary})", body, counts)
    note = summary if ctx.sizes.device == "cuda" else f"{summary} (rehearsal: GPU tests skip without CUDA)"
    return Outcome("ok", note, body, counts)


# ---------------------------------------------------------------- 3: throughput


def step_throughput(ctx: Context) -> Outcome:
    """suites/throughput.yaml narrowed to four backbones; a model that runs out of memory is tried at half
    the batch (the largest that fits), while the step has time."""
    pending, batch, rows, proc = list(ctx.sizes.throughput_models), ctx.sizes.throughput["batch_size"], [], None
    smallest, ooms = max(1, batch // 8), []
    while pending and batch >= smallest and ctx.left() > 10:
        proc, got = ctx.bench_run(f"bs{batch}", throughput_suite(ctx.sizes, pending, batch))
        rows += [r for r in got if r["status"] != "oom"]
        ooms = [r for r in got if r["status"] == "oom"]
        pending = [r["model"].split(":", 1)[-1] for r in ooms]
        batch //= 2
    rows += ooms  # out of memory down to the smallest batch tried: shown, not dropped
    table_rows = [throughput_row(r) for r in rows]
    body = md(table_rows) if table_rows else f"no rows\n\n```\n{tail(proc.text if proc else '', 15)}\n```"
    body += (f"\n\ntimm: `{TIMM_RTX3090_FILE}` (RTX 3090, AMP fp16, channels_last, PyTorch 1.12, its own batch size);"
             f" NVIDIA: DeepLearningExamples ResNet-50 v1.5, 1x A100 80GB, AMP, {NVIDIA_A100_RESNET50_AMP:.0f} img/s.")
    bad = [f"{r['model']}: {r['status']} ({as_text(r.get('error'))})" for r in rows if r["status"] != "ok"]
    bad += exit_problem(proc)
    status = cells_status(proc, rows, len(ctx.sizes.throughput_models), bad)
    rates = ", ".join(f"{r['model']} {r['images_per_s']:.0f}" for r in table_rows if r["images_per_s"])
    return Outcome(status, "; ".join(bad) or f"images/s: {rates}", body, {"rows": table_rows})


def throughput_suite(sizes: Sizes, models: list[str], batch: int) -> dict:
    """suites/throughput.yaml with its models narrowed and its batch (and the rehearsal's sizes) set."""
    import yaml

    base = yaml.safe_load((CHECKOUT / "suites" / "throughput.yaml").read_text())
    defaults = {**base["defaults"], **sizes.throughput, "batch_size": batch}
    return {**base, "name": f"gpu_check_throughput_bs{batch}", "defaults": defaults, "grid": {"model": list(models)}}


def throughput_row(r: dict) -> dict:
    ref = TIMM_RTX3090_AMP.get(r["model"])
    rate = num(r.get("images_per_s"))
    row = {"model": r["model"], "status": r["status"], "batch_size": r["batch_size"], "precision": r["precision"],
           "images_per_s": rate, "warmup_s": num(r.get("warmup_s")),
           "timm_3090_amp_img_s": f"{ref[1]:.0f} ({ref[0]}, bs {ref[2]})" if ref else None,
           "x_3090": rate / ref[1] if ref and rate else None}
    if r["model"] == "tv:resnet50":
        row["x_a100_2470"] = rate / NVIDIA_A100_RESNET50_AMP if rate else None
    return row


# ---------------------------------------------------------------- 4, 5: harness and loader benchmarks


def step_benchmark(ctx: Context, module: str, args: tuple[str, ...]) -> tuple[Proc, dict | None]:
    out = ctx.out / "raw" / f"{module}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = ctx.run(module, [ctx.python, "-m", f"benchmarks.{module}", *args, "--json", str(out)])
    return proc, json.loads(out.read_text()) if out.is_file() else None


def no_figures(proc: Proc) -> Outcome:
    return Outcome("timeout" if proc.timed_out else "failed", last_line(proc.text), f"```\n{tail(proc.text, 15)}\n```")


def step_harness(ctx: Context) -> Outcome:
    proc, found = step_benchmark(ctx, "harness_overhead", ctx.sizes.harness)
    if not found:
        return no_figures(proc)
    rows = found["rows"]
    goals = [goal(f"harness/bare, {r['model']} {r['resolution']} px bs {r['batch_size']} {r['precision']}",
                  ">= 0.95", r["ratio"], r["ratio"] >= 0.95) for r in rows]
    body = md(rows) + (f"\n\n{found['device']}, {found['timed_steps']} timed steps after {found['warmup_steps']}, "
                       f"{found['repeats']} interleaved pairs; ratio = median of pairs")
    return Outcome("ok", f"min ratio {min(r['ratio'] for r in rows):.3f}", body, found, goals)


def step_loader(ctx: Context) -> Outcome:
    proc, found = step_benchmark(ctx, "loader_throughput", ctx.sizes.loader)
    if not found:
        return no_figures(proc)
    rows = found["rows"]
    body = md(rows) + (f"\n\n{found['device']}, {found['source']}, {found['images']} images, batch "
                       f"{found['batch_size']}, DataLoader with {found['workers']} workers")
    note = ", ".join(f"{r['resolution']} px x{r['ratio']:.1f}" for r in rows)
    return Outcome("ok", f"device loader / DataLoader: {note}", body, found)


# ---------------------------------------------------------------- 6: real data


def step_real(ctx: Context) -> Outcome:
    if ctx.cifar is None:
        return Outcome("skipped", f"the CIFAR-10 JPEGs ({TARBALL}) are absent: copy it into .data/ or set BENCH_ASSETS")
    suite = real_suite(ctx.sizes, ctx.cifar)
    cells = suite["include"]
    since = datetime.now(timezone.utc)
    proc, rows = ctx.bench_run("cifar10", suite)
    if len(rows) < len(cells) or any(r["status"] != "ok" for r in rows):
        bad = [f"{r['model']} {r['resolution']} px: {r['status']} ({as_text(r.get('error'))})" for r in rows
               if r["status"] != "ok"]
        bad += [] if len(rows) == len(cells) else [f"{len(rows)} of {len(cells)} cells recorded"]
        bad += exit_problem(proc)
        status = "timeout" if proc.timed_out else "failed"
    else:
        bad, status = [], "ok"
    epochs = read_rows(ctx.results, suite["name"], since, epochs=True)
    sections, goals = real_sections(rows, epochs, ctx.rows)
    if not rows:
        sections += f"\n\n```\n{tail(proc.text, 15)}\n```"
    note = "; ".join(bad) or f"{len(rows)} cells ok"
    return Outcome(status, note, sections, {"rows": [brief(r) for r in rows]}, goals)


def real_suite(sizes: Sizes, folder: Path) -> dict:
    """The ResNet-18 sanity cell, then ResNet-50 at 224 and at 32 px, on the CIFAR-10 JPEGs in FOLDER."""
    r50 = sizes.resnet50
    cells = [dict(sizes.sanity), {**r50, "resolution": 224}, {**r50, "resolution": 32}]
    return {"name": "gpu_check_real", "description": "issue 16: real CIFAR-10 JPEGs",
            "dataset": f"imagefolder:{folder}", "defaults": {"pretrained": False}, "include": cells}


def real_sections(rows: list[dict], epochs: list[dict], every: list[dict]) -> tuple[str, list[dict]]:
    """The sanity run, the ResNet-50 pair and host RAM from this step's rows; VRAM from every ok row so far."""
    goals, parts = [], []
    sanity = next((r for r in rows if r["model"] == "tv:resnet18"), None)
    if sanity:
        curve = [e for e in epochs if e["cell_id"] == sanity["cell_id"]]
        clock, reached = 0.0, None
        for e in curve:
            clock += num(e.get("epoch_s")) or 0.0
            if reached is None and (num(e.get("val_top1")) or 0) >= 0.80:
                reached = (int(e["epoch"]), clock)
        top1, train_s = num(sanity.get("top1")), num(sanity.get("train_s"))
        goals.append(goal("ResNet-18 from scratch, 32 px: test top-1 in under 60 s of training", ">= 0.80, < 60 s",
                          f"{fmt(top1)} in {fmt(train_s)} s", bool(top1 and train_s and top1 >= 0.80 and train_s < 60)))
        line = f"validation passed 0.80 after epoch {reached[0]}, {reached[1]:.1f} s of epochs" if reached else \
            "validation never reached 0.80"
        parts.append("### ResNet-18 from scratch at 32 px (sanity)\n\n" + md([brief(sanity)])
                     + f"\n\n{line}; per epoch val_top1: " + ", ".join(fmt(num(e.get('val_top1'))) for e in curve))
    pair = {r["resolution"]: r for r in rows if r["model"] == "tv:resnet50"}
    if pair:
        parts.append("### ResNet-50 at 224 and 32 px (every image of the folder loaded, 60,000 on a GPU run; "
                     "a few steps)\n\n" + md([brief(r) for r in pair.values()]))
    if 32 in pair and 224 in pair:
        low, high = num(pair[32].get("peak_host_rss_bytes")), num(pair[224].get("peak_host_rss_bytes"))
        if low and high:
            goals.append(goal("peak host RAM, 224 px / 32 px (ResNet-50)", "<= 1.10", high / low, high / low <= 1.10))
            goals.append(goal("peak host RAM at 224 px", "< 2.5 GB", f"{high / GB:.2f} GB", high < 2.5 * GB))
    parts.append("### Peak VRAM of every ok cell so far: allocator allocated and reserved, NVML (whole device)\n\n"
                 + vram_table([r for r in every if r["status"] == "ok"], goals))
    return "\n\n".join(parts), goals


def vram_table(rows: list[dict], goals: list[dict]) -> str:
    out, verdicts = [], []
    for r in rows:  # NVML counts the CUDA context too and is sampled every 50 ms: a short peak can slip by
        a, res, n = (num(r.get(f"peak_vram_{k}_bytes")) for k in ("allocated", "reserved", "nvml"))
        ordered = None if None in (a, res, n) else a <= res <= n
        verdicts.append(ordered)
        out.append({"suite": r["suite"], "model": r["model"], "resolution": r["resolution"],
                    "batch_size": r["batch_size"], "allocated_GiB": gib(a), "reserved_GiB": gib(res),
                    "nvml_GiB": gib(n), "allocated<=reserved<=nvml": "n/a" if ordered is None else ordered})
    known = [v for v in verdicts if v is not None]
    goals.append(goal("VRAM allocated <= reserved <= NVML, every cell", "all cells", f"{sum(known)} of {len(known)}",
                      all(known) if known else None))
    return md(out) if out else "no rows"


# ---------------------------------------------------------------- 7: out of memory, then the next cell


def step_oom(ctx: Context) -> Outcome:
    limit = ctx.sizes.max_host_mem_gib
    proc, rows = ctx.bench_run("oom", oom_suite(ctx.sizes), ("--max-host-mem", str(limit)) if limit else ())
    how = (f"CPU rehearsal: no GPU to exhaust, so the runner's host-RAM limit (--max-host-mem {limit} GiB) makes the "
           f"oom row" if limit else "GPU memory exhausted by the first cell")
    table_rows = [{**brief(r), "error": as_text(r.get("error"))[:120]} for r in rows]
    body = (md(table_rows) if table_rows else f"no rows\n\n```\n{tail(proc.text, 15)}\n```") + f"\n\n{how}."
    statuses = [r["status"] for r in rows]
    status = "ok" if statuses == ["oom", "ok"] else ("timeout" if proc.timed_out else "failed")
    note = "; ".join([f"statuses in run order: {statuses}", how, *exit_problem(proc)])
    return Outcome(status, note, body, {"rows": table_rows, "statuses": statuses})


def oom_suite(sizes: Sizes) -> dict:
    return {"name": "gpu_check_oom", "description": "issue 16: a cell that runs out of memory, then one that runs",
            "dataset": "synthetic", "defaults": {"pretrained": False, "mode": "throughput"},
            "include": [dict(sizes.oom), dict(sizes.after_oom)]}


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
            "host_rss_GiB": gib(num(r.get("peak_host_rss_bytes"))),
            "vram_alloc_GiB": gib(num(r.get("peak_vram_allocated_bytes")))}


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


# ---------------------------------------------------------------- the run and its summary


@dataclass(frozen=True)
class Step:
    key: str
    title: str
    run: Callable[[Context], Outcome]
    needs_bench: bool = True


STEPS = [
    Step("setup", "0. Setup: wheels, data, what is missing", step_setup, needs_bench=False),
    Step("env", "1. Environment", step_env, needs_bench=False),
    Step("pytest", "2. pytest -m gpu", step_pytest),
    Step("throughput", "3. Throughput (suites/throughput.yaml, 224 px, bf16, channels_last)", step_throughput),
    Step("harness", "4. Harness vs bare training loop", step_harness),
    Step("loader", "5. Device loader vs DataLoader", step_loader),
    Step("real", "6. Real data: CIFAR-10 JPEGs", step_real),
    Step("oom", "7. Out of memory, then the next cell", step_oom),
]


def run_step(ctx: Context, step: Step) -> Outcome:
    """One step inside its budget; whatever goes wrong becomes the step's recorded reason, never the run's end."""
    if ctx.stop:
        return Outcome("skipped", ctx.stop)
    if step.needs_bench and ctx.bench_ready:
        return Outcome("skipped", f"bench does not import ({ctx.bench_ready}); see step 0")
    ctx.step = step.key
    ctx.step_deadline = time.monotonic() + ctx.sizes.budgets_s[step.key]
    if ctx.left() < 5:
        return Outcome("skipped", "the run's time budget is spent")
    t0 = time.monotonic()
    try:
        outcome = step.run(ctx)
    except Exception as exc:  # noqa: BLE001 - a broken step is recorded with its reason; the next one runs
        outcome = Outcome("failed", f"{type(exc).__name__}: {exc}"[:300])
    outcome.seconds = time.monotonic() - t0
    return outcome


def write_summary(ctx: Context, outcomes: dict[str, Outcome], running: str | None = None) -> None:
    """summary.md (to paste into benchmarks/RESULTS.md) and summary.json, replaced atomically."""
    elapsed = (datetime.now(timezone.utc) - ctx.started).total_seconds()
    where = ctx.gpu.get("gpu") or ("CPU rehearsal" if ctx.sizes.device == "cpu" else "GPU not yet known")
    head = [f"# GPU check: {where}, {ctx.started:%Y-%m-%d}", "",
            f"- command: `{shlex.join(ctx.argv)}`",
            f"- mode: {'GPU run' if ctx.sizes.device == 'cuda' else 'CPU rehearsal (tiny sizes: not GPU figures)'}, "
            f"budget {ctx.sizes.total_s:.0f} s; started {ctx.started:%Y-%m-%d %H:%M:%S} UTC, {elapsed:.0f} s so far",
            f"- torch {ctx.gpu.get('torch', '?')}, CUDA {ctx.gpu.get('cuda', '?')}, cuDNN {ctx.gpu.get('cudnn', '?')}, "
            f"GPU memory {ctx.gpu.get('gpu_memory_gib', 'n/a')} GiB; commit {ctx.commit}", ""]
    rows = []
    for step in STEPS:
        o = outcomes.get(step.key)
        status = o.status if o else "running" if step.key == running else "not run"
        rows.append({"step": step.title.split(":")[0], "status": status, "seconds": round(o.seconds, 1) if o else "",
                     "budget_s": ctx.sizes.budgets_s[step.key], "note": (o.note if o else "").replace("|", "/")})
    goals = [g for o in outcomes.values() for g in o.goals]
    body = head + [md(rows), ""]
    if goals:
        body += ["## Goals", "", md(goals), ""]
    for step in STEPS:
        if step.key in outcomes and outcomes[step.key].body:
            body += [f"## {step.title}", "", outcomes[step.key].body, ""]
    atomic_write(ctx.out / "summary.md", "\n".join(body))
    data = {"mode": ctx.sizes.device, "started": ctx.started.isoformat(), "elapsed_s": elapsed, "running": running,
            "budget_s": ctx.sizes.total_s, "budgets_s": ctx.sizes.budgets_s, "gpu": ctx.gpu,
            "steps": {k: dataclasses.asdict(o) for k, o in outcomes.items()}}
    atomic_write(ctx.out / "summary.json", json.dumps(data, indent=1, default=str))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the rehearsal: the same steps with tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, help="output folder (default: $OUT, else results/gpu_check/<time>)")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "bench-gpu-check-data",
                        help="where the CIFAR-10 JPEGs are unpacked and decoded (default: a temporary folder, so "
                             ".data/ keeps only the tarball that is copied to a GPU machine)")
    parser.add_argument("--steps", help="run only these steps (setup and env always run), e.g. throughput,real: for a "
                                        "second window; keys: " + ", ".join(s.key for s in STEPS))
    args = parser.parse_args(argv)
    chosen = set(args.steps.split(",")) if args.steps else {s.key for s in STEPS}
    unknown = chosen - {s.key for s in STEPS}
    if unknown:
        parser.error(f"--steps: unknown {', '.join(sorted(unknown))}; choose from {', '.join(s.key for s in STEPS)}")
    sizes = CPU if args.cpu else GPU
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    default = Path(os.environ["OUT"]) if os.environ.get("OUT") else CHECKOUT / "results" / "gpu_check" / stamp
    out = (args.out or default).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = ["python", "-m", "benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]
    ctx = Context(out=out, data=args.data.resolve(), sizes=sizes, argv=command, env=child_env(sizes),
                  deadline=time.monotonic() + sizes.total_s)
    signal.signal(signal.SIGTERM, _interrupt)  # a machine's time limit: the running command dies with us
    outcomes: dict[str, Outcome] = {}
    for step in STEPS:
        write_summary(ctx, outcomes, running=step.key)
        print(f"[{time.monotonic() - ctx.deadline + sizes.total_s:5.0f} s] {step.title} ...", flush=True)
        try:
            chosen_now = step.key in chosen | {"setup", "env"}
            outcome = run_step(ctx, step) if chosen_now else Outcome("skipped", "not in --steps")
        except KeyboardInterrupt:
            outcomes[step.key] = Outcome("failed", "interrupted (Ctrl-C or SIGTERM) while running")
            write_summary(ctx, outcomes)
            return 130
        outcomes[step.key] = outcome
        print(f"        {outcome.status} in {outcome.seconds:.0f} s: {outcome.note}", flush=True)
    write_summary(ctx, outcomes)
    print(f"\nsummary: {out / 'summary.md'}")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
