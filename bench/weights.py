"""Weights files: which file a library's weights are, where the library caches it, getting it there (failing fast
and in one sentence offline), saying what is wrong with a cached copy that is there but unusable, and loading a
checkpoint of your own (`weights: path/to/file.pth`). Names are canonical (`tv:NAME`, `timm:NAME`,
`timm:hf-hub:ORG/NAME`); registry.py builds the networks, this module only finds, checks and reads their files."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

from bench.errors import BenchError, UnknownModelError, WeightsUnavailableError, close_matches

DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation: a dead network fails in seconds instead of hanging a worker
HUB_PREFIX = "hf-hub:"  # timm:hf-hub:ORG/NAME builds the architecture its repo's config.json names
HUB_TAG = "hf-hub"  # the weights of an hf-hub: model: its repo's, the only ones it has
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a repo, in this order
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".safetensors")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")  # where training scripts nest it


class CheckpointError(BenchError):
    """A weights file cannot be loaded into its model: not a state dict, or its keys or shapes do not fit."""


def tv_member(arch: str, weights: str | None) -> WeightsEnum:
    """torchvision's weights enum member for `weights` (None: the default), or UnknownModelError naming the valid ones."""
    enum = get_model_weights(arch)
    key = "DEFAULT" if weights is None else weights.removeprefix(enum.__name__ + ".")
    if key not in enum.__members__:
        hint, valid = close_matches(key, enum.__members__), ", ".join(enum.__members__)
        raise UnknownModelError(f"tv:{arch}: unknown weights {weights!r}{hint}; valid weights are {valid}")
    return enum[key]


def timm_cfg(arch: str, tag: str | None):
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)


