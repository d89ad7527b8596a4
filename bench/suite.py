"""Suite files: the schema, YAML loading and grid expansion into fully resolved `Cell`s.

This module never imports torch: `bench validate` on a big suite stays instant, and the model
registry is handed in as a plain callable (`resolve_model`) when patterns must be expanded.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bench.errors import SuiteError, close_matches

FreezeSpec = Union[Literal["none", "all"], int, float]
Positive = Annotated[float, Field(gt=0)]

# Fields that say how to run a cell, not what the cell is: they stay out of its id.
RUNNER_FIELDS = frozenset({"cell_timeout_s", "checkpoint"})
# Fields a sweep tunes for a backbone config: the report folds them into one row, and a race into one racer.
TUNED_FIELDS = ("lr", "weight_decay", "momentum", "label_smoothing", "warmup_fraction", "head_dropout")
# Part of every cell id: bump it when a field's default changes meaning, so old results are not resumed as new.
ID_VERSION = 2  # 2: restore_best and probe_norm came in with defaults that change what a cell does
DATASET_HELP = ("synthetic | cifar10 | cifar100 | cinic10 | imagefolder:/path | hf:OWNER/NAME (hf:OWNER/NAME:CONFIG) | "
                "hf:/path/saved/with/save_to_disk")


class Cell(BaseModel):
    """One fully resolved experiment: the unit of scheduling, isolation, storage and resume."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field("adhoc", description="The suite's name, from its top-level `name` (not a key of defaults).")
    dataset: str = Field("synthetic", description=DATASET_HELP)
    model: str = Field(description="A backbone: a torchvision name (resnet18), timm:NAME, a glob ('efficientnet_b*'), "
                       "or py:package.module:factory / py:path/to/file.py:factory.")
    resolution: int = Field(32, ge=8, le=2048, description="Side in pixels of the images the model trains and tests on.")
    source_resolution: int | None = Field(None, ge=8, le=4096, description=(
        "Image folders and hf: datasets: the side images are stored at (default: the largest resolution any cell "
        "asks for), capped by the images' own size."))
    batch_size: int = Field(128, ge=1, description="Training batch size.")
    freeze: FreezeSpec = Field("none", description=(
        "none trains everything; all trains only the new head (a linear probe); a fraction 0 < f < 1 freezes that "
        "share of the backbone's layers from the input; an integer n trains only the last n layers."))
    epochs: int = Field(1, ge=1, description="Training epochs.")
    steps: int | None = Field(None, ge=1, description="A cap on optimizer steps.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="sgd (Nesterov momentum), adam or adamw.")
    lr: float | None = Field(None, gt=0, description=(
        "Learning rate (default: 0.01 for SGD, 1e-3 for Adam/AdamW; x10 for a linear probe, x5 from scratch)."))
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD's momentum.")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay, not applied to norms and biases.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning rate after warm-up: cosine or constant.")
    warmup_fraction: float = Field(0.05, ge=0, le=0.5, description="Share of the steps warming the learning rate up, linearly.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing of the loss.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description=(
        "auto: bf16 on a GPU that has it, else fp32; fp32; bf16; fp16 with a gradient scaler."))
    channels_last: bool = Field(True, description="Channels-last memory format for the model and its batches.")
    # `auto` is held as None, so the column stays a bool (rows hold the value used)
    cudnn_benchmark: bool | None = Field(True, description=(
        "cuDNN autotuning on a GPU: faster steps after a warm-up of seconds per shape; auto: on where the cell's "
        "steps repay it (and in throughput mode). Rows hold the value used."),
        json_schema_extra={"anyOf": [{"type": "boolean"}, {"const": "auto"}, {"type": "null"}]})
    cuda_graphs: Literal["auto", "on", "off"] = Field("auto", description=(
        "Each training step captured once as a CUDA graph and replayed; auto: on a GPU for small images (at most "
        "128 x 64 x 64 pixels a batch), never with fp16 or compile; on falls back to eager, said in one line, where "
        "it cannot. Rows hold the value used."))
    compile: bool = Field(False, description="torch.compile the model.")
    pretrained: bool = Field(True, description=(
        "Start from pretrained weights; false: random init, with the same architecture and input recipe."))
    weights: str | None = Field(None, description=(
        "The library's name for the weights (default: the model's DEFAULT), or a checkpoint file of your own "
        "(path/to/file.pth or .safetensors)."))
    input_mean: tuple[float, float, float] | None = Field(None, description=(
        "Per-channel mean on [0, 1] pixels, over the weights' recipe (default: the weights' own)."))
    input_std: tuple[Positive, Positive, Positive] | None = Field(None, description=(
        "Per-channel std on [0, 1] pixels, over the weights' recipe (default: the weights' own)."))
    head: Literal["linear", "mlp"] = Field("linear", description="The new classifier head: linear or mlp.")
    head_hidden: int = Field(512, ge=1, description="Hidden width of an mlp head.")
    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the new head's last layer.")
    head_bn: bool = Field(False, description="BatchNorm after an mlp head's hidden layer.")
    probe_norm: Literal["batchnorm", "none"] = Field("batchnorm", description=(
        "batchnorm: a parameter-free BatchNorm before a linear probe's head (freeze: all); none."))
    augment: Literal["standard", "none", "strong"] = Field("standard", description=(
        "standard: random crop with padding and flip; none; strong: standard plus rotations up to 15 degrees."))
    val_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Share of train held out for validation, with a fixed seed, when the dataset has no validation split."))
    train_subset: int | None = Field(None, ge=1, description="A cap on training images (for smoke tests).")
    test_subset: int | None = Field(None, ge=1, description="A cap on test images, and on validation images.")
    seed: int = Field(0, description="The cell's seed; defaults.seeds (or grid.seed) runs each cell once per seed.")
    target_top1: float | None = Field(None, gt=0, le=1, description=(
        "Stop early when validation top-1 reaches it (a fraction); time-to-target is recorded."))
    restore_best: bool = Field(True, description=(
        "Test the best validation epoch's weights; false: the final weights."))
    checkpoint: Literal["auto", "epoch", "none"] = Field("auto", description=(
        "Save the cell's state after each epoch, so a kill costs one epoch: auto once an epoch takes over a minute "
        "(and always in a race); epoch after every epoch; none never."))
    mode: Literal["train", "throughput"] = Field("train", description=(
        "train; throughput: warm-up and timed training steps on the real pipeline, no evaluation."))
    throughput_warmup_steps: int = Field(10, ge=0, description="Throughput mode: steps before the timed ones.")
    throughput_steps: int = Field(50, ge=1, description="Throughput mode: timed steps.")
    feature_cache: Literal["auto", "off"] = Field("auto", description=(
        "auto: a linear probe without augmentation trains its head on the backbone's features, computed once; off."))
    infer_bench: Literal["auto", "off"] = Field("auto", description="auto: measure the trained model's inference cost; off.")
    infer_budget_s: float = Field(4.0, gt=0, description="Seconds the inference measurement may take.")
    save_model: Literal["none", "best", "all"] = Field("none", description=(
        "Keep trained models under results/SUITE/models/: none; best (the suite's best on validation); all."))
    cell_timeout_s: float | None = Field(None, gt=0, description="Seconds after which the cell is stopped (status timeout).")
    image_column: str | None = Field(None, description=(
        "hf: datasets: the column of images (default: its one Image column)."))
    label_column: str | None = Field(None, description=(
        "hf: datasets: the column of labels (default: its one ClassLabel column); class names are its names."))

    @field_validator("feature_cache", "infer_bench", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 (PyYAML) reads a bare `off` as false

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("cudnn_benchmark", mode="before")
    @classmethod
    def _auto_is_none(cls, value: Any) -> Any:
        return None if value == "auto" else value

    @field_validator("freeze", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            raise ValueError("freeze must be none, all, a fraction 0 < f < 1 or an integer n >= 1")
        return value

    @field_validator("freeze", mode="after")
    @classmethod
    def _check_freeze(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"freeze: {value} is not allowed; an integer n means 'train the last n layers' (n >= 1)")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"freeze: {value} is not a fraction 0 < f < 1; use none, all or an integer n")
        return value

    @property
    def id(self) -> str:
        """A short hash of the configuration: equal across runs, machines and bench versions."""
        return self._identity(RUNNER_FIELDS)

    @property
    def group_id(self) -> str:
        """The id of the cell's configuration without its seed: seeds of one config share it."""
        return self._identity(RUNNER_FIELDS | {"seed"})

    def _identity(self, exclude: frozenset[str]) -> str:
        # Only fields that differ from their defaults are hashed, so adding a field (with a default that
        # keeps the old behaviour) leaves every recorded id valid and resume still recognises old results.
        # The price: changing an existing default changes what an old id meant; bump ID_VERSION then.
        data = self.model_dump(exclude=set(exclude), exclude_defaults=True)
        return _short_hash(json.dumps([ID_VERSION, data], sort_keys=True, separators=(",", ":")))

    @property
    def freeze_label(self) -> str:
        return str(self.freeze)

    def canonical(self, exclude: Iterable[str] = ()) -> str:
        data = self.model_dump(exclude=set(exclude))
        return json.dumps(data, sort_keys=True, separators=(",", ":"))


CELL_FIELDS = tuple(Cell.model_fields)


class RaceSpec(BaseModel):
    """`race:` in a suite (or `bench run --race`): successive halving over the suite's configs (bench/race.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eta: int = Field(3, ge=2, description="keep the best 1/eta of the configs at each rung")
    rungs: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, description="epochs at which configs are compared (default 1, eta, eta^2 ... below the cells' epochs)")
    margin: float = Field(0.01, ge=0, lt=1, description="validation top-1 (fraction) within which a config of one "
                          "seed survives the cut-line; with two seeds or more their spread decides, never less")


class Suite(BaseModel):
    """A suite file as written: defaults, a grid whose product gives cells, include and exclude."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Letters, digits, _ . -; results go to results/NAME/.")
    description: str = Field("", description="What the suite is for, in words.")
    dataset: str = Field(description=DATASET_HELP)
    defaults: dict[str, Any] = Field(default_factory=dict, description=(
        "Cell fields for every cell, plus seeds: [0, 1, 2] (each cell runs once per seed)."))
    grid: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "Cell fields, each with a list of values: their cartesian product gives the cells."))
    include: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Extra cells; a list inside an entry is a small grid of its own."))
    exclude: list[dict[str, Any]] = Field(default_factory=list, description=(
        "Partial cells to drop: a list is any of its values, a string a glob."))
    race: RaceSpec | None = Field(None, description=(
        "Race the configs (successive halving): all train to a first rung, the best 1/eta go on."))
    source: str = Field("<memory>", exclude=True)

    @property
    def hash(self) -> str:
        # a suite without `race:` hashes as it did before races existed
        body = self.model_dump(exclude={"source"} | ({"race"} if self.race is None else set()))
        return _short_hash(json.dumps(body, sort_keys=True, default=str))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; every problem becomes one `SuiteError` naming file, field and fix."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file; pass the path of a YAML suite such as suites/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not a UTF-8 YAML file (byte {exc.start} cannot be decoded); pass a suite file "
                         "such as suites/smoke.yaml, or save this one as UTF-8 text") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise SuiteError(f"{path}: not valid YAML{line} ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    return parse_suite(raw, source=str(path))


def parse_suite(raw: Any, source: str = "<memory>") -> Suite:
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: a suite must be a mapping with name, dataset, defaults and grid; got {type(raw).__name__}")
    try:
        suite = Suite.model_validate({**raw, "source": source})
    except ValidationError as exc:
        raise SuiteError(_explain(exc, source, Suite.model_fields)) from None
    _check_keys(suite)
    return suite


def apply_overrides(suite: Suite, assignments: Iterable[str]) -> Suite:
    """`--set KEY=VALUE`: the value for every cell, in place of what defaults, grid and include say.

    Values are YAML scalars (`16`, `bf16`, `true`), or a list for `seeds` (`[0, 1]`). The suite's hash changes with
    them, and the cells' ids follow their final configuration, so overridden cells never pass for
    the suite's own.
    """
    raw = suite.model_dump()
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SuiteError(f"--set {text!r}: expected KEY=VALUE, e.g. --set epochs=1")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SuiteError(f"--set {text!r}: the value is not valid YAML; quote it or fix it") from None
        if key == "dataset":
            raw["dataset"] = parsed
            continue
        drop = {key, "seed", "seeds"} if key in ("seed", "seeds") else {key}
        for section in [raw["grid"], raw["defaults"], *raw["include"]]:
            for name in drop:
                section.pop(name, None)
        raw["include"] = [entry for entry in raw["include"] if entry]
        if raw["grid"] or raw["include"]:
            raw["defaults"][key] = parsed
        else:  # the key was the grid's only axis: the suite is now that one value
            raw["grid"]["seed" if key == "seeds" else key] = parsed if key == "seeds" else [parsed]
    return parse_suite(raw, source=f"{suite.source} with --set")


def _check_keys(suite: Suite) -> None:
    allowed = set(CELL_FIELDS) - {"suite", "dataset"}
    sections = [("defaults", suite.defaults), ("grid", suite.grid)] + [
        (f"{name}[{i}]", entry) for name in ("include", "exclude") for i, entry in enumerate(getattr(suite, name))
    ]
    for section, keys in sections:
        for key in keys:
            if key == "seeds" and section == "defaults":
                continue
            if key not in allowed:
                raise SuiteError(
                    f"{suite.source}: {section}.{key}: unknown key{close_matches(key, allowed)}; "
                    f"valid keys are listed in the README under 'Suite files'"
                )
    for key, values in suite.grid.items():
        if not values:
            raise SuiteError(f"{suite.source}: grid.{key} is an empty list; give it at least one value or remove it")
    if not suite.grid and not suite.include:
        raise SuiteError(f"{suite.source}: the suite has no cells; add a grid such as `grid: {{model: [resnet18]}}`")
    if not suite.dataset.startswith("hf:"):
        for key in ("image_column", "label_column"):
            if any(key in keys for _, keys in sections):
                raise SuiteError(f"{suite.source}: {key} names a column of an hf: dataset and the suite's dataset is "
                                 f"{suite.dataset}; remove it, or use dataset: hf:OWNER/NAME")
    if "seed" in suite.grid and "seeds" in suite.defaults:
        raise SuiteError(f"{suite.source}: seeds are given twice (defaults.seeds and grid.seed); keep one")
    seeds = suite.defaults.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SuiteError(f"{suite.source}: defaults.seeds must be a non-empty list of integers, e.g. [0, 1, 2]")


def expand(suite: Suite, resolve_model: Callable[[str], list[str]] | None = None) -> list[Cell]:
    """Expand a suite into its cells: grid product plus include, minus exclude, times seeds.

    `resolve_model` turns a name or glob into canonical names (the model registry); without it,
    names are taken as written.
    """
    resolve = resolve_model or (lambda name: [name])
    defaults = dict(suite.defaults)
    seeds = defaults.pop("seeds", [0])
    base = {"suite": suite.name, "dataset": suite.dataset, **defaults}

    partials: list[tuple[str, dict[str, Any]]] = []
    if suite.grid:
        keys = list(suite.grid)
        for combo in itertools.product(*(suite.grid[k] for k in keys)):
            partials.append(("grid", dict(zip(keys, combo))))
    for i, entry in enumerate(suite.include):  # an include entry with lists is a small grid of its own
        keys = list(entry)
        values = [v if isinstance(v, list) else [v] for v in entry.values()]
        partials += [(f"include[{i}]", dict(zip(keys, combo))) for combo in itertools.product(*values)]

    cells: dict[str, Cell] = {}
    for origin, partial in partials:
        fields = {**base, **partial}
        if "model" not in fields:
            raise SuiteError(f"{suite.source}: {origin} has no model; add `model:` to the grid, defaults or the entry")
        if not isinstance(fields["model"], str):
            raise SuiteError(f"{suite.source}: {origin}.model must be a name such as resnet18, got {fields['model']!r}")
        cell_seeds = [fields.pop("seed")] if "seed" in fields else seeds
        for model in resolve(fields["model"]):
            for seed in cell_seeds:
                cell = _make_cell({**fields, "model": model, "seed": seed}, suite, origin, partial)
                if not _excluded(cell, suite.exclude):
                    cells.setdefault(cell.id, cell)
    if not cells:
        raise SuiteError(f"{suite.source}: every cell is excluded; loosen the exclude entries")
    return list(cells.values())


def _make_cell(fields: dict[str, Any], suite: Suite, origin: str, partial: dict[str, Any]) -> Cell:
    try:
        return Cell.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        section = origin if key in partial else "defaults"
        if origin == "grid" and key in partial:
            section = "grid"
        raise SuiteError(_explain(exc, suite.source, Cell.model_fields, prefix=section)) from None


def _excluded(cell: Cell, rules: list[dict[str, Any]]) -> bool:
    values = cell.model_dump()
    for rule in rules:
        if all(field_matches(values.get(k), v) for k, v in rule.items()):
            return True
    return False


def field_matches(actual: Any, wanted: Any) -> bool:
    """A cell's field against a value from a suite's `exclude` or `--only`: lists are any-of, strings are globs,
    and a bare model name matches its canonical `tv:` form."""
    if isinstance(wanted, list):  # `resolution: [32, 64]` in an exclude entry: any of them
        return any(field_matches(actual, w) for w in wanted)
    if isinstance(wanted, str) and isinstance(actual, str):
        # A bare model name in an exclude matches its canonical tv: form too.
        return fnmatch.fnmatchcase(actual, wanted) or fnmatch.fnmatchcase(actual.split(":", 1)[-1], wanted)
    return actual == wanted


def _explain(exc: ValidationError, source: str, fields: dict[str, Any], prefix: str = "") -> str:
    """One sentence for the first pydantic error: file, field, problem, fix."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    where = f"{prefix}.{loc}" if prefix else loc
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        return f"{source}: {where}: unknown key{close_matches(str(err['loc'][-1]), fields)}; remove it or fix its spelling"
    if kind == "missing":
        return f"{source}: {where}: required key is missing; add it"
    if isinstance(value, list) and prefix != "grid" and kind != "list_type":
        return f"{source}: {where}: expected a single value, got the list {value!r}; put lists of values under grid:"
    if kind == "list_type":
        return f"{source}: {where}: expected a list of values, got {value!r}; write [{value!r}]"
    return f"{source}: {where}: {err['msg'].rstrip('.')} (got {value!r}); fix the value"
