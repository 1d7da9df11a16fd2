"""Context parallelism (report §4): one batch of long sequences split along time over the ranks of
a group, applied to a built ``TurboSForCausalLM`` from outside.

Rank r of CP ranks holds the tokens [r T / CP, (r + 1) T / CP) of every row (``shard_sequence``).
``context_parallel(model, group, mode)`` puts forward hooks on the model and its mixers (module
tree, parameter names and state dict unchanged; ``ContextParallel.remove`` takes them off):

- the model gets the shard's positions, r T / CP onwards, for RoPE;
- attention all-gathers K and V over the group (differentiable: backward reduce-scatters their
  gradients) and attends to the shards up to its own with the causal mask shifted by its offset;
- Mamba2 layers get the state entering their shard from the ranks before, in one of the report's
  two ways (``MODES``), through the mixer's own cache path (``MambaCache``: the conv window and
  SSM state a shard starts from) and ``LayerContext.ssd_scan``:

  "sequential": rank r receives rank r - 1's final conv window (its last kernel - 1 conv inputs)
  and SSM state, runs its shard from them and sends its own to rank r + 1 (point to point). The
  send and receive are autograd functions: backward sends the gradient of the received state
  back to rank r - 1, which adds it to its final state's gradient. The ranks run one after the
  other, layer by layer, as a pipeline.

  "parallel": every rank all-gathers the conv windows first (the one before its shard is rank
  r - 1's last kernel - 1 conv inputs), then scans its shard from a zero state, getting its local
  final state S_r and its total decay d_r = exp(sum over the shard of dt A) per head. It
  all-gathers the decays (one number per row and head) and sends every later rank r' its
  contribution S_r prod_{r < i < r'} d_i in one reduce-scatter, which sums them into the true
  initial state of each rank: S0_r' = sum_{j < r'} S_j prod_{j < i < r'} d_i. Each rank then adds
  what that state gives its outputs, y_t += C_t . exp(sum_{s <= t} dt_s A) S0 (the term the
  chunked scan adds for a chunk's carried state). Backward: the all-gather's gradient is a
  reduce-scatter and the reduce-scatter's an all-gather. No rank waits for another beyond the
  collectives, which every rank's graph holds in the same order (backward runs them all).

Mamba2 state passing sends O(batch x heads x head_dim x state) per rank and layer, whatever the
sequence length; ``ContextParallel.sent`` counts the bytes each rank sends, by layer and pass
(a collective counts what a ring algorithm sends from each rank: (CP - 1) x its share).
Feed-forward layers are per token and need nothing.

The LM loss over the whole sequence is the sum of every shard's token losses over all counted
tokens (``context_parallel_loss``); summing the ranks' gradients (``all_reduce_gradients``, or the
data-parallel reduction where the CP group is part of it) gives the gradient of that loss.
Limitations: no padding, packed documents (``seq_idx``) or decoding cache under CP; the MoE
router loss is each shard's, averaged; the sequential form cannot be recomputed by activation
checkpointing (the recomputation would receive again).
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.utils.hooks import RemovableHandle

from turbos.kernels.ssd import ssd_scan
from turbos.model.attention import Attention
from turbos.model.cache import AttentionCache, MambaCache
from turbos.model.context import LayerContext
from turbos.model.hybrid import IGNORE_INDEX, TurboSForCausalLM
from turbos.model.mamba2 import Mamba2Mixer

MODES = ("sequential", "parallel")
"""How Mamba2 layers pass their state across the ranks (module docstring)."""

# As in the SSD scan: decays below exp(-60) are zero at fp32 precision; clamping there keeps
# exp() off subnormal floats (a slow path on CPUs).
_MIN_LOG_DECAY = -60.0


class ContextParallel:
    """The context parallelism ``context_parallel`` put on a model: its group, this rank's place
    in it, and the bytes this rank has sent."""

    def __init__(self, model: TurboSForCausalLM, group: dist.ProcessGroup | None, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"context parallel mode must be one of {MODES}, got {mode!r}")
        self.group = group
        self.mode = mode
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.sent: Counter[tuple[int, str]] = Counter()
        """Bytes this rank sent, by (layer index, "forward" | "backward")."""
        self._handles: list[RemovableHandle] = [
            model.model.register_forward_pre_hook(self._model_inputs, with_kwargs=True)
        ]
        for layer in model.model.layers:
            if isinstance(layer.mixer, Attention):
                hook = partial(self._attention_inputs, layer.layer_idx)
                self._handles.append(layer.mixer.register_forward_pre_hook(hook))
            elif isinstance(layer.mixer, Mamba2Mixer):
                hook = partial(self._mamba_inputs, layer.layer_idx)
                self._handles.append(layer.mixer.register_forward_pre_hook(hook))
                if mode == "sequential" and self.rank < self.world - 1:
                    hook = partial(self._send_final_state, layer.layer_idx)
                    self._handles.append(layer.mixer.register_forward_hook(hook))

    def remove(self) -> None:
        """Take the hooks off: the model runs whole sequences again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------------------ the model
    def _model_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Refuse what CP does not support; positions count from the shard's offset."""
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        inputs = bound.arguments
        mask = inputs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise ValueError("context parallelism does not support padding (attention_mask with zeros)")
        if inputs.get("past_key_values") is not None or inputs.get("seq_idx") is not None:
            raise ValueError("context parallelism does not support a decoding cache or packed rows (seq_idx)")
        if inputs.get("position_ids") is None:
            input_ids = inputs["input_ids"]
            b, T = input_ids.shape
            start = self.rank * T
            inputs["position_ids"] = torch.arange(start, start + T, device=input_ids.device).expand(b, T)
        return bound.args, bound.kwargs

    # ---------------------------------------------------------------------------- attention
    def _attention_inputs(
        self, layer_idx: int, mixer: Attention, args: tuple[Any, ...]
    ) -> tuple[torch.Tensor, LayerContext, AttentionCache]:
        """Attention sees the keys and values of every shard up to its own, causally."""
        x, ctx, _ = _mixer_args(args)
        T = x.shape[1]
        q_pos = torch.arange(self.rank * T, (self.rank + 1) * T, device=x.device)
        k_pos = torch.arange((self.rank + 1) * T, device=x.device)
        mask = (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, T, (rank + 1) T)
        return x, replace(ctx, attn_mask=mask), _GatheredKV(self, layer_idx)

    # ------------------------------------------------------------------------------- Mamba2
    def _mamba_inputs(
        self, layer_idx: int, mixer: Mamba2Mixer, args: tuple[Any, ...]
    ) -> tuple[torch.Tensor, LayerContext, MambaCache]:
        """The mixer runs its shard from the state entering it (a ``MambaCache``)."""
        x, ctx, _ = _mixer_args(args)
        b, T, _ = x.shape
        K = mixer.conv_kernel
        conv_shape = (b, K - 1, mixer.conv_dim)
        ssm_shape = (b, mixer.num_heads, mixer.head_dim, mixer.state_size)
        if self.mode == "sequential":
            if self.rank == 0:
                conv = x.new_zeros(conv_shape, dtype=torch.float32)
                ssm = x.new_zeros(ssm_shape, dtype=torch.float32)
            else:
                numel = [conv_shape[1] * conv_shape[2], ssm_shape[1] * ssm_shape[2] * ssm_shape[3]]
                anchor = torch.empty(0, device=x.device, requires_grad=torch.is_grad_enabled())
                state = _RecvState.apply(anchor, (b, sum(numel)), self, layer_idx)
                conv, ssm = state.split(numel, dim=1)
                conv, ssm = conv.reshape(conv_shape), ssm.reshape(ssm_shape)
            return x, ctx, MambaCache(conv, ssm)
        if T < K - 1:
            raise ValueError(f"parallel context parallelism needs shards of >= {K - 1} tokens, got {T}")
        # The last K - 1 conv inputs of this shard (in_proj packs z | x B C | dt).
        tail = mixer.in_proj(x[:, T - (K - 1) :])[..., mixer.d_inner : mixer.d_inner + mixer.conv_dim]
        tails = _AllGather.apply(tail.float(), self, layer_idx)
        # Rank 0 starts from zeros, still taken from the gather: every rank's graph then holds the
        # same collectives, which backward must run on all ranks in the same order.
        conv = tails[self.rank - 1] * float(self.rank > 0)
        ssm = x.new_zeros(ssm_shape, dtype=torch.float32)
        scan = partial(self._parallel_scan, layer_idx)
        return x, replace(ctx, ssd_scan=scan), MambaCache(conv, ssm)

    def _send_final_state(
        self, layer_idx: int, mixer: Mamba2Mixer, args: tuple[Any, ...], out: torch.Tensor
    ) -> torch.Tensor:
        """Sequential form: the shard's final conv window and SSM state go to the next rank."""
        cache = args[2]
        state = torch.cat([cache.conv_state.flatten(1), cache.ssm_state.flatten(1)], dim=1)
        return _SendState.apply(out, state, self, layer_idx)

    def _parallel_scan(
        self,
        layer_idx: int,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        seq_idx: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ssd_scan`` of the parallel form: the shard from ``initial_state``, then the state the
        ranks before carry in (module docstring), combined with one all-gather of the decays and
        one reduce-scatter of the states."""
        if seq_idx is not None:
            raise ValueError("context parallelism does not support packed rows (seq_idx)")
        y, local = ssd_scan(x, dt, A, B, C, D, initial_state, None, chunk_size)
        log_decay = (dt.float() * A.float()).cumsum(dim=1)  # (b, T, h): from the shard's start to t
        logs = _AllGather.apply(log_decay[:, -1].contiguous(), self, layer_idx)  # (world, b, h)
        # Log of prod_{rank < i < r} d_i for every later rank r: exclusive prefix sums.
        after = logs[self.rank + 1 :]
        between = torch.cat([torch.zeros_like(after[:1]), after[:-1]]).cumsum(dim=0)
        contributions = _exp_decay(between)[..., None, None] * local  # (world - rank - 1, b, h, p, n)
        earlier = local.new_zeros((self.rank + 1, *local.shape))
        carried = _ReduceScatter.apply(torch.cat([earlier, contributions]), self, layer_idx)
        h, g = x.shape[2], C.shape[2]
        C_heads = C.float().repeat_interleave(h // g, dim=2)  # (b, T, h, n)
        from_carried = torch.einsum("bthn,bhpn->bthp", C_heads, carried)
        y = y + from_carried * _exp_decay(log_decay)[..., None]
        final = local + _exp_decay(logs[self.rank])[..., None, None] * carried
        return y, final

    # -------------------------------------------------------------------- communication
    def send(self, tensor: torch.Tensor, offset: int, layer_idx: int, phase: str) -> None:
        """Send to the rank ``offset`` places on in the group (tag: the layer)."""
        dist.send(tensor.contiguous(), group=self.group, group_dst=self.rank + offset, tag=layer_idx)
        self.sent[layer_idx, phase] += tensor.numel() * tensor.element_size()

    def recv(self, shape: torch.Size, device: torch.device, offset: int, layer_idx: int) -> torch.Tensor:
        """Receive an fp32 tensor of ``shape`` from the rank ``offset`` places on in the group."""
        out = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(out, group=self.group, group_src=self.rank + offset, tag=layer_idx)
        return out

    def all_gather(self, tensor: torch.Tensor, layer_idx: int, phase: str) -> torch.Tensor:
        """(...) -> (world, ...): every rank's tensor."""
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        self.sent[layer_idx, phase] += (self.world - 1) * tensor.numel() * tensor.element_size()
        return torch.stack(parts)

    def reduce_scatter(self, tensor: torch.Tensor, layer_idx: int, phase: str) -> torch.Tensor:
        """(world, ...) -> (...): the sum over the ranks of their slice for this rank."""
        out = torch.empty_like(tensor[0])
        dist.reduce_scatter(out, list(tensor.contiguous().unbind(0)), group=self.group)
        self.sent[layer_idx, phase] += (self.world - 1) * out.numel() * out.element_size()
        return out


def _mixer_args(args: tuple[Any, ...]) -> tuple[torch.Tensor, LayerContext, None]:
    """A mixer's (x, ctx, cache) as the layer passes them; CP runs without a cache."""
    x, ctx, cache = (*args, None)[:3]
    if cache is not None:
        raise ValueError("context parallelism does not support a decoding cache")
    return x, ctx, None


def _exp_decay(log_decay: torch.Tensor) -> torch.Tensor:
    return log_decay.clamp(min=_MIN_LOG_DECAY).exp()


class _GatheredKV(AttentionCache):
    """An attention "cache" that all-gathers the keys and values over the CP group: ``append``
    returns those of the shards up to this rank's, concatenated along time."""

    def __init__(self, cp: ContextParallel, layer_idx: int) -> None:
        super().__init__()
        self.cp, self.layer_idx = cp, layer_idx

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = _AllGather.apply(torch.stack([key, value]), self.cp, self.layer_idx)  # (world, 2, b, h, T, d)
        kv = kv[: self.cp.rank + 1].movedim(0, 3).flatten(3, 4)  # (2, b, h, (rank + 1) T, d)
        return kv[0], kv[1]


class _AllGather(Function):
    """(...) -> (world, ...), every rank's tensor; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, cp: ContextParallel, layer_idx: int) -> torch.Tensor:
        ctx.cp, ctx.layer_idx = cp, layer_idx
        return cp.all_gather(tensor, layer_idx, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.cp.reduce_scatter(grad, ctx.layer_idx, "backward"), None, None


class _ReduceScatter(Function):
    """(world, ...) -> (...), the sum of the ranks' slices for this rank; backward all-gathers."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, cp: ContextParallel, layer_idx: int) -> torch.Tensor:
        ctx.cp, ctx.layer_idx = cp, layer_idx
        return cp.reduce_scatter(tensor, layer_idx, "forward")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.cp.all_gather(grad, ctx.layer_idx, "backward"), None, None


class _RecvState(Function):
    """Sequential form: the state from the previous rank, (b, numel) fp32; backward sends its
    gradient back there. ``anchor`` (empty, requiring grad) puts the receive in the graph."""

    @staticmethod
    def forward(
        ctx: Any, anchor: torch.Tensor, shape: tuple[int, int], cp: ContextParallel, layer_idx: int
    ) -> torch.Tensor:
        ctx.cp, ctx.layer_idx = cp, layer_idx
        return cp.recv(torch.Size(shape), anchor.device, -1, layer_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        ctx.cp.send(grad, -1, ctx.layer_idx, "backward")
        return None, None, None, None


class _SendState(Function):
    """Sequential form: ``out`` unchanged, ``state`` sent to the next rank; backward receives the
    state's gradient from there."""

    @staticmethod
    def forward(
        ctx: Any, out: torch.Tensor, state: torch.Tensor, cp: ContextParallel, layer_idx: int
    ) -> torch.Tensor:
        ctx.cp, ctx.layer_idx, ctx.shape, ctx.device = cp, layer_idx, state.shape, state.device
        cp.send(state, 1, layer_idx, "forward")
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        return grad_out, ctx.cp.recv(ctx.shape, ctx.device, 1, ctx.layer_idx), None, None


def context_parallel(
    model: TurboSForCausalLM, group: dist.ProcessGroup | None = None, mode: str = "parallel"
) -> ContextParallel:
    """Make ``model`` run on this rank's shard of every sequence, the shards of ``group`` (None:
    the default group) together computing the whole sequence (module docstring); ``mode`` is how
    Mamba2 layers pass their state (``MODES``). Feed it ``shard_sequence``'s shards."""
    return ContextParallel(model, group, mode)


def sequence_piece(length: int, index: int, count: int) -> slice:
    """Positions of piece ``index`` of ``count`` equal pieces of a sequence of ``length`` tokens."""
    return slice(index * length // count, (index + 1) * length // count)


def shard_sequence(
    input_ids: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of input_ids (b, T), and its targets: the label of the token after each
    one (IGNORE_INDEX after the last), so that no shard's loss needs another shard's tokens.
    T must be a multiple of the group's size."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    T = input_ids.shape[1]
    if T % world:
        raise ValueError(f"sequence length {T} is not a multiple of the context-parallel degree {world}")
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    shard = sequence_piece(T, rank, world)
    return input_ids[:, shard], targets[:, shard]


def context_parallel_loss(
    model: TurboSForCausalLM,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the loss, to backpropagate; the whole loss, detached, the same on
    every rank) for ``shard_sequence``'s shard. The LM loss is the mean over the counted tokens of
    all shards; the MoE router loss the mean of the shards'."""
    out = model(input_ids)
    nll = F.cross_entropy(
        out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    counted = (targets != IGNORE_INDEX).sum()
    dist.all_reduce(counted, group=group)
    loss = nll / counted.clamp(min=1) + out.aux_loss / dist.get_world_size(group)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return loss, total


def all_reduce_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the CP group (where no data-parallel reduction does)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
