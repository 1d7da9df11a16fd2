"""Weights on disk in Hugging Face's layout: one file, or shards with an index."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import small_config
from turbos.config import DamagedFileError
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import INDEX, SINGLE, load_state_dict, parse_size


def test_a_model_larger_than_one_shard_saves_sharded_and_loads_bitwise(tmp_path) -> None:
    model = TurboSForCausalLM(small_config())
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    index = json.loads((tmp_path / INDEX).read_text())
    assert len(shards) >= 3 and not (tmp_path / SINGLE).exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    state = model.state_dict()
    for shard in shards:  # at most 40 KB each, unless one tensor alone is larger
        names = [k for k, v in index["weight_map"].items() if v == shard.name]
        size = sum(state[k].numel() * state[k].element_size() for k in names)
        assert size <= 40_000 or len(names) == 1, (shard.name, size, names)
    loaded = TurboSForCausalLM.from_pretrained(tmp_path)
    theirs, ours = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)

    model.save_pretrained(tmp_path)  # one file now: the shards and the index are removed
    assert (tmp_path / SINGLE).exists() and not (tmp_path / INDEX).exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))


def test_a_missing_or_damaged_shard_is_named(tmp_path) -> None:
    TurboSForCausalLM(small_config()).save_pretrained(tmp_path, max_shard_size="40KB")
    first, second = sorted(tmp_path.glob("model-*-of-*.safetensors"))[:2]
    second.write_bytes(second.read_bytes()[:100])
    with pytest.raises(DamagedFileError, match=second.name):
        load_state_dict(tmp_path)
    first.unlink()
    with pytest.raises(FileNotFoundError, match=first.name):
        load_state_dict(tmp_path)


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("40kb", 40_000), (7, 7)]
)
def test_shard_sizes_read_as_transformers_reads_them(text, size) -> None:
    assert parse_size(text) == size


def test_an_unreadable_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="5 gigs"):
        parse_size("5 gigs")
