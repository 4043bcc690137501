"""Where a checkpoint's files are: a local directory, or a Hugging Face Hub model id resolved through the Hub cache
(``huggingface_hub.snapshot_download``: a cached model loads offline, ``HF_HUB_OFFLINE=1``), and which of its
safetensors files hold the weights (the files the Hugging Face loaders read)."""

from __future__ import annotations

import glob
import json
import os

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file
from torch import Tensor

CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME = "config.json", "model.safetensors", "model.safetensors.index.json"
HUB_PATTERNS = ("*.json", "*.safetensors")  # all a checkpoint needs from a Hub repo (no tokenizer, no *.bin)


def read_tensors(path: str) -> dict[str, Tensor]:
    """Every tensor of the checkpoint directory ``path``, in the files the Hugging Face loaders read
    (:func:`weight_files`)."""
    return read_files(weight_files(path))


def read_files(files: list[str]) -> dict[str, Tensor]:
    """Every tensor of the safetensors ``files``; a file that is not one is a ``ValueError`` naming it."""
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except Exception as exc:  # safetensors raises its own error types on a truncated or foreign file
            raise ValueError(f"from_pretrained: {f} is not a safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors


def weight_files(path: str) -> list[str]:
    """The files of the checkpoint directory ``path`` that hold its weights, as the Hugging Face loaders find them:
    ``model.safetensors`` when present, else the shards ``model.safetensors.index.json`` lists, else every
    ``*.safetensors`` file (other names, e.g. a ``save_memory`` file, are not weights when one of the first two is)."""
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            what = f"{type(exc).__name__}: {exc}"
            raise ValueError(f"from_pretrained: {index} is not a safetensors index ({what})") from None
        files = [os.path.join(path, shard) for shard in shards]
        absent = [shard for shard, f in zip(shards, files) if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are not in {path}: {absent}")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def resolve_checkpoint(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: bool | str | None = None,
    subfolder: str = "",
    force_download: bool = False,
) -> str:
    """The local directory of checkpoint ``path``: ``path`` itself when it is a directory, else the snapshot of the
    Hub model id ``path`` (``owner/name`` at ``revision``, default ``main``) in the Hub cache (``cache_dir``, default
    ``HF_HUB_CACHE``), downloaded (``config.json`` and ``*.safetensors`` only) unless it is there (or
    ``force_download``) or the Hub is off (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). ``revision``,
    ``cache_dir``, ``token`` and ``force_download`` are not used for a directory. ``subfolder``: the checkpoint is
    that folder of the directory or repository. A string that is neither, or an id that resolves to nothing, is a
    ``ValueError`` naming it."""
    if not isinstance(subfolder, str):
        raise TypeError(f"from_pretrained: subfolder must be a str, got {type(subfolder).__name__}")
    if not subfolder:
        return _resolve(path, revision, cache_dir, local_files_only, token, force_download, list(HUB_PATTERNS))
    patterns = [f"{subfolder.strip('/')}/{pattern}" for pattern in HUB_PATTERNS]
    root = _resolve(path, revision, cache_dir, local_files_only, token, force_download, patterns)
    directory = os.path.join(root, subfolder)
    if not os.path.isdir(directory):
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} has no subfolder {subfolder!r} ({directory})")
    return directory


def _resolve(path, revision, cache_dir, local_files_only, token, force_download, patterns: list[str]) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"from_pretrained: path must be a checkpoint directory or a Hub model id (str or os.PathLike), got {path!r}"
        )
    if os.path.isdir(path):
        return os.fspath(path)
    if os.path.exists(path):
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} is a file, not a checkpoint directory nor a Hub id")
    if not isinstance(path, str):  # a Path names a local directory, never a Hub id
        raise ValueError(f"from_pretrained: {os.fspath(path)!r} is not an existing directory")
    cache = os.fspath(cache_dir) if cache_dir is not None else hub_constants.HF_HUB_CACHE
    at = f"{path!r} (revision {revision or hub_constants.DEFAULT_REVISION!r})"
    try:
        return snapshot_download(
            path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            allow_patterns=patterns,
            **({"force_download": True} if force_download else {}),
        )
    except HFValidationError as exc:
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor a valid Hub model id ('owner/name'): {exc}"
        ) from None
    except LocalEntryNotFoundError as exc:  # not (completely) in the cache, and the Hub is off or unreachable
        why = "the Hub is off (HF_HUB_OFFLINE=1 or local_files_only=True)"
        if not (local_files_only or hub_constants.is_offline_mode()):
            why = "the Hub could not be reached"
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor in the Hub cache {cache} (revision "
            f"{revision or hub_constants.DEFAULT_REVISION!r}), and {why} ({type(exc).__name__}: {exc})"
        ) from None
    except RevisionNotFoundError as exc:
        raise ValueError(f"from_pretrained: the Hub has no {at}: {exc}") from None
    except RepositoryNotFoundError as exc:  # also gated / private without a token
        raise ValueError(
            f"from_pretrained: {path!r} is neither a local directory nor a Hub model this token can read "
            f"(not found, private or gated: pass token=): {exc}"
        ) from None
    except HfHubHTTPError as exc:
        raise ValueError(f"from_pretrained: cannot fetch {at} from the Hub: {exc}") from None
