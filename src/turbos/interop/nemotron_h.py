"""NVIDIA NemotronH (``model_type: nemotron_h``) <-> turbos.

NemotronH is a hybrid of separate pre-norm residual layers, one mixer each: Mamba2
(``linear_attention``), attention without RoPE (``full_attention``), a dense ReLU^2 MLP (``mlp``)
or a MoE of ReLU^2 experts with sigmoid, bias-corrected, group-limited routing (``moe``). That is
the A/M/F idea, so its layer list maps letter for letter onto a turbos layout: M, A, D (dense) and
F (MoE), with ``use_rope=False``, ``use_qk_norm=False``, ``mlp_activation`` and
``expert_activation`` 'relu2', ``router_score`` 'sigmoid' and a correction bias.

Config keys of older checkpoints (``hybrid_override_pattern`` with M * - E, ``mamba_n_groups``,
``mamba_d_conv``, ...) are read as transformers reads them. Multi-token-prediction weights
(``mtp.*``) are dropped, as transformers drops them on load.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from turbos.config import TurboSConfig
from turbos.interop.convert import UnsupportedCheckpointError, refuse, turbos_keys

MODEL_TYPE = "nemotron_h"

LETTERS = {"linear_attention": "M", "full_attention": "A", "mlp": "D", "moe": "F"}
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
LEGACY_KEYS = {  # old config.json name -> current name (NemotronHConfig.__post_init__)
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}
# Mixer parameter names that differ (ours -> theirs) per layer letter; the rest are equal.
RENAMES = {
    "F": {
        "mixer.gate.wg.weight": "mixer.gate.weight",
        "mixer.shared_mlp.up_proj.weight": "mixer.shared_experts.up_proj.weight",
        "mixer.shared_mlp.down_proj.weight": "mixer.shared_experts.down_proj.weight",
    },
}
TOP_LEVEL = {
    "model.embed_tokens.weight": "model.embeddings.weight",
    "model.norm.weight": "model.norm_f.weight",
}


def _float(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return math.inf if value is None else float(value)


def _single_id(hf: dict, key: str, default: int) -> int:
    value = hf.get(key, default)
    if isinstance(value, list):
        if len(value) != 1:
            raise UnsupportedCheckpointError(f"{MODEL_TYPE}: {key}={value!r} (several ids) is not supported")
        value = value[0]
    return default if value is None else int(value)


def layer_types(hf: dict) -> list[str]:
    """NemotronH's layer kinds from ``layers_block_type`` or the legacy ``hybrid_override_pattern``."""
    if hf.get("layers_block_type"):
        kinds = list(hf["layers_block_type"])
    elif hf.get("hybrid_override_pattern"):
        bad = sorted(set(hf["hybrid_override_pattern"]) - set(PATTERN))
        if bad:
            raise UnsupportedCheckpointError(
                f"{MODEL_TYPE}: hybrid_override_pattern has unknown letters {bad}"
            )
        kinds = [PATTERN[c] for c in hf["hybrid_override_pattern"]]
    else:
        raise UnsupportedCheckpointError(f"{MODEL_TYPE}: config.json has no layers_block_type")
    unknown = sorted(set(kinds) - set(LETTERS))
    if unknown:
        raise UnsupportedCheckpointError(f"{MODEL_TYPE}: layers_block_type has unsupported kinds {unknown}")
    return kinds


