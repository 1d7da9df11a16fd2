"""Parameter accounting by component, computed from the config alone (no weights built).

Activated parameters are those a single token's forward pass touches: everything except the
routed experts, of which only top_k of num_experts run. The input embedding is a lookup but is
counted as activated, as the report's figures and most MoE papers do.
"""

from __future__ import annotations

from turbos.config import TurboSConfig


def count_parameters(config: TurboSConfig) -> dict[str, dict[str, int]]:
    """{component: {"total": n, "activated": n}} plus a "total" row."""
    c = config
    counts = c.layer_types
    n_attn, n_mamba, n_ffn = counts.count("A"), counts.count("M"), counts.count("F")
    n_dense = counts.count("D") + (n_ffn if c.ffn_type == "dense" else 0)
    n_moe = n_ffn if c.ffn_type == "moe" else 0
    dense_mats = 3 if c.mlp_activation == "swiglu" else 2  # gate, up, down; or up, down
    expert_mats = 3 if c.expert_activation == "swiglu" else 2
    H = c.hidden_size
    rows: dict[str, tuple[int, int]] = {}

    emb = c.vocab_size * H
    rows["embeddings"] = (emb, emb)
    if not c.tie_word_embeddings:
        rows["lm_head"] = (emb, emb)

    d = c.attn_head_dim
    qo = 2 * H * c.num_attention_heads * d
    kv = 2 * H * c.num_key_value_heads * d
    bias = (2 * c.num_attention_heads * d + 2 * c.num_key_value_heads * d) if c.attention_bias else 0
    qk_norm = 2 * d if c.use_qk_norm else 0
    attn = n_attn * (qo + kv + bias + qk_norm)
    rows["attention"] = (attn, attn)

    di, conv_dim, nh = c.mamba_intermediate_size, c.mamba_conv_dim, c.mamba_num_heads
    in_proj = H * (di + conv_dim + nh) + ((di + conv_dim + nh) if c.mamba_proj_bias else 0)
    out_proj = di * H + (H if c.mamba_proj_bias else 0)
    conv = conv_dim * c.mamba_conv_kernel + (conv_dim if c.mamba_conv_bias else 0)
    mamba = n_mamba * (in_proj + conv + 3 * nh + di + out_proj)  # dt_bias, A_log, D; gated norm
    rows["mamba2"] = (mamba, mamba)

    if n_dense:
        dense = n_dense * dense_mats * H * c.intermediate_size
        rows["dense_ffn"] = (dense, dense)
    if n_moe:
        shared = n_moe * expert_mats * H * c.num_shared_experts * c.shared_intermediate_size
        routed_one = expert_mats * H * c.expert_intermediate_size
        routed = n_moe * c.num_experts * routed_one
        rows["shared_experts"] = (shared, shared)
        rows["routed_experts"] = (routed, n_moe * c.num_experts_per_tok * routed_one)
        router = n_moe * (H + c.router_correction_bias) * c.num_experts
        rows["router"] = (router, router)

    norms = (len(counts) + 1) * H
    rows["norms"] = (norms, norms)
    out = {k: {"total": t, "activated": a} for k, (t, a) in rows.items()}
    out["total"] = {
        "total": sum(t for t, _ in rows.values()),
        "activated": sum(a for _, a in rows.values()),
    }
    return out


def format_count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
