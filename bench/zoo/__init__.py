"""Your own architectures: `py:` model names, and the example models bench ships (`bench.zoo.small_cnn`).

`py:package.module:factory` imports the module as Python does (installed packages, then the current directory);
`py:path/to/file.py:factory` loads a file, a relative path counting from the current directory of `bench run`
(the cells' worker processes run in it). The factory is called as `factory(num_classes=N)` and returns an
`nn.Module`, or `(module, head_path)` naming its classifier; otherwise bench finds the classifier as it does for
any model (the layers whose shapes follow `num_classes`). `bench.models` does everything else with it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bench.errors import UnknownModelError

PREFIX = "py:"
FORMS = "py:package.module:factory or py:path/to/file.py:factory"


@dataclass(frozen=True)
class Factory:
    """An imported factory and the file that defines it (its hash goes on every row, as provenance)."""

    spec: str  # what follows `py:`, as written
    make: Callable[..., object]
    source_file: Path
    source_sha256: str | None  # of the file as it was imported (None: compiled code, no file to hash)


def _parse(spec: str) -> tuple[str, str]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UnknownModelError(f"py:{spec}: expected {FORMS}; name the module or file and its factory function")
    return target, attr


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


@functools.cache
def load(spec: str) -> Factory:
    """Import the factory named by `spec` (what follows `py:`); every failure is one UnknownModelError."""
    target, attr = _parse(spec)
    module = _import_file(spec, target) if _is_file(target) else _import_module(spec, target)
    make = getattr(module, attr, None)
    if not callable(make):
        found = "has no attribute" if make is None else f"has a {type(make).__name__}, not a function, named"
        raise UnknownModelError(f"py:{spec}: {target} {found} {attr!r}; define `def {attr}(num_classes): ...` there")
    try:
        source = Path(inspect.getsourcefile(make) or module.__file__).resolve()
    except TypeError:  # a builtin or C extension: nothing to hash
        source = Path(module.__file__).resolve()
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else None
    return Factory(spec, make, source, digest)


def _import_module(spec: str, target: str):
    # `bench` is a console script: sys.path[0] is its bin folder, not the current directory that `python -m`
    # would put first. A module next to the suite should still import, so the current directory goes last.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(target)
    except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one typed error naming it
        raise UnknownModelError(f"py:{spec}: importing {target} failed ({_reason(exc)}); fix the module name or "
                                f"its code (modules are found as Python finds them, then in {cwd})") from None


def _import_file(spec: str, target: str):
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise UnknownModelError(f"py:{spec}: no file {path} (relative paths count from the current directory, "
                                f"{os.getcwd()}); fix the path")
    # A stable module name per file, registered in sys.modules, so its classes pickle by reference.
    name = "bench_py_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one typed error naming it
        del sys.modules[name]
        raise UnknownModelError(f"py:{spec}: running {path} failed ({_reason(exc)}); fix the file") from None
    return module


def call(spec: str, num_classes: int) -> tuple[nn.Module, str | None]:
    """The factory's model for `num_classes`, and the head path it names (None: bench finds the classifier)."""
    factory = load(spec)
    try:
        made = factory.make(num_classes=num_classes)
    except Exception as exc:  # noqa: BLE001 - any failure of user code becomes one typed error naming it
        raise UnknownModelError(f"py:{spec}: {factory.make.__name__}(num_classes={num_classes}) raised "
                                f"{_reason(exc)}; fix the factory") from None
    model, head = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, nn.Module) or not (head is None or isinstance(head, str)):
        raise UnknownModelError(f"py:{spec}: the factory returned {_kind(made)}, not an nn.Module or "
                                "(nn.Module, head_path); return the model, optionally with its classifier's path")
    if head is not None and head not in dict(model.named_modules()):
        raise UnknownModelError(f"py:{spec}: the factory names head {head!r}, which is not a submodule of its model; "
                                "return the dotted path of its classifier layer, such as 'fc' or 'classifier.1'")
    return model, head


def _kind(made: object) -> str:
    if isinstance(made, tuple):
        return f"a tuple of {', '.join(type(v).__name__ for v in made) or 'nothing'}"
    return "None" if made is None else f"a {type(made).__name__}"


def _reason(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
