"""Steps 0-2 of the GPU check: setup (wheels, data, what is missing, the payload's size), the environment,
`pytest -m gpu`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu_check.config import CHECKOUT, NEEDED, TARBALL, WANTED
from benchmarks.gpu_check.plumbing import (
    Context,
    Outcome,
    find_tarball,
    install_wheels,
    last_line,
    md,
    payload_bytes,
    tail,
    unpack_cifar,
    wheels_dir,
)

# ---------------------------------------------------------------- 0: setup


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
