"""The GPU proof (issue #16): everything that needs a GPU, in one run that fits a short GPU window.

    python -m benchmarks.gpu_check [--out DIR] --steps pytest,suite  # on a CUDA machine, from the checkout: <= 8 min
    python -m benchmarks.gpu_check [--out DIR] --steps real,oom,realweights  # then the rest of the plan: <= 8 min
    python -m benchmarks.gpu_check --cpu --out DIR    # the rehearsal: the same steps with tiny sizes, on the CPU
    benchmarks/gpu_check.sh [...]                     # the same from any directory

Steps, in order: 0 setup (pydantic from wheels, the CIFAR-10 JPEGs, what is missing, the payload's size),
1 environment, 2 `pytest -m gpu`, 3 throughput beside published figures, 4 harness vs bare loop, 5 device
loader vs DataLoader, 6 real CIFAR-10 (ResNet-18 sanity run, ResNet-50 at 224 and 32 px, host RAM, VRAM of
each cell's process, inference VRAM beside the same model never trained),
7 a cell that runs out of memory, then one that must run, 8 real ImageNet weights (the official
EfficientNet-Lite2 weights, converted offline, fine-tuned on all 50,000 CIFAR-10 images at 224 px), 9 a slice of
cifar_full with CUDA graphs, cuDNN autotuning where it pays and packing, and cifar_full's hours extrapolated.
On a GPU the steps take two invocations of at most 8 minutes (`PLAN`: first `--steps pytest,suite`, then
`--steps real,oom,realweights`).
Each step has a time budget: past it, its processes are killed, it is recorded as `timeout` with what it
had measured, and the next step runs; a failed step is recorded with its reason and the run goes on.
`summary.md` and `summary.json` in the output folder are rewritten after every step, so a run killed at any
moment leaves what it measured. Raw results: `results/` (bench's Parquet), `logs/` (every command's output),
`raw/` (benchmark JSON), `suites/` (the suite files run).

Only the standard library is imported up front: this package runs before pydantic is installed.

Modules, in the order the data flows: `config` (sizes, budgets, reference figures), `plumbing` (the run's context,
commands under a deadline, wheels, data, rows as Markdown), `steps_setup` (steps 0-2), `steps_measure` (steps 3-7),
`steps_weights` (step 8), `steps_suite` (step 9; `extrapolate` in a process of its own), `run` (the steps in order,
the summary, the command line); `infer_reference` (a never-trained model's inference VRAM, in a process of its own).
"""

from __future__ import annotations

from benchmarks.gpu_check.config import (
                                         CHECKOUT,
                                         CPU,
                                         GB,
                                         GPU,
                                         NEEDED,
                                         NVIDIA_A100_RESNET50_AMP,
                                         PAYLOAD_LIMIT_BYTES,
                                         PLAN,
                                         TARBALL,
                                         TIMM_RTX3090_AMP,
                                         TIMM_RTX3090_FILE,
                                         WANTED,
                                         Sizes,
)
from benchmarks.gpu_check.plumbing import (
                                         Context,
                                         Outcome,
                                         Proc,
                                         child_env,
                                         find_tarball,
                                         git_head,
                                         install_wheels,
                                         payload_bytes,
                                         read_rows,
                                         unpack_cifar,
                                         wheels_dir,
)
from benchmarks.gpu_check.run import STEPS, Step, main, run_step, write_summary
from benchmarks.gpu_check.steps_measure import (
                                         oom_suite,
                                         real_suite,
                                         step_harness,
                                         step_loader,
                                         step_oom,
                                         step_real,
                                         step_throughput,
                                         throughput_suite,
)
from benchmarks.gpu_check.steps_setup import (
                                         probe_modules,
                                         step_env,
                                         step_pytest,
                                         step_setup,
)
from benchmarks.gpu_check.steps_suite import slice_cells, step_suite, suite_figures
from benchmarks.gpu_check.steps_weights import find_lite_weights, realweights_suite, step_realweights

__all__ = [
    "CHECKOUT", "CPU", "GB", "GPU", "NEEDED", "NVIDIA_A100_RESNET50_AMP", "PAYLOAD_LIMIT_BYTES", "STEPS", "TARBALL",
    "PLAN", "TIMM_RTX3090_AMP", "TIMM_RTX3090_FILE", "WANTED", "Context", "Outcome", "Proc", "Sizes", "Step",
    "child_env",
    "find_lite_weights", "find_tarball", "git_head", "install_wheels", "main", "oom_suite", "payload_bytes",
    "probe_modules", "read_rows", "real_suite", "realweights_suite", "run_step", "step_env", "step_harness",
    "slice_cells", "step_loader", "step_oom", "step_pytest", "step_real", "step_realweights", "step_setup",
    "step_suite", "step_throughput", "suite_figures", "throughput_suite", "unpack_cifar", "wheels_dir", "write_summary",
]