def hub_repo(name: str, weights: str) -> tuple[str, list[tuple[str, ...]]] | None:
    """(repo id, the files a load needs: one of each group) for weights on the Hugging Face hub; None otherwise."""
    source, _, arch = name.partition(":")
    if source != "timm":
        return None
    if arch.startswith(HUB_PREFIX):
        return arch.removeprefix(HUB_PREFIX), [("config.json",), HUB_WEIGHTS]
    cfg = timm_cfg(arch, weights)
    if not cfg.hf_hub_id:
        return None
    return cfg.hf_hub_id, [(cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS]


def location(name: str, weights: str) -> tuple[str, Path, str]:
    """(file or hub folder, the directory the library caches it in, the URL it comes from)."""
    source, _, arch = name.partition(":")
    hub = hub_repo(name, weights)
    if hub is not None:
        from huggingface_hub import constants

        return f"models--{hub[0].replace('/', '--')}", Path(constants.HF_HUB_CACHE), constants.ENDPOINT
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    url = tv_member(arch, weights).url if source == "tv" else timm_cfg(arch, weights).url
    return Path(urlparse(url).path).name, checkpoints, url


def _hub_cached(repo: str, groups: Sequence[tuple[str, ...]]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return all(any(isinstance(try_to_load_from_cache(repo, f), str) for f in group) for group in groups)


def is_cached(name: str, weights: str) -> bool:
    hub = hub_repo(name, weights)
    if hub is not None:
        return _hub_cached(*hub)
    item, folder, _ = location(name, weights)
    return (folder / item).is_file()


@contextmanager
def downloading(name: str, weights: str) -> Iterator[None]:
    """Network and cache work for these weights: sockets time out, any network failure becomes one sentence, and
    so does a cached file the library cannot read (truncated, or a hub folder missing a piece)."""
    # urllib (under torch.hub) waits forever on a silent network unless sockets carry a default timeout.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except OSError as exc:  # URLError, DNS failures, refused connections, socket timeouts, a download cut midway
        raise _unavailable(name, weights, exc) from None
    except Exception:
        problem = cache_problem(name, weights)
        if problem is None:  # the cache is sound: the failure is the library's or the model's, shown as it is
            raise
        raise _unusable(name, weights, problem) from None
    finally:
        socket.setdefaulttimeout(previous)


def _reason(exc: BaseException) -> str:
    """The error's first sentence: torch and huggingface_hub go on for a paragraph."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(exc).__name__


def _unavailable(name: str, weights: str, exc: BaseException) -> WeightsUnavailableError:
    item, folder, _ = location(name, weights)
    problem = cache_problem(name, weights)
    if problem is not None:
        return _unusable(name, weights, problem)
    return WeightsUnavailableError(
        f"{name}: weights {weights} are not cached ({item} is not in {folder}) and could not be downloaded "
        f"({_reason(exc)}); run `bench fetch {name}` on a machine with internet and copy {item} into {folder}, "
        f"or set pretrained: false"
    )


def _unusable(name: str, weights: str, problem: str) -> WeightsUnavailableError:
    # What is there and what is wrong with it says more than the library's error (often "not found") would.
    item, folder, _ = location(name, weights)
    return WeightsUnavailableError(
        f"{name}: the cached weights {weights} are unusable ({item} in {folder} {problem}); delete {folder / item} "
        f"and run `bench fetch {name}` again, or copy the whole {'folder' if item.startswith('models--') else 'file'} "
        "again from a machine where it loads"
    )


def prepare(name: str, weights: str) -> Path:
    """Make sure the library's loader will find the weights: cached, downloaded now (torchvision), or their
    server reachable (timm). Fails fast, in one sentence, where the libraries would hang or retry for a minute."""
    item, folder, url = location(name, weights)
    if is_cached(name, weights):
        return folder / item
    with downloading(name, weights):
        if name.startswith("tv:"):
            folder.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(item)  # torchvision files are <arch>-<sha256 prefix>.pth
            torch.hub.download_url_to_file(url, str(folder / item), hash_prefix=match.group(1) if match else None)
        else:
            _reachable(url, hub=item.startswith("models--"))
    return folder / item


def prepare_hub_config(name: str) -> None:
    """An hf-hub: model's architecture is in its repo's config.json: cached, or its server reachable."""
    repo, groups = hub_repo(name, HUB_TAG)
    if not _hub_cached(repo, groups[:1]):
        with downloading(name, HUB_TAG):
            _reachable(location(name, HUB_TAG)[2], hub=True)


def _reachable(url: str, hub: bool) -> None:
    if hub and _hf_offline():
        raise OSError("HF_HUB_OFFLINE is set")
    # huggingface_hub retries a dead network for about 25 s per file: one connection tells sooner
    host = urlparse(url)
    socket.create_connection((host.hostname, host.port or 443)).close()


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# --- what is wrong with a cached copy that is there ----------------------------------------------------------------


def cache_problem(name: str, weights: str) -> str | None:
    """What makes the library's cached copy of these weights unusable, as a phrase (`has no refs/main`); None
    when nothing is there or what is there reads."""
    item, folder, _ = location(name, weights)
    hub = hub_repo(name, weights)
    return _hub_problem(folder / item, hub[1]) if hub is not None else _file_problem(folder / item)


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        _read_any(path, mmap=True)
    except ImportError:  # safetensors not installed: nothing known about the file
        return None
    except Exception as exc:  # noqa: BLE001 - a diagnosis: any reader failure is the answer, said as a phrase
        return _broken(path, exc)
    return None


def _broken(path: Path, exc: BaseException) -> str:
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    return f"is truncated or corrupt ({size:,} bytes; {type(exc).__name__}: {_reason(exc)})"


def _hub_problem(repo: Path, groups: Sequence[tuple[str, ...]]) -> str | None:
    if not repo.is_dir():
        return None
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return "has no refs/main, so which snapshot to load is unknown (a partial copy or an interrupted download)"
    commit = ref.read_text().strip()
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        return f"has refs/main naming snapshot {commit[:12]}, which is not in its snapshots/ folder"
    for group in groups:
        found = next((snapshot / f for f in group if os.path.lexists(snapshot / f)), None)
        if found is None:
            return f"has snapshot {commit[:12]} without {' or '.join(group)}"
        if not found.exists():
            return f"has snapshots/{commit[:12]}/{found.name} linking to a blob that is not there"
        problem = _file_problem(found) if found.suffix in CHECKPOINT_SUFFIXES else None
        if problem is not None:
            return f"has snapshots/{commit[:12]}/{found.name}, which {problem}"
    return None


# --- checkpoints of your own ---------------------------------------------------------------------------------------


def is_file_weights(weights: str | None) -> bool:
    """`weights: path/to/file.pth` (or .safetensors ...): a checkpoint of your own, not one of a library's names."""
    return weights is not None and (weights.endswith(CHECKPOINT_SUFFIXES) or "/" in weights)


def checkpoint_file(weights: str) -> Path:
    """The checkpoint a `weights:` path names, which must be a file."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {weights} not found (relative paths count from the current "
                                      f"directory, {os.getcwd()}); fix the path or copy the file there")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_any(path: Path, mmap: bool) -> object:
    """What the file holds, tensors only: safetensors, or torch.load with weights_only (a checkpoint could
    otherwise run code). Memory-mapped where the format allows, so checking keys costs no reading."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    mmap = mmap and zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _read_raw(path: Path, mmap: bool = True) -> object:
    try:
        return _read_any(path, mmap)
    except ImportError:
        raise CheckpointError(f"{path} is a safetensors file and the safetensors package is not installed; "
                              "run `pip install safetensors`") from None
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path} holds Python objects besides tensors ({_reason(exc)[:120]}), which bench does "
                              "not unpickle as they could run code; save the state dict alone with "
                              "torch.save(model.state_dict(), ...)") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad header, EOF: every reader fails differently
        raise CheckpointError(f"weights file {path} {_broken(path, exc)}; copy it again") from None


