"""A model's input recipe: the mean, std and interpolation its weights were trained with.

One resolved `InputRecipe` per cell feeds both loaders (`bench/loader.py` on the device, `bench/streaming.py`
with DataLoader workers), and is recorded on the row. `bench/models.py` resolves it from the weights
(torchvision's `transforms()`, timm's `resolve_model_data_config`); this module only holds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class InputRecipe:
    """How pixels become a model's input: (x / 255 - mean) / std after a resize with `interpolation`.

    `crop_pct` is the weights' evaluation crop (timm: resize to size / crop_pct, centre crop). bench records it
    but trains and tests on the same framing (the whole stored image): an ImageNet-style evaluation crop applied
    at test time only would show the model a framing it was never fine-tuned on.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    source: str = "ImageNet statistics (default)"  # where the numbers came from, for people reading a row

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")

    def with_stats(self, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> InputRecipe:
        """This recipe with a suite's own `input_mean` / `input_std` in place of the weights' (None: keep them)."""
        if mean is None and std is None:
            return self
        given = " and ".join(k for k, v in (("input_mean", mean), ("input_std", std)) if v is not None)
        return replace(self, mean=tuple(mean or self.mean), std=tuple(std or self.std),
                       source=f"the suite's {given}, over {self.source}")

    def row(self) -> dict:
        """The row's columns for this recipe."""
        return {"input_mean": list(self.mean), "input_std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct}

    def describe(self) -> str:
        """`mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5) bicubic`, for `bench validate`."""
        def three(values: tuple[float, ...]) -> str:
            return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"

        return f"mean {three(self.mean)} std {three(self.std)} {self.interpolation}"


IMAGENET = InputRecipe()
