"""transformers' Auto classes for turbos model directories.

A turbos directory (config.json with ``"model_type": "turbos"``, safetensors weights, tokenizer
files) loads with ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` and generates with
``model.generate`` and ``pipeline("text-generation")``:

- ``TurboSHFConfig``: a ``PretrainedConfig`` holding every ``TurboSConfig`` field under its own
  name, validated by ``TurboSConfig`` (``to_turbos`` / ``from_turbos`` convert). It refuses an
  unknown key as ``TurboSConfig.from_dict`` does.
- ``TurboSHFForCausalLM``: ``PreTrainedModel`` + ``GenerationMixin`` whose submodules are the ones
  ``TurboSForCausalLM`` builds, ``model`` (our ``TurboSModel``) and ``lm_head``, so both classes
  have the same state-dict keys and load each other's directories by name, with no conversion;
  the same seed gives the same initial weights too. Decoding state is our ``HybridCache``: the
  cache-creation hook ``_prepare_cache_for_generation`` builds it and ``_reorder_cache`` serves
  beam search.
- ``save_hf``: a complete Hugging Face directory (config.json with ``architectures``, weights,
  tokenizer with the chat template, generation_config.json).

Registration: importing this module registers the two classes with ``AutoConfig`` and
``AutoModelForCausalLM``. ``import turbos`` does not import transformers (over a second); it puts a
finder on ``sys.meta_path`` that imports this module as soon as transformers' ``configuration_auto``
has loaded (see ``turbos/__init__.py``), so ``import turbos`` followed by any use of the Auto
classes finds ``"turbos"`` registered.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from turbos.config import HF_BOOKKEEPING_KEYS, ConfigError, TurboSConfig
from turbos.data.tokenizer import END_TOKEN, save_tokenizer
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.model.hybrid import causal_lm_loss
from turbos.model.rope import RotaryEmbedding
from turbos.serve.chat_template import save_chat_template

if TYPE_CHECKING:
    from transformers.generation import GenerationMode
    from transformers.utils.loading_report import LoadStateDictInfo

TURBOS_FIELDS = tuple(f.name for f in dataclasses.fields(TurboSConfig) if f.init)

# Keyword arguments transformers itself passes to a config class while loading one (``from_dict``'s
# valid fields, the name of the directory) and that ``PretrainedConfig.__post_init__`` consumes.
_HF_LOAD_KWARGS = frozenset(
    {
        "model_type",
        "name_or_path",
        "num_labels",
        "attn_implementation",
        "experts_implementation",
        "output_attentions",
    }
)


class TurboSHFConfig(PretrainedConfig):
    """Every ``TurboSConfig`` field as a transformers config attribute."""

    model_type = "turbos"

    def __post_init__(self, **kwargs: Any) -> None:
        """Take the turbos fields out of ``kwargs``, validate them with ``TurboSConfig`` (defaults
        fill the missing ones) and refuse a key that is neither ours nor transformers'."""
        ours = {name: kwargs.pop(name) for name in TURBOS_FIELDS if name in kwargs}
        unknown = sorted(
            k
            for k in kwargs
            if k not in HF_BOOKKEEPING_KEYS and k not in _HF_LOAD_KWARGS and not k.startswith("_")
        )
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(TURBOS_FIELDS)}")
        for name, value in TurboSConfig.from_dict(ours).to_dict().items():
            if name != "model_type":
                setattr(self, name, value)
        super().__post_init__(**kwargs)

    @classmethod
    def from_turbos(cls, config: TurboSConfig, **kwargs: Any) -> TurboSHFConfig:
        """The transformers config of a ``TurboSConfig`` (``kwargs``: transformers fields)."""
        return cls(**{**config.to_dict(), **kwargs})

    def to_turbos(self) -> TurboSConfig:
        """The ``TurboSConfig`` these attributes describe, validated."""
        return TurboSConfig.from_dict({name: getattr(self, name) for name in TURBOS_FIELDS})

    @property
    def num_hidden_layers(self) -> int:
        return self.to_turbos().num_hidden_layers

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict, with an infinite time-step bound written as None (JSON null), as
        ``TurboSConfig`` writes it."""
        out = super().to_dict()
        out["time_step_limit"] = [None if math.isinf(v) else v for v in out["time_step_limit"]]
        return out


class TurboSHFForCausalLM(PreTrainedModel, GenerationMixin):
    """``TurboSForCausalLM``'s modules under transformers' ``PreTrainedModel`` and ``generate``."""

    config_class = TurboSHFConfig
    base_model_prefix = "model"
    _no_split_modules = ["TurboSLayer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TurboSHFConfig) -> None:
        super().__init__(config)
        built = TurboSForCausalLM(config.to_turbos())  # our init, and ties the head when asked
        self.model = built.model
        self.lm_head = built.lm_head
        self.post_init()

    @property
    def turbos_config(self) -> TurboSConfig:
        """The ``TurboSConfig`` the modules were built with."""
        return self.model.config

    def _init_weights(self, module: nn.Module) -> None:
        """Weights come from the checkpoint or from ``TurboSForCausalLM``'s construction; only the
        rotary table, a buffer that is never saved, is computed here (a model loaded on the meta
        device gets it back)."""
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()

    def _adjust_missing_and_unexpected_keys(self, loading_info: LoadStateDictInfo) -> None:
        """transformers' clean-up of the loading report, then refuse a checkpoint that lacks
        weights: transformers would leave them uninitialised (``_init_weights`` draws nothing)."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        missing = sorted(set(loading_info.missing_keys) - set(self.all_tied_weights_keys))
        if missing:
            raise ValueError(
                f"the checkpoint does not match config.json: {len(missing)} weight(s) missing, "
                f"e.g. {missing[:5]}"
            )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
    ) -> MoeCausalLMOutputWithPast | tuple:
        """``TurboSForCausalLM.forward`` in transformers' terms: input_ids (b, T); attention_mask
        (b, past + T), 0 on (left) padding; cache: a ``HybridCache``, created when ``use_cache``;
        labels like input_ids, -100 where no loss is wanted, shifted inside. ``loss`` is the LM
        loss plus the MoE router losses (``aux_loss``), computed when training or given labels."""
        if use_cache and cache is None:
            cache = HybridCache(self.turbos_config, input_ids.shape[0], device=input_ids.device)
        router_losses = self.training or labels is not None
        hidden, aux, _ = self.model(input_ids, attention_mask, position_ids, cache, router_losses)
        if logits_to_keep:
            if labels is not None:
                raise ValueError("labels need logits for every position; do not combine with logits_to_keep")
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels) + aux
        out = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux if router_losses else None,
            logits=logits,
            cache=cache,
        )
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs: Any) -> dict[str, Any]:
        """transformers' inputs less ``position_ids``: the model counts positions from the
        attention mask and the cache itself, so generation positions are exactly ours."""
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        inputs.pop("position_ids", None)
        return inputs

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        generation_mode: GenerationMode,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """A ``HybridCache`` for every row ``generate`` decodes (beams and returned sequences
        included), unless the caller passed one or turned the cache off."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            return
        if generation_config.cache_implementation is not None:
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r}: turbos models decode "
                "with their own HybridCache; leave cache_implementation unset"
            )
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        model_kwargs["cache"] = HybridCache(self.turbos_config, rows, device=self.device)

    def _reorder_cache(self, cache: HybridCache, beam_idx: torch.LongTensor) -> HybridCache:
        """The cache rows of the beams that continue (beam search)."""
        return cache.index_select(beam_idx.to(self.device))

    def _valid_auto_compile_criteria(
        self, model_kwargs: dict[str, Any], generation_config: GenerationConfig
    ) -> bool:
        """Never: ``HybridCache`` grows with the sequence, so there is nothing static to compile."""
        return False


def save_hf(
    model: TurboSForCausalLM,
    tokenizer: Tokenizer,
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write a complete Hugging Face directory: config.json (with ``architectures``, loadable by
    ``AutoConfig`` and by ``TurboSConfig``), the weights (sharded beyond ``max_shard_size``), the
    tokenizer files with our chat template in tokenizer_config.json, and generation_config.json
    (bos, pad, and the eos ids: ``<|eos|>`` and the end of a chat turn, ``<|end|>``)."""
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size)
    config = TurboSHFConfig.from_turbos(
        model.config, architectures=[TurboSHFForCausalLM.__name__], dtype=model.lm_head.weight.dtype
    )
    tmp = directory / "config.json.tmp"  # replaces ours atomically, as our files are written
    tmp.write_text(config.to_json_string())
    os.replace(tmp, directory / "config.json")
    save_tokenizer(tokenizer, directory)
    save_chat_template(directory)
    end_id = tokenizer.token_to_id(END_TOKEN)
    eos = [model.config.eos_token_id, *([end_id] if end_id is not None else [])]
    GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=model.config.pad_token_id,
    ).save_pretrained(directory)
    return directory


def register() -> None:
    """Register the classes with transformers' ``AutoConfig`` and ``AutoModelForCausalLM``."""
    AutoConfig.register(TurboSHFConfig.model_type, TurboSHFConfig)
    AutoModelForCausalLM.register(TurboSHFConfig, TurboSHFForCausalLM)


register()
