"""Cluster planner: per-GPU memory and per-step communication of a parallel layout, from the
config alone (pure arithmetic: nothing is built, no process group is needed).

Layouts are ``DP x EP x CP x TP x PP = GPUs``:

- DP and EP ranks see different micro-batches (``DP * EP`` data replicas); CP ranks split one
  sequence; TP (Megatron-style, on paper) splits attention heads, Mamba2 heads and groups, expert
  and dense FFN widths and the vocabulary; PP splits the layers into contiguous stages (1F1B).
- Weight sharding, as ``turbos.distributed.fsdp`` does it: every parameter but the routed experts
  is FSDP-sharded (ZeRO-3) over all ``DP * EP * CP`` ranks; routed experts are split over EP (each
  EP rank holds ``num_experts / EP`` experts) and FSDP-sharded over the ``DP * CP`` ranks holding
  the same experts. Every state thus divides by ``DP * EP * CP``; EP replaces the gathering of
  expert weights over the EP group by all-to-alls of tokens.
- Precision (``Precision``): bf16 weights and gradients, fp32 master weights and two fp32 AdamW
  moments: 16 bytes per parameter (FSDP2's fp32 sharded parameters with fp32 gradients also
  come to 16). Activations in bf16 where our layers compute in bf16 and fp32 where they call
  ``.float()`` (norms, router, SSD scan, the loss).
- Activations are the tensors our layers save for backward, listed per layer kind from their
  shapes (``layer_activation_bytes``); ``tests/test_distributed_planner.py`` checks the sum against
  the bytes autograd actually saves for a small model. No KV or SSM cache (training only).
  ``ssd_impl='fused'`` counts what mamba_ssm's kernel saves (GPUs); 'chunked' our torch scan,
  which also keeps its (chunk x chunk) decay matrices (CPU).
- Activation checkpointing (per layer): a layer keeps only its input; one layer's full
  activations are live again during its backward.

Cost model (``Network``): each collective moves its ring volume per GPU (all-gather and
reduce-scatter ``(n-1)/n`` of the gathered size, all-reduce twice that, all-to-all ``(n-1)/n`` of
what a rank sends) at NVLink bandwidth when its group fits in one node, else at the inter-node
bandwidth per GPU; nothing overlaps with compute. Ranks are numbered TP fastest, then EP, CP, DP,
PP. Layouts are ranked by communication time plus the pipeline bubble and the recomputation of
activation checkpointing, both from ``6 * activated parameters * tokens`` at ``compute_tflops``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from turbos.config import TurboSConfig
from turbos.params import count_parameters

GIB = 2**30
DIMS = ("tp", "ep", "cp", "dp", "pp")
"""Mesh dimensions, fastest-varying rank first (TP inside a node first)."""


class PlanError(ValueError):
    """A layout that cannot run: the message says which degree and why."""


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state."""

    param_bytes: int = 2
    grad_bytes: int = 2
    master_bytes: int = 4
    moment_bytes: int = 4
    """Each of AdamW's two moments."""
    activation_bytes: int = 2
    """The compute dtype of activations (bf16); fp32 copies are counted as 4 bytes."""


@dataclass(frozen=True)
class Network:
    """Bandwidths (GB/s per GPU, one direction) and compute speed of the cluster."""

    gpus_per_node: int = 8
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    compute_tflops: float = 400.0
    """Sustained bf16 TFLOP/s per GPU, for the bubble and recomputation estimates."""


@dataclass(frozen=True)
class Layout:
    """Parallel degrees; their product is the GPU count."""

    dp: int = 1
    ep: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def gpus(self) -> int:
        return self.dp * self.ep * self.cp * self.tp * self.pp

    def __str__(self) -> str:
        return " ".join(f"{d}{getattr(self, d)}" for d in ("dp", "ep", "cp", "tp", "pp"))


