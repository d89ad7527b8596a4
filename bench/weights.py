"""Pretrained weights files: which file a model's weights are, where the library caches it, and getting it
there, failing fast and in one sentence offline. Names are canonical (`tv:NAME`, `timm:NAME`); models.py
builds the networks, this module only finds and fetches their files."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchvision.models import get_model_weights
from torchvision.models._api import WeightsEnum

from bench.errors import UnknownModelError, WeightsUnavailableError, close_matches

DOWNLOAD_TIMEOUT_S = 15.0  # per socket operation: a dead network fails in seconds instead of hanging a worker


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


def location(name: str, weights: str) -> tuple[str, Path, str]:
    """(file or hub folder, the directory the library caches it in, the URL it comes from)."""
    source, _, arch = name.partition(":")
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if source == "tv":
        url = tv_member(arch, weights).url
        return Path(urlparse(url).path).name, checkpoints, url
    cfg = timm_cfg(arch, weights)
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return f"models--{cfg.hf_hub_id.replace('/', '--')}", Path(constants.HF_HUB_CACHE), constants.ENDPOINT
    return Path(urlparse(cfg.url).path).name, checkpoints, cfg.url


def is_cached(name: str, weights: str) -> bool:
    item, folder, _ = location(name, weights)
    if not item.startswith("models--"):
        return (folder / item).is_file()
    from huggingface_hub import try_to_load_from_cache

    cfg = timm_cfg(name.partition(":")[2], weights)
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    return any(isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str) for f in files)


@contextmanager
def downloading(name: str, weights: str) -> Iterator[None]:
    """Network work for these weights: sockets time out, and any network failure becomes one sentence."""
    # urllib (under torch.hub) waits forever on a silent network unless sockets carry a default timeout.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except OSError as exc:  # URLError, DNS failures, refused connections, socket timeouts, a download cut midway
        raise _unavailable(name, weights, exc) from None
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable(name: str, weights: str, exc: BaseException) -> WeightsUnavailableError:
    item, folder, _ = location(name, weights)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsUnavailableError(
        f"{name}: weights {weights} are not cached ({item} is not in {folder}) and could not be downloaded "
        f"({reason}); run `bench fetch {name}` on a machine with internet and copy {item} into {folder}, "
        f"or set pretrained: false"
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
        elif item.startswith("models--") and _hf_offline():
            raise OSError("HF_HUB_OFFLINE is set")
        else:  # huggingface_hub retries a dead network for about 25 s per file: one connection tells sooner
            host = urlparse(url)
            socket.create_connection((host.hostname, host.port or 443)).close()
    return folder / item


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)
