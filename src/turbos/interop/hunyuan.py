"""Hugging Face ``hunyuan_v1_moe`` (HunYuanMoEV1, e.g. Hunyuan-A13B) <-> turbos.

A HunYuan decoder layer is two turbos layers "AF": HF layer i's ``input_layernorm`` and
``self_attn`` are turbos layer 2i's ``norm`` and ``mixer``, its ``post_attention_layernorm`` and
``mlp`` are layer 2i+1's. Checkpoints store the routed experts one by one
(``mlp.experts.{e}.{gate,up,down}_proj.weight``, also what transformers' ``save_pretrained``
writes); turbos stacks them as ``experts.gate_up_proj`` (E, 2I, H, gate rows first) and
``experts.down_proj`` (E, H, I). HunYuan's MoE is one shared SwiGLU plus softmax top-k experts
with renormalised weights and no capacity limit, all of width ``intermediate_size``.

Ignored options (no effect on eval-time outputs): ``attention_dropout``, ``eod_token_id``,
``sep_token_id``, ``use_cache``, ``output_router_logits``, ``dtype``, the Tencent configs'
``moe_drop_tokens``, ``moe_random_routing_dropped_token`` and ``cla_share_factor``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from turbos.config import TurboSConfig
from turbos.interop.convert import UnsupportedCheckpointError, refuse

MODEL_TYPE = "hunyuan_v1_moe"

HF_DEFAULTS = {
    "vocab_size": 290943,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "head_dim": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "num_experts": 1,
    "moe_topk": 1,
}
"""HunYuanMoEV1Config's defaults for the keys the conversion reads."""