@dataclass
class Plan:
    """Per-GPU memory (bytes, the busiest pipeline stage) and communication per training step."""

    layout: Layout
    activation_checkpointing: bool
    memory: dict[str, float]
    """weights, gradients, optimizer, activations, fsdp_buffers (unsharded layer copies)."""
    communication: dict[str, float]
    """Bytes per GPU per step: fsdp, ep_all_to_all, cp, tp, pp."""
    comm_seconds: dict[str, float]
    compute_seconds: float
    """6 * activated parameters * tokens per GPU (8 with checkpointing's recomputation)."""
    bubble_seconds: float
    micro_batches: int
    """Micro-batches per step on each data replica."""
    gpu_memory_gib: float
    margin: float
    fits: bool = field(init=False)

    def __post_init__(self) -> None:
        self.fits = self.total_memory <= self.gpu_memory_gib * GIB * (1 - self.margin)

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def cost_seconds(self) -> float:
        """The ranking cost: communication, pipeline bubble and recomputation (AC's extra forward)."""
        recompute = self.compute_seconds / 4 if self.activation_checkpointing else 0.0
        return sum(self.comm_seconds.values()) + self.bubble_seconds + recompute

    def to_dict(self) -> dict[str, object]:
        return {
            "layout": asdict(self.layout),
            "activation_checkpointing": self.activation_checkpointing,
            "memory_gib": {k: v / GIB for k, v in self.memory.items()} | {"total": self.total_memory / GIB},
            "communication_gb_per_step": {k: v / 1e9 for k, v in self.communication.items()},
            "comm_seconds": self.comm_seconds,
            "compute_seconds": self.compute_seconds,
            "bubble_seconds": self.bubble_seconds,
            "cost_seconds": self.cost_seconds,
            "micro_batches": self.micro_batches,
            "fits": self.fits,
        }