def config_from_hf(hf: dict) -> TurboSConfig:
    """TurboSConfig of a NemotronH config.json (as a dict); unsupported options refused by name."""
    hf = {LEGACY_KEYS.get(k, k): v for k, v in hf.items()}
    refuse(
        hf,
        MODEL_TYPE,
        {
            "mlp_hidden_act": "relu2",
            "mamba_hidden_act": "silu",
            "mlp_bias": False,
            "moe_latent_size": None,
            "sliding_window": None,
        },
    )
    letters = "".join(LETTERS[k] for k in layer_types(hf))
    moe = "F" in letters
    lo, hi = (_float(v) for v in hf.get("time_step_limit", (0.0, math.inf)))
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        layout=letters,
        rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=False,  # NemotronH's code never ties lm_head, whatever the config says
        initializer_range=hf.get("initializer_range", 0.02),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        pad_token_id=_single_id(hf, "pad_token_id", 0),
        bos_token_id=_single_id(hf, "bos_token_id", 1),
        eos_token_id=_single_id(hf, "eos_token_id", 2),
        num_attention_heads=hf.get("num_attention_heads", 32),
        num_key_value_heads=hf.get("num_key_value_heads") or hf.get("num_attention_heads", 32),
        head_dim=hf.get("head_dim"),
        attention_bias=False,  # NemotronH's attention projections have no bias whatever the config says
        use_qk_norm=False,
        use_rope=False,
        mamba_num_heads=hf.get("mamba_num_heads", 128),
        mamba_head_dim=hf.get("mamba_head_dim", 64),
        mamba_n_groups=hf.get("n_groups", 8),
        mamba_state_size=hf.get("ssm_state_size", 128),
        mamba_chunk_size=hf.get("chunk_size", 128),
        mamba_conv_kernel=hf.get("conv_kernel", 4),
        mamba_conv_bias=hf.get("use_conv_bias", True),
        mamba_proj_bias=hf.get("use_bias", False),  # in_proj and out_proj
        time_step_min=hf.get("time_step_min", 0.001),
        time_step_max=hf.get("time_step_max", 0.1),
        time_step_floor=hf.get("time_step_floor", 1e-4),
        time_step_limit=(lo, hi),
        intermediate_size=hf.get("intermediate_size", 21504),
        mlp_activation="relu2",
        expert_activation="relu2",
    )
    if moe:
        fields.update(
            num_experts=hf.get("n_routed_experts", 8),
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            expert_intermediate_size=hf.get("moe_intermediate_size", 7688),
            num_shared_experts=1,  # NemotronH has one shared MLP of this width
            shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 7688),
            norm_topk_prob=hf.get("norm_topk_prob", True),
            router_score="sigmoid",
            router_correction_bias=True,
            router_groups=hf.get("n_group", 1),
            router_topk_groups=hf.get("topk_group", 1),
            routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        )
    else:  # no MoE layer: the MoE fields only need to be valid
        fields.update(num_shared_experts=0)
    return TurboSConfig(**fields)


def config_to_hf(config: TurboSConfig) -> dict:
    """NemotronH config.json of a turbos config that NemotronH can express."""
    needs = {
        "use_rope": False,
        "use_qk_norm": False,
        "attention_bias": False,
        "mlp_activation": "relu2",
        "expert_activation": "relu2",
        "ffn_type": "moe",
    }
    letters = config.layer_types
    if "F" in letters:
        needs.update(router_score="sigmoid", router_correction_bias=True, num_shared_experts=1)
    bad = [f"{k}={getattr(config, k)!r}" for k, v in needs.items() if getattr(config, k) != v]
    if bad:
        raise UnsupportedCheckpointError(f"{MODEL_TYPE} cannot express {', '.join(bad)}")
    kinds = {v: k for k, v in LETTERS.items()}
    lo, hi = config.time_step_limit
    hf: dict[str, Any] = dict(
        architectures=["NemotronHForCausalLM"],
        model_type=MODEL_TYPE,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        layers_block_type=[kinds[k] for k in letters],
        tie_word_embeddings=False,  # lm_head is written out (NemotronH never ties)
        initializer_range=config.initializer_range,
        max_position_embeddings=config.max_position_embeddings,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        layer_norm_epsilon=config.rms_norm_eps,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.attn_head_dim,
        attention_bias=False,
        mamba_num_heads=config.mamba_num_heads,
        mamba_head_dim=config.mamba_head_dim,
        n_groups=config.mamba_n_groups,
        ssm_state_size=config.mamba_state_size,
        chunk_size=config.mamba_chunk_size,
        conv_kernel=config.mamba_conv_kernel,
        use_conv_bias=config.mamba_conv_bias,
        use_bias=config.mamba_proj_bias,
        mamba_hidden_act="silu",
        time_step_min=config.time_step_min,
        time_step_max=config.time_step_max,
        time_step_floor=config.time_step_floor,
        time_step_limit=[lo, {"__float__": "Infinity"} if math.isinf(hi) else hi],
        intermediate_size=config.intermediate_size,
        mlp_hidden_act="relu2",
        mlp_bias=False,
        n_routed_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=config.expert_intermediate_size,
        moe_shared_expert_intermediate_size=config.shared_intermediate_size,
        n_shared_experts=1,
        norm_topk_prob=config.norm_topk_prob,
        n_group=config.router_groups,
        topk_group=config.router_topk_groups,
        routed_scaling_factor=config.routed_scaling_factor,
        dtype="float32",
    )
    return hf


