"""Feed-forward layers: SwiGLU, and the TurboS MoE (report §2.2; Hunyuan-Large, arXiv 2411.02265).

MoE = shared expert(s), always on, plus a softmax router choosing the top-k routed SwiGLU experts
("mixed routing"). During training each routed expert takes at most
``capacity = ceil(capacity_factor * tokens * top_k / num_experts)`` assignments; assignments that
overflow are *recycled* to random experts that still have room instead of being dropped
(``recycle_overflow_tokens``). No capacity limit at inference.

The routed path is four steps, each its own function, so that expert parallelism can put an
all-to-all around the third without touching the others:

1. route: router scores, top-k choices and weights (``MoE.route``), then capacity in training;
2. dispatch: sort the token-expert assignments by expert (``dispatch``);
3. experts: ``RoutedExperts(x_sorted, tokens_per_expert)``, raw expert computation without
   dispatch/combine (``torch._grouped_mm`` where its kernel runs, else one matmul per expert);
4. combine: routing-weighted scatter-add back to the tokens (``combine``).

Training reads no device value on the host (no synchronisation) except where a loop over experts
needs their row counts (``_host_counts``): on CPU, which has no device to wait for, and on GPUs
without the grouped kernel. Small no-grad batches on CUDA (decode steps) skip the sort:
``RoutedExperts.gathered`` / ``dense`` have static shapes, so a CUDA graph can capture them.

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


class ReLU2MLP(nn.Module):
    """down(relu(up(x))^2): NemotronH's non-gated feed-forward, dense or as an expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


def feed_forward(hidden_size: int, intermediate_size: int, activation: str) -> SwiGLU | ReLU2MLP:
    """The dense feed-forward of ``activation`` ('swiglu' or 'relu2')."""
    return (SwiGLU if activation == "swiglu" else ReLU2MLP)(hidden_size, intermediate_size)


class Router(nn.Module):
    """Linear scores per expert; computed in fp32 for stable softmax and top-k, autocast or not.
    With ``correction_bias`` it holds DeepSeek-V3's per-expert choice bias (loaded, not trained)."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool = False) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)
        self.e_score_correction_bias = (
            nn.Buffer(torch.zeros(num_experts, dtype=torch.float32)) if correction_bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would run F.linear in bf16
            return F.linear(x.float(), self.wg.weight.float())


SYNC_FREE_MAX_TOKENS = 256
"""On CUDA without autograd, MoE batches up to this many tokens (decode steps) skip dispatch and
take ``RoutedExperts.gathered`` / ``dense``: static shapes whatever the grouped kernel's support."""