# ----------------------------------------------------------------------------------------------
# Parameters per layer
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one layer: split by TP, replicated across TP, and routed experts."""

    split: int
    replicated: int
    experts: int = 0

    def per_rank(self, tp: int, ep: int) -> float:
        """Parameters one (TP, EP) rank holds before FSDP sharding."""
        return self.split / tp + self.replicated + self.experts / (tp * ep)


def layer_params(config: TurboSConfig) -> dict[str, LayerParams]:
    """LayerParams of each layer kind present, plus 'embedding' (input and output embeddings,
    vocab-parallel under TP, and the final norm)."""
    H = config.hidden_size
    rows = count_parameters(config)
    out = {
        "embedding": LayerParams(rows["embeddings"]["total"] + rows.get("lm_head", {"total": 0})["total"], H)
    }
    for kind in sorted(set(config.layer_types)):
        one = count_parameters(config.replace(layout=kind))
        if kind == "A":
            out[kind] = LayerParams(one["attention"]["total"], H)
        elif kind == "M":
            out[kind] = LayerParams(one["mamba2"]["total"], H)
        elif "routed_experts" in one:
            shared = one.get("shared_experts", {"total": 0})["total"]
            out[kind] = LayerParams(shared, H + one["router"]["total"], one["routed_experts"]["total"])
        else:
            out[kind] = LayerParams(one["dense_ffn"]["total"], H)
    return out


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------


def _ffn_bytes(activation: str, width: float, a: int) -> float:
    """Bytes per row an FFN of ``width`` saves: SwiGLU its gate|up output (two widths), silu and
    the product; ReLU^2 the relu output (which its square reuses) and the square."""
    return (4 if activation == "swiglu" else 2) * a * width


def layer_activation_bytes(
    config: TurboSConfig,
    kind: str,
    seq_len: int,
    micro_batch: int = 1,
    *,
    tp: int = 1,
    cp: int = 1,
    ep: int = 1,
    precision: Precision = Precision(),
    ssd_impl: str = "fused",
) -> float:
    """Bytes one layer of ``kind`` saves for backward on one GPU, for micro_batch sequences of
    seq_len tokens (seq_len / cp of them local), without activation checkpointing."""
    c, a, f = config, precision.activation_bytes, 4
    H, b = c.hidden_size, micro_batch
    T = seq_len // cp
    tokens = b * T
    common = 2 * f * H + f + a * H  # pre-norm: fp32 input copy, normed, rstd; the mixer's input
    if kind == "A":
        nh, nkv, d = c.num_attention_heads / tp, c.num_key_value_heads / tp, c.attn_head_dim
        per_token = a * nh * d * 3 + f * nh  # SDPA's q and out, o_proj's input; logsumexp
        if c.use_qk_norm:
            per_token += (nh + nkv) * (2 * d + 1) * f  # fp32 copy, normed, rstd of q and k
        kv_tokens = b * seq_len  # SDPA saves K and V of the whole sequence (all-gathered under CP)
        return tokens * (common + per_token) + kv_tokens * a * 2 * nkv * d
    if kind == "M":
        h, g = c.mamba_num_heads / tp, c.mamba_n_groups / tp
        di, cd, n, p = h * c.mamba_head_dim, c.mamba_conv_dim / tp, c.mamba_state_size, c.mamba_head_dim
        # conv window and output; gated norm: fp32 gate, silu(gate), y, y * silu(gate), normed + rstd;
        # out_proj's input
        per_token = 2 * a * cd + 5 * f * di + f * g + a * di
        state = b * h * p * n * f
        if ssd_impl == "fused":  # silu(xbc) (x, B, C views), dt pre-softplus and clamped, kernel: out, dt, dA
            per_token += a * cd + 2 * f * h + a * di + 2 * f * h
            extra = 0.0
        elif ssd_impl == "chunked":
            chunks = max(1, -(-T // c.mamba_chunk_size))
            q = -(-T // chunks)
            # fp32 x, x*dt and y copies; (q x q) decays and scores per head (one per group); B, C
            # per chunk; dt and cumulative decays
            per_token += 5 * f * di + (4 * h + g) * q * f + 2 * (h + g) * n * f + 6 * f * h
            extra = chunks * (2 * state + b * h * f)  # states entering and leaving each chunk
        else:
            raise PlanError(f"ssd_impl must be 'fused' or 'chunked', got {ssd_impl!r}")
        passed = state if cp > 1 else 0.0  # the state received from the previous CP rank
        return tokens * (common + per_token) + extra + passed
    if kind == "F" and c.ffn_type == "moe":
        k, E = c.num_experts_per_tok, c.num_experts
        load = 1.0 if ep == 1 else c.capacity_factor  # an EP rank may receive up to capacity
        router = f * H + f * E + k * (8 + f) + f  # fp32 input, probs, top-k ids and weights, sum
        dispatch = k * (2 * 8 + 1 + a)  # sorted order and token ids, routed mask, weights
        routed = load * k * (3 * a * H + _ffn_bytes(c.expert_activation, c.expert_intermediate_size / tp, a))
        shared = _ffn_bytes(c.expert_activation, c.num_shared_experts * c.shared_intermediate_size / tp, a)
        return tokens * (common + router + dispatch + routed + shared)
    if kind in ("F", "D"):
        return tokens * (common + _ffn_bytes(c.mlp_activation, c.intermediate_size / tp, a))
    raise PlanError(f"unknown layer kind {kind!r}")


def head_activation_bytes(
    config: TurboSConfig,
    seq_len: int,
    micro_batch: int = 1,
    *,
    tp: int = 1,
    cp: int = 1,
    precision: Precision = Precision(),
) -> dict[str, float]:
    """Bytes saved outside the layers: 'embedding' (token ids, rotary tables) and 'head' (final
    norm, LM head input, the fp32 log-softmax of the loss, vocab-parallel under TP)."""
    a, f, H = precision.activation_bytes, 4, config.hidden_size
    tokens = micro_batch * seq_len // cp
    rotary = 2 * a * config.attn_head_dim if "A" in config.layer_types and config.use_rope else 0
    return {
        "embedding": tokens * (8 + rotary),
        "head": tokens * (2 * f * H + f + a * H + f * config.vocab_size / tp + 8),
    }


def activation_bytes(
    config: TurboSConfig,
    seq_len: int,
    micro_batch: int = 1,
    *,
    layers: range | None = None,
    embedding: bool = True,
    head: bool = True,
    activation_checkpointing: bool = False,
    tp: int = 1,
    cp: int = 1,
    ep: int = 1,
    precision: Precision = Precision(),
    ssd_impl: str = "fused",
) -> float:
    """Bytes one micro-batch keeps for backward on one GPU over ``layers`` (default all), plus the
    embedding and the head. With checkpointing each layer keeps its input (and the state passed
    to it under CP), and the largest layer's activations are live again during its backward."""
    kinds = config.layer_types
    layers = range(len(kinds)) if layers is None else layers
    per_kind = {
        k: layer_activation_bytes(
            config, k, seq_len, micro_batch, tp=tp, cp=cp, ep=ep, precision=precision, ssd_impl=ssd_impl
        )
        for k in {kinds[i] for i in layers}
    }
    if activation_checkpointing:
        tokens = micro_batch * seq_len // cp
        h, p, n = config.mamba_num_heads / tp, config.mamba_head_dim, config.mamba_state_size
        passed = micro_batch * h * p * n * 4 if cp > 1 else 0.0
        total = sum(
            tokens * precision.activation_bytes * config.hidden_size + passed * (kinds[i] == "M")
            for i in layers
        )
        total += max(per_kind.values(), default=0.0)
    else:
        total = sum(per_kind[kinds[i]] for i in layers)
    extra = head_activation_bytes(config, seq_len, micro_batch, tp=tp, cp=cp, precision=precision)
    return total + extra["embedding"] * embedding + extra["head"] * head


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


