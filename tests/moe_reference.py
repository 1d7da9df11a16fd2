"""Reference: the pre-split MoE, frozen verbatim from ``turbos.model.moe`` before routing,
dispatch, grouped expert computation and combine became separate steps. Kept as the reference
that the equality tests (tests/test_moe_split.py) and benchmarks/moe_sync.py compare the current
implementation against; do not edit it.

Feed-forward layers: SwiGLU, and the TurboS MoE (report §2.2; Hunyuan-Large, arXiv 2411.02265).

MoE = shared expert(s), always on, plus a softmax router choosing the top-k routed SwiGLU experts
("mixed routing"). During training each routed expert takes at most
``capacity = ceil(capacity_factor * tokens * top_k / num_experts)`` assignments; assignments that
overflow are *recycled* to random experts that still have room instead of being dropped
(``recycle_overflow_tokens``). No capacity limit at inference. Tokens reach their experts by
sorting assignments by expert and gathering, one matmul per expert, never a loop over tokens.

Parameter names match Hugging Face's HunYuanMoEV1 (gate.wg, experts.gate_up_proj,
experts.down_proj, shared_mlp.*), so its MoE weights load by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from turbos.config import TurboSConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN and the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Linear scores per expert; computed in fp32 for stable softmax and top-k."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.wg.weight.float())


SYNC_FREE_MAX_TOKENS = 256
"""On CUDA without autograd, MoE batches up to this many tokens (decode steps) avoid the grouped
path, whose per-expert token counts need a host synchronisation."""


class RoutedExperts(nn.Module):
    """num_experts SwiGLU experts stored as stacked weights (E, 2I, H) and (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x @ W.T for one expert's ``gate_up_proj`` or ``down_proj`` (quantized subclasses
        override this)."""
        return F.linear(x, getattr(self, name)[expert])

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's SwiGLU on rows x."""
        gate, up = self.project(x, "gate_up_proj", e).chunk(2, dim=-1)
        return self.project(F.silu(gate) * up, "down_proj", e)

    def stacked(self, name: str, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The ``gate_up_proj`` or ``down_proj`` matrices of experts ``idx`` (n,): (n, out, in)."""
        return getattr(self, name)[idx].to(dtype)

    def gathered(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``forward`` as one batched product per projection over gathered expert weights: no host
        synchronisation and no data-dependent shapes, so a CUDA graph can capture it. It copies k
        weight matrices per token: for decode steps of fewer tokens than experts / k."""
        N, k = expert_idx.shape
        idx = expert_idx.reshape(-1).clamp(min=0)
        xs = x.repeat_interleave(k, dim=0)[:, None]  # (N k, 1, H)
        gate, up = torch.bmm(xs, self.stacked("gate_up_proj", idx, x.dtype).mT).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, self.stacked("down_proj", idx, x.dtype).mT)  # (N k, 1, H)
        w = (weights * (expert_idx >= 0)).to(out.dtype)
        return (out.view(N, k, -1) * w[..., None]).sum(1)

    def dense(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``forward`` with every expert run on every token, weighted 0 where not chosen: no host
        synchronisation and each expert's weights read once; for small batches (decode steps)."""
        w = (weights * (expert_idx >= 0)).to(x.dtype)
        w = x.new_zeros(x.shape[0], self.num_experts).scatter_add_(1, expert_idx.clamp(min=0), w)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out += w[:, e : e + 1] * self.expert(x, e)
        return out

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); expert_idx (N, k) with -1 for 'no expert'; weights (N, k) -> (N, H)."""
        N, k = expert_idx.shape
        if x.is_cuda and N <= SYNC_FREE_MAX_TOKENS and not torch.is_grad_enabled():
            # Decode on a GPU: no host synchronisation (CUDA graphs can capture it).
            return (
                self.gathered(x, expert_idx, weights)
                if N * k < self.num_experts
                else self.dense(x, expert_idx, weights)
            )
        if N == 1 and not torch.is_grad_enabled():  # batch-1 decode: k experts, no grouping
            out = torch.zeros_like(x)
            for e, w in zip(expert_idx[0].tolist(), weights[0].to(x.dtype), strict=True):
                if e >= 0:
                    out += w * self.expert(x, e)
            return out
        flat = expert_idx.reshape(-1)
        assignment = torch.nonzero(flat >= 0).squeeze(-1)
        order = assignment[torch.argsort(flat[assignment], stable=True)]  # grouped by expert
        tokens = order // k
        counts = torch.bincount(flat[order], minlength=self.num_experts).tolist()
        xs = x[tokens]
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            out[start : start + n] = self.expert(xs[start : start + n], e)
            start += n
        out = out * weights.reshape(-1)[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, out)


@torch.no_grad()
def recycle_overflow_tokens(
    expert_idx: torch.Tensor, capacity: int, num_experts: int
) -> tuple[torch.Tensor, int, int]:
    """Enforce expert capacity with recycle routing (Hunyuan-Large).

    expert_idx (N, k): each token's top-k experts, -1 for none. Assignments claim capacity in
    priority order: every token's first choice before any second choice, then token order.
    Overflowing assignments go, in rounds, to uniformly random experts that still have room and
    that the token does not already use; an assignment is dropped (-1) only when no such expert
    remains. The routing weight of a recycled assignment is kept. Returns
    (new expert_idx, number recycled, number dropped).
    """
    N, k = expert_idx.shape
    device = expert_idx.device
    flat = expert_idx.t().reshape(-1)  # priority order: rank-major
    token = torch.arange(N, device=device).repeat(k)
    valid = torch.nonzero(flat >= 0).squeeze(-1)
    order = valid[torch.argsort(flat[valid], stable=True)]
    counts = torch.bincount(flat[order], minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(flat)
    position[order] = torch.arange(len(order), device=device) - starts[flat[order]]
    overflow = valid[position[valid] >= capacity]
    result = flat.clone()
    if len(overflow) == 0:
        return expert_idx, 0, 0
    result[overflow] = -1
    room = (capacity - counts.clamp(max=capacity)).to(torch.long)
    used = torch.zeros(N, num_experts, dtype=torch.bool, device=device)
    kept = torch.nonzero(result >= 0).squeeze(-1)
    used[token[kept], result[kept]] = True

    pending = overflow
    recycled = 0
    while len(pending) and bool((room > 0).any()):
        # One pending assignment per token per round, so a token never takes an expert twice.
        tok = token[pending]
        by_token = torch.argsort(tok, stable=True)
        first = torch.ones(len(pending), dtype=torch.bool, device=device)
        first[by_token[1:]] = tok[by_token[1:]] != tok[by_token[:-1]]
        cand, cand_tok = pending[first], tok[first]
        eligible = (room > 0)[None, :] & ~used[cand_tok]
        hopeless = ~eligible.any(1)
        pending = torch.cat([pending[~first], cand[~hopeless]])  # hopeless ones stay dropped
        cand, cand_tok, eligible = cand[~hopeless], cand_tok[~hopeless], eligible[~hopeless]
        if len(cand) == 0:
            break
        scores = torch.rand(eligible.shape, device=device).masked_fill(~eligible, -1.0)
        choice = scores.argmax(1)
        # Each expert accepts as many candidates as it has room for.
        by_choice = torch.argsort(choice, stable=True)
        n_choice = torch.bincount(choice, minlength=num_experts)
        rank = torch.empty_like(choice)
        rank[by_choice] = (
            torch.arange(len(choice), device=device)
            - (torch.cumsum(n_choice, 0) - n_choice)[choice[by_choice]]
        )
        accept = rank < room[choice]
        result[cand[accept]] = choice[accept]
        used[cand_tok[accept], choice[accept]] = True
        room -= torch.bincount(choice[accept], minlength=num_experts)
        recycled += int(accept.sum())
        done = torch.zeros(len(flat), dtype=torch.bool, device=device)
        done[cand[accept]] = True
        pending = pending[~done[pending]]
    dropped = len(overflow) - recycled
    return result.view(k, N).t().contiguous(), recycled, dropped


@dataclass
class MoEStats:
    """Routing counts of one MoE layer for one forward pass."""

    expert_load: torch.Tensor
    """Assignments processed per routed expert (after capacity and recycling), shape (E,)."""
    assignments: int
    """Token-expert assignments requested (valid tokens * top_k)."""
    recycled: int
    dropped: int


class MoE(nn.Module):
    """Shared expert(s) + softmax top-k routed experts, with load-balancing and z losses."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef = config.router_aux_loss_coef
        self.z_loss_coef = config.router_z_loss_coef
        self.gate = Router(config.hidden_size, config.num_experts)
        self.experts = RoutedExperts(config.num_experts, config.hidden_size, config.expert_intermediate_size)
        # k shared SwiGLU experts summed equal one SwiGLU k times as wide.
        shared = config.num_shared_experts * config.shared_intermediate_size
        self.shared_mlp = SwiGLU(config.hidden_size, shared) if shared else None

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        router_losses: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, MoEStats | None]:
        """hidden_states (b, T, H); token_mask (b, T), 0 on padding (not routed, not in the losses).

        Returns (output, weighted router loss, stats); the last two are None when
        ``router_losses`` is False (inference: nothing but the output is computed)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.gate(x)  # (N, E) fp32
        probs = logits.softmax(-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        valid = None if token_mask is None else token_mask.reshape(-1).bool()
        if valid is not None:
            top_i = top_i.masked_fill(~valid[:, None], -1)
        n_valid = 0  # counting padded tokens syncs with the device; only capacity and losses need it
        if self.training or router_losses:
            n_valid = x.shape[0] if valid is None else int(valid.sum())

        chosen = top_i
        recycled = dropped = 0
        if self.training:
            chosen, recycled, dropped = recycle_overflow_tokens(
                top_i, self.capacity(n_valid), self.num_experts
            )
        out = self.experts(x, chosen, top_w)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x)
        if not router_losses:
            return out.reshape(shape), None, None

        # Load-balancing loss (Switch / Hunyuan-Large): E * sum_e f_e * P_e, with f_e the fraction
        # of top-k choices that picked e (before capacity) and P_e the mean router probability.
        picked = top_i[top_i >= 0]
        frac = torch.bincount(picked, minlength=self.num_experts).float() / max(len(picked), 1)
        if valid is None:
            mean_prob, lse = probs.mean(0), torch.logsumexp(logits, -1)
        else:
            mean_prob = probs[valid].sum(0) / max(n_valid, 1)
            lse = torch.logsumexp(logits[valid], -1)
        loss = self.aux_loss_coef * self.num_experts * (frac * mean_prob).sum()
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * lse.pow(2).mean()
        stats = MoEStats(
            expert_load=torch.bincount(chosen[chosen >= 0], minlength=self.num_experts),
            assignments=n_valid * self.top_k,
            recycled=recycled,
            dropped=dropped,
        )
        return out.reshape(shape), loss, stats