def _host_counts(tokens_per_expert: torch.Tensor) -> list[int]:
    """Rows per expert as Python ints, for the loop over experts: the one place the MoE reads a
    device value on the host. On CPU the tensor already lies in host memory (there is no device to
    wait for); on a GPU without ``torch._grouped_mm``'s kernel it is one synchronisation per layer."""
    return tokens_per_expert.tolist()


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_kernel_runs(x: torch.Tensor, dtype: torch.dtype, intermediate_size: int) -> bool:
    """Whether ``torch._grouped_mm`` has its own kernel here: bf16 on CUDA sm90 / sm100, rows 16-byte
    aligned (widths multiples of 8). Elsewhere PyTorch falls back to a loop over groups that copies
    the offsets to the host, which is ``RoutedExperts.looped`` with extra steps."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.is_cuda
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] in (9, 10)
        and x.shape[-1] % 8 == 0
        and intermediate_size % 8 == 0
    )


class RoutedExperts(nn.Module):
    """num_experts experts stored as stacked weights: SwiGLU ones as ``gate_up_proj`` (E, 2I, H)
    and ``down_proj`` (E, H, I); non-gated ReLU^2 ones (``activation='relu2'``) as ``up_proj``
    (E, I, H) and ``down_proj``.

    ``forward(x_sorted, tokens_per_expert)`` is the raw expert computation without dispatch or
    combine (as torchtitan's GroupedExperts): rows arrive grouped by expert."""

    holds_all_experts = True
    """Whether every expert's weights are here, so ``apply_experts`` may take the small-batch
    paths (``gathered``, ``dense``, ``single``); False where the experts are spread over ranks
    (expert parallelism), whose exchange sits in ``forward``."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str = "swiglu"
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gated = activation == "swiglu"
        self.in_proj_name = "gate_up_proj" if self.gated else "up_proj"
        width = 2 * intermediate_size if self.gated else intermediate_size
        self.register_parameter(self.in_proj_name, nn.Parameter(torch.empty(num_experts, width, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The activation on the input projection's output: silu(gate) * up, or relu(h)^2."""
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.relu(h).square()

    def weight(self, name: str) -> torch.Tensor:
        """The stacked weights of the input projection or ``down_proj``, as computed with (the
        expert-parallel subclass gives its local slice of a sharded parameter)."""
        return getattr(self, name)

    def project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        """x @ W.T for one expert's input projection or ``down_proj`` (quantized subclasses
        override this)."""
        return F.linear(x, self.weight(name)[expert])

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on rows x."""
        return self.project(self.activate(self.project(x, self.in_proj_name, e)), "down_proj", e)

    def stacked(self, name: str, idx: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """The input-projection or ``down_proj`` matrices of experts ``idx`` ((n,) indices, or a
        slice): (n, out, in) (quantized subclasses override this)."""
        return self.weight(name)[idx].to(dtype)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x (M, H): the first tokens_per_expert[0] rows for expert 0, the next for expert 1, ...;
        rows past sum(tokens_per_expert) are padding, whose output ``combine`` weights 0.
        tokens_per_expert (E,) on x's device. Returns (M, H) in x's dtype."""
        if _grouped_kernel_runs(x, _matmul_dtype(x), self.intermediate_size):
            return self.grouped(x, tokens_per_expert)
        return self.looped(x, _host_counts(tokens_per_expert))

    def grouped(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """``forward`` as one ``torch._grouped_mm`` per projection over all experts: no host read,
        so nothing waits for the device (``forward`` uses it where PyTorch has the kernel)."""
        dtype = _matmul_dtype(x)
        offsets = tokens_per_expert.cumsum(0).to(torch.int32)
        # The kernel leaves rows past the last offset unwritten (and their gradient too): padding
        # rows go to the last expert instead, finite and weighted 0 by combine.
        offsets[-1] = x.shape[0]
        w_in, down = (self.stacked(name, slice(None), dtype).mT for name in (self.in_proj_name, "down_proj"))
        h = self.activate(torch._grouped_mm(x.to(dtype), w_in, offs=offsets))
        out = torch._grouped_mm(h, down, offs=offsets)
        return out.to(x.dtype)

    def looped(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``forward`` as one product per expert over its contiguous rows (counts on the host);
        padding rows give 0."""
        pieces, start = [], 0
        for e, n in enumerate(counts):
            if n:
                pieces.append(self.expert(x[start : start + n], e).to(x.dtype))
                start += n
        pieces.append(x.new_zeros(x.shape[0] - start, x.shape[1]))
        return torch.cat(pieces)

    def gathered(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``apply_experts`` as one batched product per projection over gathered expert weights: no
        host synchronisation and no data-dependent shapes, so a CUDA graph can capture it. It copies
        k weight matrices per token: for decode steps of fewer tokens than experts / k."""
        N, k = expert_idx.shape
        idx = expert_idx.reshape(-1).clamp(min=0)
        xs = x.repeat_interleave(k, dim=0)[:, None]  # (N k, 1, H)
        h = self.activate(torch.bmm(xs, self.stacked(self.in_proj_name, idx, x.dtype).mT))
        out = torch.bmm(h, self.stacked("down_proj", idx, x.dtype).mT)  # (N k, 1, H)
        w = (weights * (expert_idx >= 0)).to(out.dtype)
        return (out.view(N, k, -1) * w[..., None]).sum(1)

    def dense(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``apply_experts`` with every expert run on every token, weighted 0 where not chosen: no
        host synchronisation and each expert's weights read once; for small batches (decode steps)."""
        w = (weights * (expert_idx >= 0)).to(x.dtype)
        w = x.new_zeros(x.shape[0], self.num_experts).scatter_add_(1, expert_idx.clamp(min=0), w)
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            out += w[:, e : e + 1] * self.expert(x, e)
        return out

    def single(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``apply_experts`` for one token (batch-1 decode): its k experts one after another. Reads
        the choices on the host, so it is for CPU, where that waits for nothing."""
        out = torch.zeros_like(x)
        for e, w in zip(expert_idx[0].tolist(), weights[0].to(x.dtype), strict=True):
            if e >= 0:
                out += w * self.expert(x, e)
        return out


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) in expert_idx (any shape, -1 for none), on its device. A
    scatter-add: ``torch.bincount`` reads its input's maximum on the host."""
    key = _sort_key(expert_idx.reshape(-1), num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=key.device)
    return counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]


def _sort_key(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert of each assignment, with 'no expert' (-1) as num_experts so that it sorts last."""
    return torch.where(flat >= 0, flat, num_experts)


@dataclass
class Dispatch:
    """Token-expert assignments sorted by expert (``dispatch``), M = tokens * top_k of them."""

    order: torch.Tensor
    """(M,) flat index (token * top_k + rank) of each sorted row; rows with no expert come last."""
    token: torch.Tensor
    """(M,) the token of each sorted row."""
    routed: torch.Tensor
    """(M,) bool: the row has an expert (False on the tail of padding and dropped assignments)."""
    tokens_per_expert: torch.Tensor
    """(E,) rows of each expert, a device tensor: rows [0, n_0) are expert 0's, and so on."""


def dispatch(expert_idx: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort assignments expert_idx (N, k), -1 for none, by expert (stable: token order within one)."""
    k = expert_idx.shape[1]
    flat = expert_idx.reshape(-1)
    order = torch.argsort(_sort_key(flat, num_experts), stable=True)
    return Dispatch(order, order // k, flat.index_select(0, order) >= 0, count_per_expert(flat, num_experts))


def combine(out: torch.Tensor, routing: Dispatch, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Each token's expert outputs out (M, H), in ``routing``'s sorted order, summed with the
    routing weights (N, k): (N, H). Rows without an expert get weight 0."""
    w = weights.reshape(-1).index_select(0, routing.order) * routing.routed
    out = out * w.to(out.dtype)[:, None]
    return out.new_zeros(num_tokens, out.shape[-1]).index_add_(0, routing.token, out)


def apply_experts(
    experts: RoutedExperts, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts' output (N, H) for tokens x (N, H) routed to expert_idx (N, k), -1 for no
    expert, with routing weights (N, k): dispatch -> experts -> combine, or a decode path."""
    N, k = expert_idx.shape
    if not torch.is_grad_enabled() and experts.holds_all_experts:
        if x.is_cuda and N <= SYNC_FREE_MAX_TOKENS:  # decode on a GPU: CUDA graphs can capture these
            if N * k < experts.num_experts:
                return experts.gathered(x, expert_idx, weights)
            return experts.dense(x, expert_idx, weights)
        if N == 1:
            return experts.single(x, expert_idx, weights)
    routing = dispatch(expert_idx, experts.num_experts)
    out = experts(x.index_select(0, routing.token), routing.tokens_per_expert)
    return combine(out, routing, weights, N)


@torch.no_grad()
def recycle_overflow_tokens(
    expert_idx: torch.Tensor, capacity: int | torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enforce expert capacity with recycle routing (Hunyuan-Large), with no host synchronisation.

    expert_idx (N, k): each token's top-k experts, -1 for none; capacity an int or a 0-dim tensor.
    Assignments claim capacity in priority order: every token's first choice before any second
    choice, then token order. Overflowing assignments go to uniformly random experts that still
    have room and that the token does not already use; an assignment is dropped (-1) only when no
    such expert remains. The routing weight of a recycled assignment is kept.

    Static shapes, a fixed number of rounds: in each, every token with an undecided overflowing
    assignment offers its first one to a random eligible expert, and each expert accepts offers in
    token order while it has room; a token with no eligible expert drops it. A round with a refused
    offer fills an expert that had room (at most E such rounds); a round without decides every
    token's offer (at most k such rounds, as a token has at most k assignments). So E + k rounds
    decide every assignment and the rules above hold exactly. Only the random draws differ from
    the earlier loop that read counts on the host each round: each token draws one random order of
    the experts up front and always offers to the first eligible expert in it, a uniform draw among
    the eligible ones every time (the eligible set only shrinks, and an offered expert leaves it).

    Returns (new expert_idx, number recycled, number dropped); the counts are 0-dim tensors.
    """
    N, k = expert_idx.shape
    E, device = num_experts, expert_idx.device
    experts = torch.arange(E, device=device)[:, None]
    # Layouts are (rank, token) and (expert, token). Row j of ranked holds every token's j-th
    # choice, so its flat order is the priority order: all first choices, then all second ones.
    ranked = expert_idx.t()  # (k, N)
    claims = ranked.reshape(-1) == experts  # (E, k N); -1 (no expert) claims nothing
    queue = claims.cumsum(1)  # claims so far on each expert, in priority order
    overflow = (claims & (queue > capacity)).any(0).view(k, N)

    result = ranked.masked_fill(overflow, -1)  # (k, N)
    room = (capacity - claims.sum(1, keepdim=True)).clamp(min=0)  # (E, 1)
    used = (result[None] == experts[..., None]).any(1)  # (E, N)
    # Each token's random order of the experts, as codes distinct per token (40 random bits, the
    # expert in the low digits to break ties), so the most preferred eligible expert is a unique
    # max: an amax, as argmax across rows is slow on CPU.
    code = torch.randint(0, 2**40, (E, N), device=device) * E + experts
    pending = overflow.clone()
    for _ in range(E + k):
        first = pending & (pending.cumsum(0) == 1)  # (k, N): each token's first pending assignment
        offering = pending.any(0)  # (N,)
        best = torch.where(~used & (room > 0), code, -1).amax(0).masked_fill(~offering, -1)  # (N,)
        offers = code == best  # (E, N): one offer per token with an eligible expert
        taken = offers & (offers.cumsum(1) <= room)  # accepted in token order while there is room
        accepted = taken.any(0)
        result = torch.where(first & accepted, best % E, result)
        pending &= ~(first & (accepted | (offering & (best < 0))))  # recycled, or dropped for good
        used |= taken
        room = room - taken.sum(1, keepdim=True)
    recycled = (overflow & (result >= 0)).sum()
    return result.t().contiguous(), recycled, overflow.sum() - recycled


@dataclass
class MoEStats:
    """Routing counts of one MoE layer for one forward pass, as device tensors: reading them waits
    for the device, so a training loop sums them there and reads them once per logged step
    (``turbos.train.metrics``)."""

    expert_load: torch.Tensor
    """Assignments processed per routed expert (after capacity and recycling), shape (E,)."""
    assignments: torch.Tensor
    """Token-expert assignments requested (valid tokens * top_k), 0-dim."""
    recycled: torch.Tensor
    """Overflowing assignments sent to another expert, 0-dim (0 outside training)."""
    dropped: torch.Tensor
    """Overflowing assignments with no expert left, 0-dim (0 outside training)."""


def _token_mean(
    values: torch.Tensor, valid: torch.Tensor | None, n_valid: int | torch.Tensor
) -> torch.Tensor:
    """Mean over tokens (dim 0) of values, counting valid tokens only (n_valid of them)."""
    if valid is None:
        return values.mean(0)
    mask = valid.view(-1, *[1] * (values.dim() - 1))
    return torch.where(mask, values, 0).sum(0) / _at_least_one(n_valid)


def _at_least_one(n: int | torch.Tensor) -> int | torch.Tensor:
    """max(n, 1) for a Python or a device count."""
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


class MoE(nn.Module):
    """Shared expert(s) + top-k routed experts, with load-balancing and z losses.

    Routing is softmax top-k by default (Hunyuan); ``router_score='sigmoid'`` with a correction
    bias, expert groups and a scaling factor gives DeepSeek-V3 / NemotronH routing."""

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.sigmoid = config.router_score == "sigmoid"
        self.groups, self.topk_groups = config.router_groups, config.router_topk_groups
        self.scaling = config.routed_scaling_factor
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef = config.router_aux_loss_coef
        self.z_loss_coef = config.router_z_loss_coef
        self.gate = Router(config.hidden_size, config.num_experts, config.router_correction_bias)
        self.experts = RoutedExperts(
            config.num_experts, config.hidden_size, config.expert_intermediate_size, config.expert_activation
        )
        # k shared experts summed equal one expert k times as wide.
        shared = config.num_shared_experts * config.shared_intermediate_size
        self.shared_mlp = (
            feed_forward(config.hidden_size, shared, config.expert_activation) if shared else None
        )

    def capacity(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """ceil(capacity_factor * num_tokens * top_k / num_experts). A count on the device (padded
        batches) gives a 0-dim device tensor, computed in float64 in the same order as the int."""
        if isinstance(num_tokens, torch.Tensor):
            return torch.ceil(
                num_tokens.double() * self.capacity_factor * self.top_k / self.num_experts
            ).long()
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(
        self, x: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities (N, E) fp32, top-k weights (N, k) and experts (N, k),
        the experts -1 on padding (valid False). Sigmoid scores enter the load-balancing loss
        normalised to sum to 1 per token (as DeepSeek-V3's)."""
        logits = self.gate(x)
        if not self.sigmoid:
            probs = logits.softmax(-1)
            top_w, top_i = probs.topk(self.top_k, dim=-1)
        else:
            scores = logits.sigmoid()
            top_i = self.choose(scores)
            top_w = scores.gather(1, top_i)
            probs = scores / scores.sum(-1, keepdim=True)
        if self.norm_topk_prob:
            top_w = top_w / (top_w.sum(-1, keepdim=True) + (1e-20 if self.sigmoid else 0.0))
        if self.scaling != 1.0:
            top_w = top_w * self.scaling
        if valid is not None:
            top_i = top_i.masked_fill(~valid[:, None], -1)
        return logits, probs, top_w, top_i

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k experts (N, k) by scores (N, E) plus the correction bias, among the experts of the
        ``topk_groups`` groups whose top two biased scores sum highest."""
        bias = self.gate.e_score_correction_bias
        choice = scores if bias is None else scores + bias
        if self.groups > 1:
            grouped = choice.view(choice.shape[0], self.groups, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], -math.inf).view_as(choice)
        return choice.topk(self.top_k, dim=-1).indices

    def router_loss(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        top_i: torch.Tensor,
        valid: torch.Tensor | None,
        n_valid: int | torch.Tensor,
    ) -> torch.Tensor:
        """Weighted load-balancing loss, plus the z-loss when enabled, over the valid tokens."""
        # Load-balancing loss (Switch / Hunyuan-Large): E * sum_e f_e * P_e, with f_e the fraction
        # of top-k choices that picked e (before capacity) and P_e the mean router probability.
        frac = count_per_expert(top_i, self.num_experts).float() / _at_least_one(n_valid * self.top_k)
        loss = self.aux_loss_coef * self.num_experts * (frac * _token_mean(probs, valid, n_valid)).sum()
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * _token_mean(torch.logsumexp(logits, -1).pow(2), valid, n_valid)
        return loss

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
        valid = None if token_mask is None else token_mask.reshape(-1).bool()
        logits, probs, top_w, top_i = self.route(x, valid)
        n_valid = x.shape[0] if valid is None else valid.sum()  # under a mask, a count on the device

        chosen = top_i
        recycled = dropped = top_i.new_zeros(())
        if self.training:
            chosen, recycled, dropped = recycle_overflow_tokens(
                top_i, self.capacity(n_valid), self.num_experts
            )
        out = apply_experts(self.experts, x, chosen, top_w)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x)
        if not router_losses:
            return out.reshape(shape), None, None

        requested = n_valid * self.top_k
        if not isinstance(requested, torch.Tensor):
            requested = top_i.new_full((), requested)  # a fill, not a copy from the host
        stats = MoEStats(
            expert_load=count_per_expert(chosen, self.num_experts),
            assignments=requested,
            recycled=recycled,
            dropped=dropped,
        )
        return out.reshape(shape), self.router_loss(logits, probs, top_i, valid, n_valid), stats