def stages(num_layers: int, pp: int) -> list[range]:
    """Contiguous pipeline stages, the first ones one layer longer when pp does not divide."""
    size, rest = divmod(num_layers, pp)
    bounds = [0]
    for s in range(pp):
        bounds.append(bounds[-1] + size + (s < rest))
    return [range(lo, hi) for lo, hi in itertools.pairwise(bounds)]


def check_layout(
    config: TurboSConfig, layout: Layout, seq_len: int, micro_batch: int, sequences: int
) -> None:
    """Raise PlanError naming the first degree that cannot divide what it must."""
    for name in ("dp", "ep", "cp", "tp", "pp"):
        value = getattr(layout, name)
        if not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    kinds = config.layer_types
    if layout.ep > 1 and not ("F" in kinds and config.ffn_type == "moe"):
        raise PlanError(f"ep={layout.ep} needs MoE layers; this model has none")
    if "F" in kinds and config.ffn_type == "moe" and config.num_experts % layout.ep:
        raise PlanError(f"ep={layout.ep} must divide num_experts={config.num_experts}")
    if seq_len % layout.cp:
        raise PlanError(f"cp={layout.cp} must divide the sequence length {seq_len}")
    tp_splits = {"vocab_size": config.vocab_size}
    if "A" in kinds:
        tp_splits |= {
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
        }
    if "M" in kinds:
        tp_splits |= {"mamba_num_heads": config.mamba_num_heads, "mamba_n_groups": config.mamba_n_groups}
    if "F" in kinds and config.ffn_type == "moe":
        tp_splits |= {"expert_intermediate_size": config.expert_intermediate_size}
    if "D" in kinds or ("F" in kinds and config.ffn_type == "dense"):
        tp_splits |= {"intermediate_size": config.intermediate_size}
    for name, value in tp_splits.items():
        if value % layout.tp:
            raise PlanError(f"tp={layout.tp} must divide {name}={value}")
    if layout.pp > len(kinds):
        raise PlanError(f"pp={layout.pp} exceeds the {len(kinds)} layers (every stage needs one)")
    replicas = layout.dp * layout.ep
    if sequences < replicas * micro_batch:
        raise PlanError(
            f"dp*ep={replicas} data replicas x micro-batch {micro_batch} exceed the {sequences} "
            "sequences of a step"
        )


def _bandwidth(layout: Layout, dims: tuple[str, ...], network: Network) -> float:
    """Bytes/s per GPU of a collective over ``dims``: NVLink when the group fits in one node."""
    outer = max(DIMS.index(d) for d in dims)
    span = math.prod(getattr(layout, d) for d in DIMS[: outer + 1])
    gbps = network.intra_node_gbps if span <= network.gpus_per_node else network.inter_node_gbps
    return gbps * 1e9