def _names(config: TurboSConfig) -> dict[str, str]:
    """Every turbos parameter name -> its NemotronH name."""
    names = {**TOP_LEVEL, "lm_head.weight": "lm_head.weight"}
    for key in turbos_keys(config):
        if key in TOP_LEVEL or key == "lm_head.weight":
            continue
        _, _, index, rest = key.split(".", 3)
        kind = config.layer_types[int(index)]
        names[key] = f"model.layers.{index}.{RENAMES.get(kind, {}).get(rest, rest)}"
    return names


_EXPERT = re.compile(r"model\.layers\.(\d+)\.mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight")


def _in_memory_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint names (``backbone.`` prefix, one 2-D weight per expert, as NemotronH checkpoints
    are saved) -> transformers' in-memory names (``model.``, experts stacked (E, out, in))."""
    state = {
        ("model." + k[len("backbone.") :] if k.startswith("backbone.") else k): v for k, v in state.items()
    }
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key in [k for k in state if _EXPERT.fullmatch(k)]:
        layer, e, proj = _EXPERT.fullmatch(key).groups()
        experts.setdefault((layer, proj), {})[int(e)] = state.pop(key)
    for (layer, proj), parts in experts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ValueError(f"{MODEL_TYPE}: layer {layer} {proj} is missing experts: has {sorted(parts)}")
        state[f"model.layers.{layer}.mixer.experts.{proj}"] = torch.stack(
            [parts[e] for e in range(len(parts))]
        )
    return state


def state_from_hf(state: dict[str, torch.Tensor], config: TurboSConfig) -> dict[str, torch.Tensor]:
    """NemotronH weights (checkpoint or in-memory names) -> turbos names (``mtp.*`` dropped)."""
    theirs = {k: v for k, v in _in_memory_names(state).items() if not k.startswith("mtp.")}
    if "lm_head.weight" not in theirs and "model.embeddings.weight" in theirs:  # saved tied: no head
        theirs["lm_head.weight"] = theirs["model.embeddings.weight"]
    out = {}
    for ours, name in _names(config).items():
        if name in theirs:
            out[ours] = theirs.pop(name)
    if theirs:
        raise UnsupportedCheckpointError(
            f"{MODEL_TYPE}: weights turbos has no place for: {sorted(theirs)[:5]}"
        )
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: TurboSConfig) -> dict[str, torch.Tensor]:
    """turbos weights -> a NemotronH checkpoint's names (``backbone.``, one weight per expert)."""
    out = {}
    state = dict(state)
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # a tied turbos model
    for ours, name in _names(config).items():
        disk = name if name == "lm_head.weight" else "backbone." + name[len("model.") :]
        if disk.endswith(("experts.up_proj", "experts.down_proj")):
            prefix, proj = disk.rsplit(".", 1)
            out.update(
                {f"{prefix}.{e}.{proj}.weight": w.clone() for e, w in enumerate(state[ours].unbind(0))}
            )
        else:
            out[disk] = state[ours]
    return out
