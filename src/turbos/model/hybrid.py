"""The TurboS hybrid network: embeddings -> layers from the A/M/F layout -> final norm -> LM head.

Every layer is one pre-norm residual layer: x = x + mixer(RMSNorm(x)), where the mixer is
attention (A), Mamba2 (M) or a feed-forward MoE / dense SwiGLU (F) (report §2.2). The layers of a
forward pass share one ``LayerContext`` (rotary tables, masks, packed-document ids, router losses),
and the stack is a plain loop over them, so hooks, activation checkpointing and parallelism apply
per layer from outside.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from turbos.config import TurboSConfig
from turbos.model.attention import Attention
from turbos.model.cache import AttentionCache, HybridCache, MambaCache
from turbos.model.context import LayerContext, build_attention_mask, check_seq_idx, packed_position_ids
from turbos.model.mamba2 import Mamba2Mixer
from turbos.model.moe import MoE, MoEStats, ReLU2MLP, RoutedExperts, SwiGLU, feed_forward
from turbos.model.norm import RMSNorm
from turbos.model.rope import RotaryEmbedding
from turbos.safetensors_io import INDEX, load_state_dict, save_state_dict, weight_files

WholeParams = Callable[[nn.Module, list[str]], contextlib.AbstractContextManager]
"""``TurboSForCausalLM.init_weights``'s hook: (module, parameter names) -> a context in which
those parameters are whole tensors."""

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss (fp32) of logits (b, T, vocab) against labels (b, T), shifted inside;
    IGNORE_INDEX where no loss is wanted."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@dataclass
class CausalLMOutput:
    """What ``TurboSForCausalLM.forward`` returns."""

    logits: torch.Tensor
    """(b, T, vocab); (b, logits_to_keep, vocab); or (n, vocab) at the positions of logits_index."""
    loss: torch.Tensor | None = None
    """lm_loss + aux_loss, when labels are given."""
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    """Weighted MoE router losses summed over layers (0 without MoE layers)."""
    past_key_values: HybridCache | None = None
    moe_stats: list[MoEStats] = field(default_factory=list)


class TurboSLayer(nn.Module):
    """One pre-norm residual layer of kind 'A', 'M', 'F' or 'D': h + mixer(norm(h)).

    Every mixer is called as ``mixer(x, ctx, cache)``; the feed-forward ones (MoE, dense SwiGLU or
    ReLU^2) through ``feed_forward``, which records the MoE router loss and stats in ``ctx``.
    """

    def __init__(self, kind: str, config: TurboSConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = kind
        self.layer_idx = layer_idx
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if kind == "A":
            self.mixer: nn.Module = Attention(config)
        elif kind == "M":
            self.mixer = Mamba2Mixer(config)
        elif kind == "F" and config.ffn_type == "moe":
            self.mixer = MoE(config)
        else:
            self.mixer = feed_forward(config.hidden_size, config.intermediate_size, config.mlp_activation)

    def forward(
        self,
        hidden_states: torch.Tensor,
        ctx: LayerContext,
        cache: AttentionCache | MambaCache | None = None,
    ) -> torch.Tensor:
        """hidden_states (b, T, hidden) -> (b, T, hidden). ``cache``: this layer's decoding state
        (None for feed-forward layers), updated in place."""
        mix = self.feed_forward if self.kind in "FD" else self.mixer
        return hidden_states + mix(self.norm(hidden_states), ctx, cache)

    def feed_forward(self, x: torch.Tensor, ctx: LayerContext, cache: None = None) -> torch.Tensor:
        """The MoE or dense feed-forward under the mixer interface: x (b, T, hidden) -> (b, T, hidden)."""
        if not isinstance(self.mixer, MoE):
            return self.mixer(x)
        out, loss, stats = self.mixer(x, ctx.token_mask, ctx.router_losses)
        if ctx.router_losses:
            ctx.record_router(self.layer_idx, loss, stats)
        return out


class TurboSModel(nn.Module):
    """The decoder stack without the LM head."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TurboSLayer(kind, config, i) for i, kind in enumerate(config.layer_types))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = (  # None without attention layers, or without RoPE
            RotaryEmbedding(config.attn_head_dim, config.rope_theta, config.rope_alpha)
            if "A" in config.layer_types and config.use_rope
            else None
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: HybridCache | None = None,
        router_losses: bool = True,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[MoEStats]]:
        """Final hidden states (b, T, hidden), summed MoE router losses (fp32 scalar, 0 without
        ``router_losses``) and per-layer routing stats (empty without ``router_losses``).

        input_ids (b, T); attention_mask (b, past + T), 0 on padding; position_ids (b, T), by
        default counted per document over real tokens; seq_idx (b, T) long, each token's document
        within its row (non-decreasing; ``turbos.model.context``). With a cache, a call without
        ``seq_idx`` after a packed one continues each row's last document.
        """
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
        documents, new_document = self._documents(seq_idx, past_key_values, b, T)
        if position_ids is None:
            if documents is not None:
                position_ids = packed_position_ids(documents, attention_mask)[:, past:]
            elif attention_mask is None:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(b, T)
            else:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

        ctx = self.layer_context(
            position_ids,
            attn_mask=build_attention_mask(attention_mask, T, past, input_ids.device, documents),
            token_mask=None if attention_mask is None else attention_mask[:, past:],
            seq_idx=None if documents is None else documents[:, past:],
            new_document=new_document,
            router_losses=router_losses,
        )
        caches = past_key_values.layers if past_key_values is not None else [None] * len(self.layers)
        hidden = self.run_layers(input_ids, ctx, caches)
        if past_key_values is not None:
            past_key_values.seen_tokens += T
            if documents is not None:
                past_key_values.seq_idx = documents
        return hidden, ctx.total_router_loss(hidden.device), ctx.stats_in_layer_order()

    @staticmethod
    def _documents(
        seq_idx: torch.Tensor | None, cache: HybridCache | None, b: int, T: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The document of every token, cached ones first, (b, past + T), or None when no call was
        packed; and ``LayerContext.new_document`` (b,) or None."""
        cached = cache.seq_idx if isinstance(cache, HybridCache) else None
        if seq_idx is None:
            if cached is None:
                return None, None
            return torch.cat([cached, cached[:, -1:].expand(b, T)], dim=1), None  # continue the last
        if cache is not None and not isinstance(cache, HybridCache):
            raise ValueError(f"packed sequences (seq_idx) with a cache need a HybridCache, not {type(cache)}")
        if tuple(seq_idx.shape) != (b, T):
            raise ValueError(f"seq_idx must have shape (batch, new) = {(b, T)}, got {tuple(seq_idx.shape)}")
        past = 0 if cache is None else cache.get_seq_length()
        # Tokens cached by unpacked calls are one document: the one the first new token is in.
        before = seq_idx[:, :1].expand(b, past) if cached is None else cached
        documents = torch.cat([before, seq_idx], dim=1)
        check_seq_idx(documents)
        new_document = None if cached is None else seq_idx[:, 0] != cached[:, -1]
        return documents, new_document

    def layer_context(self, position_ids: torch.Tensor, **fields: object) -> LayerContext:
        """A ``LayerContext`` with the rotary tables for position_ids (b, T) and the given fields."""
        rotary = None
        if self.rotary_emb is not None:
            rotary = self.rotary_emb(position_ids, self.embed_tokens.weight.dtype)
        return LayerContext(rotary=rotary, **fields)

    def run_layers(
        self, input_ids: torch.Tensor, ctx: LayerContext, caches: Sequence[object | None]
    ) -> torch.Tensor:
        """The stack on prepared inputs: input_ids (b, T), one cache (or None) per layer ->
        final-normed hidden states (b, T, hidden). No host synchronisation, so a CUDA graph can
        capture a decode step (``turbos.serve.cuda_graph``)."""
        h = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer(h, ctx, cache)
        return self.norm(h)


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
    def init_weights(self, whole: WholeParams | None = None) -> None:
        """Initialise every parameter and buffer as the constructor does, drawing the same random
        numbers in the same order, for a model built on the meta device and materialised with
        ``to_empty(device=...)``: under the same ``torch.manual_seed`` it then holds bitwise the
        weights of ``TurboSForCausalLM(config)`` built on that device.

        Construction draws in each submodule's ``reset_parameters`` (nn.Linear, nn.Conv1d,
        nn.Embedding, Mamba2's SSM init; norms and the rotary table draw nothing), children before
        their parent in registration order, then in the ``_init_weights`` pass; this replays
        both. ``to_empty`` also unties tied embeddings, so they are tied again in between.

        ``whole(module, names)``: a context in which those direct parameters of ``module`` are
        whole tensors to draw into (default: they are); a sharded model's materialiser
        (``turbos.distributed.fsdp``) gives the draws full-size tensors and keeps its shards."""
        whole = whole or (lambda module, names: contextlib.nullcontext())

        def reset(module: nn.Module) -> None:
            for child in module.children():
                reset(child)
            if module is not self and hasattr(module, "reset_parameters"):
                with whole(module, [name for name, _ in module.named_parameters(recurse=False)]):
                    module.reset_parameters()

        reset(self)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        in_apply_order: list[nn.Module] = []  # children before their parent, as nn.Module.apply
        self.apply(in_apply_order.append)
        for module in in_apply_order:
            self._init_weights(module, whole)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module, whole: WholeParams | None = None) -> None:
        """Normal(0, initializer_range); projections into the residual stream are scaled down by
        1/sqrt(2 * layers) (GPT-2) so the residual grows slowly with depth (``_init_plan``;
        ``whole`` as in ``init_weights``)."""
        for owner, name, std in self._init_plan(module):
            with whole(owner, [name]) if whole else contextlib.nullcontext():
                param = getattr(owner, name)
                param.zero_() if std is None else param.normal_(0, std)

    def _init_plan(self, module: nn.Module) -> list[tuple[nn.Module, str, float | None]]:
        """What ``_init_weights`` draws for ``module``, in order: (owner, parameter name, std of
        the normal draw, or None for zeros)."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        if isinstance(module, nn.Embedding):
            return [(module, "weight", std)]
        if isinstance(module, (Attention, Mamba2Mixer, SwiGLU, ReLU2MLP)):
            plan = []
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    plan.append(
                        (child, "weight", out_std if name in ("o_proj", "out_proj", "down_proj") else std)
                    )
                    if child.bias is not None:
                        plan.append((child, "bias", None))
            return plan
        if isinstance(module, RoutedExperts):
            return [(module, module.in_proj_name, std), (module, "down_proj", out_std)]
        if isinstance(module, nn.Linear) and module.weight is not self.model.embed_tokens.weight:
            return [(module, "weight", std)]
        return []

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
        seq_idx: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        """Logits (b, T, vocab) for the next token at each position (or the last ``logits_to_keep``).

        input_ids (b, T); attention_mask (b, past + T), 0 on padding; position_ids (b, T).
        labels: like input_ids, IGNORE_INDEX (-100) where no loss is wanted; shifted inside (mask
        the first token of each packed document, whose label the previous document would predict).
        use_cache: create a HybridCache if none is given and return it.
        router_losses: compute the MoE load-balancing / z losses and routing stats (``aux_loss``,
        ``moe_stats``); by default when training or when labels are given, so inference skips them.
        seq_idx: (b, T) long, each token's document within its row, for packed sequences
        (``turbos.model.context``); positions then restart at 0 in every document.
        logits_index: (n,) long flat positions (row * T + t): logits only there, (n, vocab), for
        losses on a few positions (SFT replies): the LM head and softmax skip the rest.
        """
        if logits_index is not None and (labels is not None or logits_to_keep):
            raise ValueError("logits_index selects its own positions; do not combine it with labels")
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config, input_ids.shape[0], device=input_ids.device)
        if router_losses is None:
            router_losses = self.training or labels is not None
        hidden, aux, stats = self.model(
            input_ids, attention_mask, position_ids, past_key_values, router_losses, seq_idx
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        elif logits_index is not None:
            hidden = hidden.flatten(0, 1).index_select(0, logits_index)
        logits = self.lm_head(hidden)
        out = CausalLMOutput(logits=logits, aux_loss=aux, past_key_values=past_key_values, moe_stats=stats)
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need logits for every position; do not combine with logits_to_keep")
            out.lm_loss = causal_lm_loss(logits, labels)
            out.loss = out.lm_loss + aux
        return out

    # ----------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """config.json + model.safetensors (or shards of at most ``max_shard_size`` with their
        index, as Hugging Face writes them), each written to a temporary name and renamed."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(directory)
        state = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_state_dict(
            state, directory, max_shard_size, metadata={"turbos_config": json.dumps(self.config.to_dict())}
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> TurboSForCausalLM:
        directory = Path(directory)
        config = TurboSConfig.from_pretrained(directory)
        files = weight_files(directory)
        weights = files[0] if len(files) == 1 else directory / INDEX  # what errors name
        model = cls(config)
        state = load_state_dict(directory, device)
        model.load_weights(state, f"{weights} does not match config.json")
        model.to(device=device, dtype=dtype)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], mismatch: str) -> None:
        """Load a full state dict (``lm_head.weight`` may be absent when tied) after checking its
        names and shapes; a mismatch raises ValueError starting with ``mismatch``."""
        expected = self.state_dict()
        needed = set(expected) - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        missing, unexpected = needed - set(state), set(state) - set(expected)
        if missing or unexpected:
            raise ValueError(
                f"{mismatch}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        wrong = sorted(name for name, tensor in state.items() if tensor.shape != expected[name].shape)
        if wrong:
            raise ValueError(
                f"{mismatch}: {len(wrong)} tensor(s) of another shape, e.g. {wrong[0]} is "
                f"{tuple(state[wrong[0]].shape)}, the config needs {tuple(expected[wrong[0]].shape)}"
            )
        self.load_state_dict(state, strict=False)
