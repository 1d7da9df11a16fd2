"""Checkpoint conversion between Hugging Face model types and turbos.

An adapter is a module with ``MODEL_TYPE`` and four pure functions (as torchtitan's state-dict
adapters): ``config_from_hf(dict) -> TurboSConfig``, ``state_from_hf(state, config)``,
``config_to_hf(config) -> dict`` and ``state_to_hf(state, config)``. An option the turbos layers
cannot express is refused by name (``UnsupportedCheckpointError``), never approximated.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

from turbos.config import ConfigError, DamagedFileError, TurboSConfig
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import load_state_dict, save_state_dict

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class UnsupportedCheckpointError(ConfigError):
    """A Hugging Face checkpoint uses an option turbos cannot express; the message names it."""


def adapters() -> dict[str, ModuleType]:
    """model_type -> adapter module."""
    from turbos.interop import hunyuan, nemotron_h

    return {m.MODEL_TYPE: m for m in (nemotron_h, hunyuan)}


def adapter(model_type: str) -> ModuleType:
    known = adapters()
    if model_type not in known:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} has no converter; supported: {sorted(known)}"
        )
    return known[model_type]


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise DamagedFileError(path, err) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{path} has no model_type: not a Hugging Face model directory")
    return data


def refuse(hf: dict, model_type: str, checks: dict[str, object]) -> None:
    """Raise UnsupportedCheckpointError naming every key of ``hf`` whose value is not the
    supported one (``checks``: key -> supported value, or a callable value -> bool)."""
    bad = []
    for key, ok in checks.items():
        if key not in hf:
            continue
        value = hf[key]
        if not (ok(value) if callable(ok) else value == ok):
            bad.append(f"{key}={value!r}")
    if bad:
        raise UnsupportedCheckpointError(f"{model_type}: unsupported option(s) {', '.join(bad)}")


def turbos_keys(config: TurboSConfig) -> list[str]:
    """The state-dict keys of a turbos model of ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return list(TurboSForCausalLM(config).state_dict())


def model_from_hf(directory: str | os.PathLike) -> TurboSForCausalLM:
    """A turbos model holding a Hugging Face checkpoint's weights (fp32)."""
    hf = read_hf_config(directory)
    conv = adapter(hf["model_type"])
    config = conv.config_from_hf(hf)
    state = conv.state_from_hf(load_state_dict(directory), config)
    model = TurboSForCausalLM(config)
    model.load_weights(state, f"{directory}: converted weights do not match the config")
    return model.eval()


def copy_tokenizer(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in ``src`` to ``out``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(out) / name)
            copied.append(name)
    return copied


def convert_from_hf(
    src: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> TurboSForCausalLM:
    """A Hugging Face directory (config.json, safetensors weights, tokenizer files) -> a turbos
    directory that ``TurboSForCausalLM.from_pretrained`` and ``turbos serve`` load."""
    model = model_from_hf(src)
    model.save_pretrained(out, max_shard_size)
    copy_tokenizer(src, out)
    return model


def convert_to_hf(
    src: str | os.PathLike, out: str | os.PathLike, model_type: str, max_shard_size: int | str = "5GB"
) -> dict:
    """A turbos directory -> a Hugging Face directory of ``model_type`` (where the architecture
    allows); returns the written config."""
    conv = adapter(model_type)
    config = TurboSConfig.from_pretrained(src)
    hf = conv.config_to_hf(config)
    state = conv.state_to_hf(dict(load_state_dict(src)), config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_state_dict({k: v.to(torch.float32) for k, v in state.items()}, out, max_shard_size)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(hf, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    copy_tokenizer(src, out)
    return hf
