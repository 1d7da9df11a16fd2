"""Model weights on disk in Hugging Face's layout: one ``model.safetensors``, or shards
``model-00001-of-0000N.safetensors`` with a ``model.safetensors.index.json`` that maps each tensor
to its shard (as ``transformers``' ``save_pretrained(max_shard_size=...)`` writes them).

Writes are atomic per file (temporary name, then rename) and the index comes last, so a reader
never sees an index naming shards that are not there; files of an earlier save in the other
layout are removed after the new one is complete.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from turbos.config import DamagedFileError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or text such as "5GB", "500MB", "2GiB" (as transformers reads it)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", size.upper())
    if not match:
        raise ValueError(
            f"cannot read size {size!r}: give bytes or a number with KB, MB, GB, KiB, MiB or GiB"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a directory's weights, in shard order."""
    directory = Path(directory)
    index = directory / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise DamagedFileError(index, err) from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    if (directory / SINGLE).exists():
        return [directory / SINGLE]
    raise FileNotFoundError(f"no {SINGLE} or {INDEX} in {directory}")


def load_state_dict(
    directory: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's weights, single file or sharded; a damaged or missing shard
    raises DamagedFileError / FileNotFoundError naming it."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        if not path.exists():
            raise FileNotFoundError(f"weight shard {path} named by {Path(directory) / INDEX} is missing")
        try:
            state.update(load_file(str(path), device=str(device)))
        except SafetensorError as err:
            raise DamagedFileError(path, err) from None
    return state


def save_state_dict(
    state: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write ``state`` as one file, or as shards of at most ``max_shard_size`` bytes each (a tensor
    larger than that gets a shard of its own) plus the index. Returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    meta = {"format": "pt", **(metadata or {})}
    stale = [directory / SINGLE, directory / INDEX, *directory.glob("model-*-of-*.safetensors")]
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for name, shard in zip(names, shards, strict=True):
        tmp = directory / f"{name}.tmp"
        save_file(shard, str(tmp), metadata=meta)
        os.replace(tmp, directory / name)
        written.append(directory / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        tmp = directory / f"{INDEX}.tmp"
        tmp.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(tmp, directory / INDEX)
        written.append(directory / INDEX)
    for path in stale:
        if (
            path not in written
            and path.exists()
            and (path.name in (SINGLE, INDEX) or _SHARD.fullmatch(path.name))
        ):
            path.unlink()
    return written