ALIASES = {"num_experts_per_tok": "moe_topk", "num_local_experts": "num_experts"}
"""HunYuanMoEV1Config.attribute_map: alternative names -> config.json names."""

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_HF_LAYER = re.compile(
    r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn|mlp)\.(.+)"
)
_HF_EXPERT = re.compile(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_OUR_LAYER = re.compile(r"model\.layers\.(\d+)\.(norm|mixer)\.(.+)")


def _per_layer(value: Any, num_layers: int) -> Any:
    """The value of a scalar, or of a list holding one value for every layer; None otherwise."""
    if isinstance(value, list):
        return value[0] if len(value) == num_layers and len(set(value)) == 1 else None
    return value


def _rope(hf: dict) -> tuple[float, float]:
    """(rope_theta, rope_alpha) from ``rope_parameters`` (or the older ``rope_scaling`` and
    ``rope_theta``), read as HunYuanMoEV1RotaryEmbedding reads them."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    alpha = rope.get("alpha")
    if kind == "default":
        return theta, 1.0
    if kind == "dynamic" and alpha and alpha >= 1:  # HF: NTK alpha, a fixed stretch of the base
        return theta, float(alpha)
    raise UnsupportedCheckpointError(
        f"{MODEL_TYPE}: unsupported option rope_parameters={rope!r}; turbos implements plain RoPE "
        "and NTK alpha (rope_type 'dynamic' with alpha >= 1) only"
    )


def config_from_hf(hf: dict) -> TurboSConfig:
    """HunYuanMoEV1Config (as a config.json dict) -> TurboSConfig, layout "AF" per HF layer."""
    hf = {**HF_DEFAULTS, **{ALIASES[k]: v for k, v in hf.items() if k in ALIASES}, **hf}
    layers, width = hf["num_hidden_layers"], hf["intermediate_size"]
    head_dim = hf["head_dim"] or hf["hidden_size"] // hf["num_attention_heads"]
    refuse(
        hf,
        MODEL_TYPE,
        {
            "hidden_act": "silu",
            "pretraining_tp": 1,
            "num_experts": lambda v: _per_layer(v, layers) is not None,
            "moe_topk": lambda v: _per_layer(v, layers) is not None,
            # flags of Tencent's original configs, at the values HF's HunYuanMoEV1 assumes
            "use_cla": False,
            "use_mla": False,
            "use_qk_norm": True,
            "use_rotary_pos_emb": True,
            "use_mixed_mlp_moe": True,
            "num_shared_expert": lambda v: _per_layer(v, layers) == 1,
            "moe_intermediate_size": lambda v: _per_layer(v, layers) == width,
            "moe_layer_num_skipped": 0,
            "mlp_bias": False,
            "attention_head_dim": head_dim,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.0,
        },
    )
    theta, alpha = _rope(hf)
    experts, top_k = _per_layer(hf["num_experts"], layers), _per_layer(hf["moe_topk"], layers)
    eos = hf["eos_token_id"]
    ids = {
        "pad_token_id": hf["pad_token_id"],
        "bos_token_id": hf["bos_token_id"],
        "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos,
    }
    return TurboSConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        layout=f"AF*{layers}",
        rms_norm_eps=hf["rms_norm_eps"],
        tie_word_embeddings=hf["tie_word_embeddings"],
        initializer_range=hf["initializer_range"],
        max_position_embeddings=hf["max_position_embeddings"],
        **{k: v for k, v in ids.items() if v is not None},
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"] or hf["num_attention_heads"],
        head_dim=hf["head_dim"],
        attention_bias=hf["attention_bias"],
        use_qk_norm=True,
        rope_theta=theta,
        rope_alpha=alpha,
        ffn_type="moe",
        num_experts=experts,
        num_experts_per_tok=top_k,
        num_shared_experts=1,
        expert_intermediate_size=width,
        shared_expert_intermediate_size=None,
        norm_topk_prob=True,
        # HunYuan has no capacity limit; at E / k the training-time capacity is every token
        capacity_factor=experts / top_k,
    )


def state_from_hf(state: dict[str, torch.Tensor], config: TurboSConfig) -> dict[str, torch.Tensor]:
    """HF weights -> turbos weights (experts stacked; lm_head dropped when tied). Names that do
    not map pass through unchanged, so the caller's key check reports them."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # a buffer some old checkpoints saved
            continue
        match = _HF_LAYER.fullmatch(key)
        if match is None:
            out[key] = tensor
            continue
        i, part, rest = int(match[1]), match[2], match[3]
        expert = _HF_EXPERT.fullmatch(rest) if part == "mlp" else None
        if expert is not None:
            experts.setdefault(i, {})[int(expert[1]), expert[2]] = tensor
        elif part in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{2 * i + (part == 'post_attention_layernorm')}.norm.{rest}"] = tensor
        else:
            out[f"model.layers.{2 * i + (part == 'mlp')}.mixer.{rest}"] = tensor
    num = config.num_experts
    for i, found in experts.items():
        if set(found) != {(e, p) for e in range(num) for p in PROJECTIONS}:
            raise ValueError(
                f"{MODEL_TYPE}: layer {i} does not hold exactly the weights of num_experts={num}"
            )
        prefix = f"model.layers.{2 * i + 1}.mixer.experts."
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([found[e, "gate_proj"], found[e, "up_proj"]]) for e in range(num)]
        )
        out[prefix + "down_proj"] = torch.stack([found[e, "down_proj"] for e in range(num)])
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _check_expressible(config: TurboSConfig) -> None:
    """Refuse, by name, turbos options a HunYuanMoEV1 model cannot express."""
    refuse(
        config.to_dict(),
        MODEL_TYPE,
        {
            "layout": lambda _: config.layer_types == ["A", "F"] * (config.num_hidden_layers // 2),
            "ffn_type": "moe",
            "num_shared_experts": 1,
            "shared_expert_intermediate_size": lambda v: v in (None, config.expert_intermediate_size),
            "use_qk_norm": True,
            "norm_topk_prob": True,
        },
    )


def config_to_hf(config: TurboSConfig) -> dict:
    """TurboSConfig -> a HunYuanMoEV1Config dict (config.json) for layouts of "AF" layers."""
    _check_expressible(config)
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_alpha > 1:
        rope = {
            "rope_type": "dynamic",
            "alpha": float(config.rope_alpha),
            "factor": 1.0,
            "rope_theta": config.rope_theta,
        }
    return {
        "architectures": ["HunYuanMoEV1ForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.expert_intermediate_size,
        "num_hidden_layers": config.num_hidden_layers // 2,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.attn_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": rope,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "num_experts": config.num_experts,
        "moe_topk": config.num_experts_per_tok,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": "float32",
    }


def state_to_hf(state: dict[str, torch.Tensor], config: TurboSConfig) -> dict[str, torch.Tensor]:
    """turbos weights -> HF weights, experts one by one as HF checkpoints store them."""
    _check_expressible(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _OUR_LAYER.fullmatch(key)
        if match is None:
            if not (key == "lm_head.weight" and config.tie_word_embeddings):
                out[key] = tensor
            continue
        i, ffn = divmod(int(match[1]), 2)
        part, rest = match[2], match[3]
        prefix = f"model.layers.{i}."
        if part == "norm":
            out[prefix + ("post_attention_layernorm." if ffn else "input_layernorm.") + rest] = tensor
        elif not ffn:
            out[prefix + "self_attn." + rest] = tensor
        elif rest in ("experts.gate_up_proj", "experts.down_proj"):
            names = ("gate_proj", "up_proj") if rest == "experts.gate_up_proj" else ("down_proj",)
            for e, per_expert in enumerate(tensor):
                for name, piece in zip(names, per_expert.chunk(len(names)), strict=True):
                    out[f"{prefix}mlp.experts.{e}.{name}.weight"] = piece.clone()
        else:
            out[prefix + "mlp." + rest] = tensor
    return out
