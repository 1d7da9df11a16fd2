"""The TurboS hybrid network: embeddings -> layers from the A/M/F layout -> final norm -> LM head.

Every layer is one pre-norm residual layer: x = x + mixer(RMSNorm(x)), where the mixer is
attention (A), Mamba2 (M) or a feed-forward MoE / dense SwiGLU (F) (report §2.2).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from turbos.config import TurboSConfig
from turbos.model.attention import Attention
from turbos.model.cache import HybridCache
from turbos.model.mamba2 import Mamba2Mixer
from turbos.model.moe import MoE, MoEStats, RoutedExperts, SwiGLU
from turbos.model.norm import RMSNorm
from turbos.model.rope import RotaryEmbedding

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    """lm_loss + aux_loss, when labels are given."""
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    """Weighted MoE router losses summed over layers (0 without MoE layers)."""
    past_key_values: HybridCache | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)


class TurboSLayer(nn.Module):
    """One pre-norm residual layer of kind 'A', 'M' or 'F'."""

    def __init__(self, kind: str, config: TurboSConfig) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if kind == "A":
            self.mixer: nn.Module = Attention(config)
        elif kind == "M":
            self.mixer = Mamba2Mixer(config)
        elif config.ffn_type == "moe":
            self.mixer = MoE(config)
        else:
            self.mixer = SwiGLU(config.hidden_size, config.intermediate_size)


def build_attention_mask(
    attention_mask: torch.Tensor | None, num_new: int, num_past: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (b, 1, T, past + T) mask for SDPA, or None when plain causal attention is exact.

    ``attention_mask`` (b, past + T) marks real tokens with 1 and padding with 0. Every query may
    see itself, so padded rows stay finite (their outputs are never used).
    """
    if attention_mask is None and (num_past == 0 or num_new == 1):
        return None
    total = num_past + num_new
    q_pos = torch.arange(num_past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, total)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :].bool()
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


class TurboSModel(nn.Module):
    """The decoder stack without the LM head."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TurboSLayer(kind, config) for kind in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = (  # None in a layout without attention layers
            RotaryEmbedding(config.attn_head_dim, config.rope_theta, config.rope_alpha)
            if "A" in config.layer_types
            else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: HybridCache | None = None,
        router_losses: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, list[MoEStats]]:
        """Final hidden states, summed MoE router losses (0 without ``router_losses``) and
        per-layer routing stats (empty without ``router_losses``)."""
        b, T = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None:
            if attention_mask.shape != (b, past + T):
                raise ValueError(
                    f"attention_mask must have shape (batch, past + new) = {(b, past + T)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(b, T)
            else:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        token_mask = None if attention_mask is None else attention_mask[:, past:]

        attn_mask = build_attention_mask(attention_mask, T, past, input_ids.device)
        caches = past_key_values.layers if past_key_values is not None else [None] * len(self.layers)
        out = self.run_layers(input_ids, position_ids, attn_mask, caches, token_mask, router_losses)
        if past_key_values is not None:
            past_key_values.seen_tokens += T
        return out

    def run_layers(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: torch.Tensor | None,
        caches: Sequence[object | None],
        token_mask: torch.Tensor | None = None,
        router_losses: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, list[MoEStats]]:
        """The stack on prepared inputs: ``attn_mask`` as ``build_attention_mask`` makes it and one
        cache (or None) per layer. No host synchronisation, so a CUDA graph can capture a decode
        step (``turbos.serve.cuda_graph``)."""
        h = self.embed_tokens(input_ids)
        rotary = None if self.rotary_emb is None else self.rotary_emb(position_ids, h.dtype)
        aux = h.new_zeros((), dtype=torch.float32)
        stats: list[MoEStats] = []
        for layer, cache in zip(self.layers, caches, strict=True):
            x = layer.norm(h)
            if layer.kind == "A":
                x = layer.mixer(x, rotary, attn_mask, cache)
            elif layer.kind == "M":
                x = layer.mixer(x, cache, token_mask)
            elif isinstance(layer.mixer, MoE):
                x, loss, layer_stats = layer.mixer(x, token_mask, router_losses)
                if router_losses:
                    aux = aux + loss
                    stats.append(layer_stats)
            else:
                x = layer.mixer(x)
            h = h + x
        return self.norm(h), aux, stats


class TurboSForCausalLM(nn.Module):
    """TurboS language model. Hugging Face style: forward(input_ids, attention_mask, ..., labels)."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.config = config
        self.model = TurboSModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range); projections into the residual stream are scaled down by
        1/sqrt(2 * layers) (GPT-2) so the residual grows slowly with depth."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Embedding):
            module.weight.normal_(0, std)
        elif isinstance(module, (Attention, Mamba2Mixer, SwiGLU)):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    child.weight.normal_(0, out_std if name in ("o_proj", "out_proj", "down_proj") else std)
                    if child.bias is not None:
                        child.bias.zero_()
        elif isinstance(module, RoutedExperts):
            module.gate_up_proj.normal_(0, std)
            module.down_proj.normal_(0, out_std)
        elif isinstance(module, nn.Linear) and module.weight is not self.model.embed_tokens.weight:
            module.weight.normal_(0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: HybridCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        router_losses: bool | None = None,
    ) -> CausalLMOutput:
        """Logits for the next token at each position (or the last ``logits_to_keep``).

        labels: like input_ids, IGNORE_INDEX (-100) where no loss is wanted; shifted inside.
        use_cache: create a HybridCache if none is given and return it.
        router_losses: compute the MoE load-balancing / z losses and routing stats (``aux_loss``,
        ``moe_stats``); by default when training or when labels are given, so inference skips them.
        """
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config, input_ids.shape[0], device=input_ids.device)
        if router_losses is None:
            router_losses = self.training or labels is not None
        hidden, aux, stats = self.model(
            input_ids, attention_mask, position_ids, past_key_values, router_losses
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        out = CausalLMOutput(logits=logits, aux_loss=aux, past_key_values=past_key_values, moe_stats=stats)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position; do not combine with logits_to_keep")
            out.lm_loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
            out.loss = out.lm_loss + aux
        return out

    # ----------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors, each written to a temporary name and renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        tmp = directory / "model.safetensors.tmp"
        save_file(
            state, str(tmp), metadata={"format": "pt", "turbos_config": json.dumps(self.config.to_dict())}
        )
        os.replace(tmp, directory / "model.safetensors")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> TurboSForCausalLM:
        directory = Path(directory)
        config = TurboSConfig.from_pretrained(directory)
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"no model.safetensors in {directory}")
        model = cls(config)
        state = load_file(str(weights), device=str(device))
        strict_keys = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        missing, unexpected = strict_keys - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match config.json: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        model.to(device=device, dtype=dtype)
        return model.eval()