def plan(
    config: TurboSConfig,
    layout: Layout,
    *,
    seq_len: int = 4096,
    micro_batch: int = 1,
    tokens_per_step: int = 2048 * 4096,
    gpu_memory_gib: float = 80.0,
    margin: float = 0.1,
    activation_checkpointing: bool = False,
    precision: Precision = Precision(),
    network: Network = Network(),
    ssd_impl: str = "fused",
) -> Plan:
    """Memory and communication of one layout. ``tokens_per_step`` is the global batch (the
    turbos-560b recipe's 2048 x 4096); a layout fits when its busiest GPU stays under
    ``gpu_memory_gib * (1 - margin)``."""
    sequences = max(1, tokens_per_step // seq_len)
    check_layout(config, layout, seq_len, micro_batch, sequences)
    dp, ep, cp, tp, pp = layout.dp, layout.ep, layout.cp, layout.tp, layout.pp
    m = -(-sequences // (dp * ep * micro_batch))
    params = layer_params(config)
    kinds = config.layer_types
    P = precision
    shard, expert_shard = dp * ep * cp, dp * cp  # FSDP groups of the dense weights, of the experts
    state_bytes = {
        "weights": P.param_bytes,
        "gradients": P.grad_bytes,
        "optimizer": P.master_bytes + 2 * P.moment_bytes,
    }
    tokens_local = micro_batch * seq_len // cp

    memory: dict[str, float] = {}
    fsdp_bytes = fsdp_expert_bytes = 0.0  # of the stage that sends most
    for s, stage in enumerate(stages(len(kinds), pp)):
        first, last = s == 0, s == pp - 1
        dense = sum(params[kinds[i]].per_rank(tp, ep) - params[kinds[i]].experts / (tp * ep) for i in stage)
        expert = sum(params[kinds[i]].experts / (tp * ep) for i in stage)
        emb = params["embedding"]
        dense += (emb.split / 2 / tp) * (first + last) + emb.replicated * last  # vocab-parallel tables
        held = dense / shard + expert / expert_shard
        largest = max(params[kinds[i]].per_rank(tp, ep) for i in stage)
        acts = activation_bytes(
            config,
            seq_len,
            micro_batch,
            layers=stage,
            embedding=first,
            head=last,
            activation_checkpointing=activation_checkpointing,
            tp=tp,
            cp=cp,
            ep=ep,
            precision=P,
            ssd_impl=ssd_impl,
        )
        stage_memory = {name: held * nbytes for name, nbytes in state_bytes.items()}
        stage_memory["activations"] = acts * min(pp - s, m)  # 1F1B: micro-batches in flight
        # FSDP: the layer being computed and the prefetched next one unsharded, and one layer's
        # unsharded gradients before their reduce-scatter
        stage_memory["fsdp_buffers"] = largest * (2 * P.param_bytes + P.grad_bytes) if shard > 1 else 0.0
        if sum(stage_memory.values()) > sum(memory.values()):
            memory = stage_memory
        # per micro-batch: all-gather in forward and again in backward, reduce-scatter of gradients
        traffic = m * (2 * P.param_bytes + P.grad_bytes)
        if dense * (shard - 1) / shard * traffic > fsdp_bytes:
            fsdp_bytes = dense * (shard - 1) / shard * traffic
            fsdp_expert_bytes = expert * (expert_shard - 1) / expert_shard * traffic

    n_moe = kinds.count("F") if config.ffn_type == "moe" else 0
    n_mamba, n_attn = kinds.count("M"), kinds.count("A")
    a = P.activation_bytes
    passes = 3 if activation_checkpointing else 2  # forward (again under checkpointing) and backward
    per_stage = 1 / pp  # a GPU runs its own stage's layers
    ep_bytes = (
        n_moe
        * per_stage
        * m
        * tokens_local
        * config.num_experts_per_tok  # average load
        * config.hidden_size
        * a
        * 2
        * passes
        * (ep - 1)
        / ep
    )  # dispatch and combine
    state = micro_batch * config.mamba_num_heads / tp * config.mamba_head_dim * config.mamba_state_size * 4
    halo = micro_batch * (config.mamba_conv_kernel - 1) * config.mamba_conv_dim / tp * a
    kv = micro_batch * seq_len * 2 * config.num_key_value_heads / tp * config.attn_head_dim * a
    cp_bytes = 0.0
    if cp > 1:
        cp_bytes = m * per_stage * (n_mamba * (state + halo) * passes + n_attn * kv * (cp - 1) / cp * passes)
    layers_per_gpu = len(kinds) * per_stage
    tp_bytes = m * layers_per_gpu * passes * 2 * (tp - 1) / tp * tokens_local * config.hidden_size * a
    pp_bytes = m * 2 * tokens_local * config.hidden_size * a if pp > 1 else 0.0
    communication = {
        "fsdp": fsdp_bytes + fsdp_expert_bytes,
        "ep_all_to_all": ep_bytes,
        "cp": cp_bytes,
        "tp": tp_bytes,
        "pp": pp_bytes,
    }
    groups = {
        "fsdp": ("ep", "cp", "dp"),
        "ep_all_to_all": ("ep",),
        "cp": ("cp",),
        "tp": ("tp",),
        "pp": ("pp",),
    }
    comm_seconds = {k: v / _bandwidth(layout, groups[k], network) for k, v in communication.items()}
    comm_seconds["fsdp"] = fsdp_bytes / _bandwidth(layout, groups["fsdp"], network) + (
        fsdp_expert_bytes / _bandwidth(layout, ("cp", "dp"), network)
    )

    activated = count_parameters(config)["total"]["activated"]
    flops = (8 if activation_checkpointing else 6) * activated * tokens_per_step / layout.gpus
    compute = flops / (network.compute_tflops * 1e12)
    bubble = compute * (pp - 1) / m
    return Plan(
        layout,
        activation_checkpointing,
        memory,
        communication,
        comm_seconds,
        compute,
        bubble,
        m,
        gpu_memory_gib,
        margin,
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(config: TurboSConfig, gpus: int) -> list[Layout]:
    """Every DP x EP x CP x TP x PP factorisation of ``gpus`` (unchecked)."""
    out = []
    for tp, ep, cp, pp in itertools.product(_divisors(gpus), repeat=4):
        rest = tp * ep * cp * pp
        if gpus % rest == 0:
            out.append(Layout(dp=gpus // rest, ep=ep, cp=cp, tp=tp, pp=pp))
    return out


def suggest(
    config: TurboSConfig,
    gpus: int,
    gpu_memory_gib: float = 80.0,
    *,
    top: int = 5,
    activation_checkpointing: bool | None = None,
    fixed: dict[str, int] | None = None,
    **options: object,
) -> tuple[list[Plan], list[Plan]]:
    """The ``top`` fitting plans for ``gpus`` GPUs, cheapest first (``Plan.cost_seconds``), and,
    when none fits, the ``top`` smallest in memory (to say by how much they miss).
    ``activation_checkpointing`` None tries both; ``fixed`` pins degrees, e.g. {"tp": 8}.
    ``options`` go to ``plan`` (seq_len, micro_batch, tokens_per_step, margin, precision, ...)."""
    if gpus < 1:
        raise PlanError(f"gpus must be at least 1, got {gpus}")
    fixed = fixed or {}
    checkpointing = (False, True) if activation_checkpointing is None else (activation_checkpointing,)
    plans, first_error = [], None
    for layout in layouts(config, gpus):
        if any(getattr(layout, k) != v for k, v in fixed.items()):
            continue
        for ac in checkpointing:
            try:
                plans.append(
                    plan(
                        config, layout, gpu_memory_gib=gpu_memory_gib, activation_checkpointing=ac, **options
                    )
                )
            except PlanError as err:
                first_error = first_error or err
    if not plans:
        raise first_error or PlanError(f"no layout of {gpus} GPUs matches {fixed}")
    fitting = sorted((p for p in plans if p.fits), key=lambda p: p.cost_seconds)
    if fitting:
        return fitting[:top], []
    return [], sorted(plans, key=lambda p: p.total_memory)[:top]


def format_plans(plans: list[Plan]) -> str:
    """A table: degrees, memory per component (GiB per GPU), communication (GB per GPU per step),
    and the cost model's seconds per step."""
    mem = ("weights", "gradients", "optimizer", "activations", "fsdp_buffers")
    comm = ("fsdp", "ep_all_to_all", "cp", "tp", "pp")
    head = (
        f"{'dp':>4}{'ep':>4}{'cp':>4}{'tp':>4}{'pp':>4}{'ac':>4}{'mb':>6} |"
        + "".join(f"{n:>8}" for n in ("weight", "grad", "optim", "activ", "fsdpbuf", "total"))
        + " GiB |"
        + "".join(f"{n:>8}" for n in ("fsdp", "ep_a2a", "cp", "tp", "pp"))
        + " GB |"
        + "".join(f"{n:>8}" for n in ("comm", "bubble", "cost"))
        + " s | fits"
    )
    lines = [head, "-" * len(head)]
    for p in plans:
        L = p.layout
        lines.append(
            f"{L.dp:>4}{L.ep:>4}{L.cp:>4}{L.tp:>4}{L.pp:>4}{'on' if p.activation_checkpointing else 'off':>4}"
            f"{p.micro_batches:>6} |"
            + "".join(f"{p.memory[n] / GIB:>8.1f}" for n in mem)
            + f"{p.total_memory / GIB:>8.1f}     |"
            + "".join(f"{p.communication[n] / 1e9:>8.0f}" for n in comm)
            + "    |"
            + f"{sum(p.comm_seconds.values()):>8.2f}{p.bubble_seconds:>8.2f}{p.cost_seconds:>8.2f}"
            + f"   | {'yes' if p.fits else 'no'}"
        )
    return "\n".join(lines)