def read_state_dict(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from the key a training script nested them under."""
    raw = _read_raw(path, mmap)
    for _ in range(len(WRAPPER_KEYS)):
        if not isinstance(raw, dict):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(raw.get(k), dict)), None)
        if key is None:
            tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
            break
        raw = raw[key]
    holds = f"a dict of {', '.join(map(str, list(raw)[:4]))}" if isinstance(raw, dict) else type(raw).__name__
    raise CheckpointError(f"{path} holds no state dict ({holds}); save model.state_dict(), alone or under one of "
                          f"the keys {', '.join(WRAPPER_KEYS)}")


def fit_state_dict(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], heads: Sequence[str],
                   optional: Sequence[str], where: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors renamed to the model's keys (a `module.` or other prefix removed) without the
    classifier's; raises CheckpointError naming the first missing, unexpected and misshapen keys.

    Keys under `heads` (the layers bench replaces) are never loaded and may be absent; keys under `optional`
    (auxiliary branches) load when present and may be absent, as most checkpoints leave them out.
    """
    prefix = _best_prefix(state, expected)
    outside = [k for k in state if not k.startswith(prefix)]
    kept = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not _under(k[len(prefix):], heads)}
    spare = (*heads, *optional)
    missing = [k for k in expected if k not in kept and not _under(k, spare) and not k.endswith("num_batches_tracked")]
    unexpected = outside + [k for k in kept if k not in expected]
    misshapen = [k for k in kept if k in expected and tuple(kept[k].shape) != tuple(expected[k])]
    if missing or unexpected or misshapen:
        raise CheckpointError(_mismatch(where, missing, unexpected, misshapen, kept, expected, prefix))
    return kept


def _under(key: str, paths: Sequence[str]) -> bool:
    return any(key.startswith(path + ".") for path in paths)


def _best_prefix(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str:
    """The key prefix to strip (`module.` from DataParallel, `model.` from Lightning, none) that makes the most
    keys the model's: a backbone-only VGG checkpoint's keys all start with `features.`, which must stay."""
    candidates = {""}
    for key in state:
        parts = key.split(".")
        candidates.update(".".join(parts[:n]) + "." for n in range(1, min(len(parts), 4)))

    def fits(prefix: str) -> int:
        return sum(1 for k in state if k.startswith(prefix) and k[len(prefix):] in expected)

    return max(sorted(candidates, key=len), key=fits)  # ties: the shortest, so nothing is stripped needlessly


def _mismatch(where: str, missing: list[str], unexpected: list[str], misshapen: list[str],
              kept: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], prefix: str) -> str:
    def first(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    def shape(values) -> str:
        return "x".join(map(str, values)) or "scalar"

    parts = [f"{len(missing)} missing ({first(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({first(unexpected)})" if unexpected else "",
             f"{len(misshapen)} of another shape ("
             + ", ".join(f"{k}: {shape(kept[k].shape)} here, {shape(expected[k])} in the model" for k in misshapen[:2])
             + ")" if misshapen else ""]
    stripped = f" after removing the prefix {prefix!r}" if prefix else ""
    return (f"{where}: the checkpoint's keys do not fit the model{stripped}: {'; '.join(p for p in parts if p)}; "
            "the classifier's keys aside, it must hold this architecture's state dict (another model or variant?)")
