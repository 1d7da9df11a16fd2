"""TurboSConfig: every hyperparameter of the network, the A/M/F layout grammar, and presets.

The layout is the one place the layer order lives (docs/design.md). It is a string of *blocks*; a block
is a run of the letters A (attention), M (Mamba2) and F (feed-forward / MoE), each letter one
pre-norm residual layer (report §2.2). Blocks are separated by spaces and may repeat with ``*N``;
parentheses group several blocks, so the 128-layer model reads on one line::

    "AMF MF MF"             -> A M F M F M F
    "(AMF MF*3)*2"          -> two copies of AMF MF MF MF
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_KINDS = {"A": "attention", "M": "mamba2", "F": "ffn", "D": "dense_ffn"}

HF_BOOKKEEPING_KEYS = frozenset(
    {
        # written by every transformers save_pretrained (5.x; torch_dtype and _name_or_path by 4.x)
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_name_or_path",
        # written when set: remote-code classes, the cache switch, PretrainedConfig's common fields
        "auto_map",
        "use_cache",
        "output_hidden_states",
        "return_dict",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "id2label",
        "label2id",
        "problem_type",
    }
)
"""Keys a config.json written by transformers' ``save_pretrained`` adds to a turbos config;
``TurboSConfig.from_dict`` ignores them (and only them, besides its own fields)."""

ACTIVATIONS = ("swiglu", "relu2")
STATE_DTYPES = ("float32", "bfloat16", "float16")
ROUTER_SCORES = ("softmax", "sigmoid")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


class DamagedFileError(ValueError):
    """A saved file (config.json, model.safetensors, tokenizer.json) cannot be read back: it is
    truncated or otherwise damaged. The one-line message names the file."""

    def __init__(self, path: str | os.PathLike, reason: object) -> None:
        reason = " ".join(str(reason).split())
        super().__init__(f"{path} is damaged or truncated ({reason}); save or copy it again")
        self.path = Path(path)


# ----------------------------------------------------------------------------------------------
# Layout grammar
# ----------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(\(|\)|\*\s*\d+|[A-Za-z]+|\S)")


def parse_layout(layout: str) -> list[str]:
    """Expand a compact layout string into its list of blocks (each a string of A/M/F letters)."""
    tokens = [m.group(1).replace(" ", "") for m in _TOKEN.finditer(layout)]
    if not tokens:
        raise ConfigError("layout is empty: give blocks of the letters A, M, F, e.g. 'AMF MF MF'")
    pos = 0

    def parse_seq(depth: int) -> list[str]:
        nonlocal pos
        blocks: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            if tok == ")":
                if depth == 0:
                    raise ConfigError(f"layout {layout!r}: unmatched ')'")
                return blocks
            if tok == "(":
                pos += 1
                group = parse_seq(depth + 1)
                if pos >= len(tokens) or tokens[pos] != ")":
                    raise ConfigError(f"layout {layout!r}: unclosed '('")
                pos += 1
                if not group:
                    raise ConfigError(f"layout {layout!r}: empty group '()'")
            elif tok.startswith("*"):
                raise ConfigError(f"layout {layout!r}: '{tok}' must follow a block or a group")
            elif tok.isalpha():
                bad = sorted({c for c in tok if c not in LAYER_KINDS})
                if bad:
                    raise ConfigError(
                        f"layout {layout!r}: unknown layer letter(s) {bad}; use A (attention), "
                        "M (Mamba2), F (feed-forward/MoE), D (dense feed-forward)"
                    )
                group = [tok]
                pos += 1
            else:
                raise ConfigError(f"layout {layout!r}: unexpected character {tok!r}")
            repeat = 1
            if pos < len(tokens) and tokens[pos].startswith("*"):
                repeat = int(tokens[pos][1:])
                if repeat < 1:
                    raise ConfigError(f"layout {layout!r}: repeat count must be >= 1")
                pos += 1
            blocks.extend(group * repeat)
        if depth > 0:
            raise ConfigError(f"layout {layout!r}: unclosed '('")
        return blocks

    blocks = parse_seq(0)
    if pos != len(tokens):
        raise ConfigError(f"layout {layout!r}: unmatched ')'")
    return blocks


def layout_counts(layout: str) -> dict[str, int]:
    """Number of layers of each letter in a layout."""
    letters = "".join(parse_layout(layout))
    return {k: letters.count(k) for k in LAYER_KINDS}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class TurboSConfig:
    """Hyperparameters of a TurboS hybrid network (report §2.2, Table 1).

    Field names follow Hugging Face conventions where one exists, so a user of transformers'
    Mamba2, NemotronH or HunYuan configs recognises them.
    """

    # --- whole model ---------------------------------------------------------------------------
    vocab_size: int = 512
    """Tokenizer vocabulary size. Report: 128K (the Hunyuan-Large tokenizer)."""
    hidden_size: int = 128
    """Residual stream width. Report: 5120."""
    layout: str = "AMF MF"
    """Layer order as blocks of A/M/F letters (see module docstring). Report: 128 layers =
    57 M + 7 A + 64 F."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (pre-norms, QK-norms, the gated norm inside Mamba2)."""
    tie_word_embeddings: bool = False
    """Share the input embedding matrix with the LM head."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    max_position_embeddings: int = 4096
    """Longest sequence the model is meant for (report: 4K pre-training, 256K after extension).
    Attention has no hard limit; this is what tools such as the server check prompts against."""
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    # --- attention (A) -------------------------------------------------------------------------
    num_attention_heads: int = 4
    """Query heads. Report: 64."""
    num_key_value_heads: int = 2
    """Key/value heads of grouped-query attention. Report: 8."""
    head_dim: int | None = None
    """Per-head width; default hidden_size // num_attention_heads (report: 5120 / 64 = 80)."""
    attention_bias: bool = False
    """Bias on the q/k/v/o projections."""
    use_qk_norm: bool = True
    """Per-head RMSNorm on q and k, after RoPE as in Hunyuan (report §2.2 'QK normalization')."""
    rope_theta: float = 10000.0
    """Rotary base before NTK scaling."""
    rope_alpha: float = 1.0
    """NTK-aware scaling: the rotary base becomes rope_theta * alpha^(d / (d - 2)). Report: 1 at 4K,
    50 at 32K, 1000 at 256K."""
    use_rope: bool = True
    """Rotary positions on q and k. False: attention without positions (NemotronH, whose Mamba2
    layers carry the order)."""

    # --- Mamba2 (M) ----------------------------------------------------------------------------
    mamba_num_heads: int = 4
    """SSM heads. Report: 64."""
    mamba_head_dim: int = 32
    """Channels per SSM head; the inner width is mamba_num_heads * mamba_head_dim. The report does
    not state it; 64 (inner width 4096) makes the 560B preset land on the report's totals."""
    mamba_n_groups: int = 2
    """Groups sharing B and C. Report: 16."""
    mamba_state_size: int = 16
    """SSM state size N. Report: 128."""
    mamba_chunk_size: int = 64
    """Chunk length of the chunked SSD scan. Report: 128."""
    mamba_conv_kernel: int = 4
    """Width of the causal depthwise conv on x, B, C."""
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    """Bias on in_proj and out_proj."""
    time_step_min: float = 0.001
    """dt at init is log-uniform in [time_step_min, time_step_max] (via dt_bias)."""
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    """dt = softplus(dt_raw + dt_bias) is clamped to this range, in prefill and decode alike."""
    mamba_state_dtype: str = "float32"
    """Precision the cached SSM state keeps between steps. 'float32' (the report's choice, §5);
    'bfloat16' and 'float16' are for the precision study only: the state is rounded to that dtype
    after every update (what storing it in that dtype does), while the scan computes in fp32."""

    # --- feed-forward (F) ----------------------------------------------------------------------
    ffn_type: str = "moe"
    """'moe' (shared + routed experts, the report's choice) or 'dense' (one SwiGLU, for ablations)."""
    intermediate_size: int = 256
    """Width of the dense FFN (F layers with ffn_type='dense', and D layers)."""
    mlp_activation: str = "swiglu"
    """Dense FFN: 'swiglu' (down(silu(gate(x)) * up(x))) or 'relu2' (down(relu(up(x))^2),
    non-gated, as NemotronH)."""
    num_experts: int = 4
    """Routed ('specialized') experts per MoE layer. Report: 32."""
    num_experts_per_tok: int = 2
    """Routed experts chosen per token (top-k). Report: 2."""
    num_shared_experts: int = 1
    """Always-on shared experts. Report: 1."""
    expert_intermediate_size: int = 128
    """SwiGLU width of each routed expert. Report: 17,024."""
    shared_expert_intermediate_size: int | None = None
    """SwiGLU width of each shared expert; default expert_intermediate_size."""
    expert_activation: str = "swiglu"
    """Routed and shared experts: 'swiglu' (the report's) or 'relu2' (non-gated, NemotronH)."""
    norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (as Hunyuan does)."""
    router_score: str = "softmax"
    """Router scores: 'softmax' over experts (Hunyuan) or an independent 'sigmoid' per expert
    (DeepSeek-V3, NemotronH)."""
    router_correction_bias: bool = False
    """A per-expert bias (``e_score_correction_bias`` buffer) added to the scores when choosing the
    top-k only; the weights stay the raw scores (DeepSeek-V3's auxiliary-loss-free balancing; the
    bias is loaded, not trained)."""
    router_groups: int = 1
    """Group-limited routing: experts form this many groups, ranked by the sum of their top two
    (bias-corrected) scores; only the best ``router_topk_groups`` groups are eligible. 1: plain top-k."""
    router_topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    """Routing weights are multiplied by this after normalisation."""
    capacity_factor: float = 1.5
    """Training-time expert capacity = ceil(capacity_factor * tokens * top_k / num_experts).
    Overflowing tokens are recycled to experts with room (Hunyuan-Large). None of it at inference."""
    router_aux_loss_coef: float = 0.01
    """Weight of the load-balancing auxiliary loss added to the LM loss."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean squared log-sum-exp of router logits); 0 disables it."""

    # --- derived -------------------------------------------------------------------------------
    _blocks: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.time_step_limit, list):
            self.time_step_limit = tuple(self.time_step_limit)
        self.validate()

    # ---------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ConfigError with a clear message for any impossible combination."""
        self._blocks = parse_layout(self.layout)

        def positive(*names: str) -> None:
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ConfigError(f"{name} must be a positive integer, got {value!r}")

        positive("vocab_size", "hidden_size", "max_position_embeddings")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}={value!r} must be a token id in [0, {self.vocab_size})")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        counts = layout_counts(self.layout)
        if counts["A"]:
            positive("num_attention_heads", "num_key_value_heads")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"num_attention_heads={self.num_attention_heads} is not divisible by "
                    f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
                )
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            if self.head_dim is not None:
                positive("head_dim")
            if self.use_rope and (self.attn_head_dim % 2 or self.attn_head_dim < 4):
                raise ConfigError(
                    f"attention head_dim={self.attn_head_dim} must be even (RoPE) and at least 4 "
                    "(NTK alpha scales the base by alpha^(d / (d - 2)))"
                )
            if self.rope_theta <= 0 or self.rope_alpha < 1:
                raise ConfigError("rope_theta must be > 0 and rope_alpha >= 1")
        if counts["M"]:
            positive(
                "mamba_num_heads",
                "mamba_head_dim",
                "mamba_n_groups",
                "mamba_state_size",
                "mamba_chunk_size",
                "mamba_conv_kernel",
            )
            if self.mamba_num_heads % self.mamba_n_groups:
                raise ConfigError(
                    f"mamba_num_heads={self.mamba_num_heads} is not divisible by mamba_n_groups="
                    f"{self.mamba_n_groups} (B and C are shared within a group)"
                )
            lo, hi = self.time_step_limit
            if not 0 <= lo < hi:
                raise ConfigError(
                    f"time_step_limit must be (lo, hi) with 0 <= lo < hi, got {self.time_step_limit}"
                )
            if not 0 < self.time_step_min <= self.time_step_max:
                raise ConfigError("need 0 < time_step_min <= time_step_max")
        for name, allowed in (
            ("mlp_activation", ACTIVATIONS),
            ("expert_activation", ACTIVATIONS),
            ("router_score", ROUTER_SCORES),
            ("mamba_state_dtype", STATE_DTYPES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if counts["D"]:
            positive("intermediate_size")
        if counts["F"]:
            if self.ffn_type not in ("moe", "dense"):
                raise ConfigError(f"ffn_type must be 'moe' or 'dense', got {self.ffn_type!r}")
            if self.ffn_type == "dense":
                positive("intermediate_size")
            else:
                positive("num_experts", "num_experts_per_tok", "expert_intermediate_size")
                if self.num_experts_per_tok > self.num_experts:
                    raise ConfigError(
                        f"num_experts_per_tok={self.num_experts_per_tok} (top-k) exceeds "
                        f"num_experts={self.num_experts}"
                    )
                if self.num_shared_experts < 0:
                    raise ConfigError("num_shared_experts must be >= 0")
                if self.shared_expert_intermediate_size is not None:
                    positive("shared_expert_intermediate_size")
                if self.capacity_factor <= 0:
                    raise ConfigError(f"capacity_factor must be > 0, got {self.capacity_factor}")
                if self.router_aux_loss_coef < 0 or self.router_z_loss_coef < 0:
                    raise ConfigError("router loss coefficients must be >= 0")
                positive("router_groups", "router_topk_groups")
                groups, size = self.router_groups, self.num_experts // self.router_groups
                if groups > 1 and (self.num_experts % groups or size < 2):
                    raise ConfigError(
                        f"router_groups={groups} must divide num_experts={self.num_experts} into groups "
                        "of at least 2 experts (a group is ranked by its top two scores)"
                    )
                if self.router_topk_groups > groups:
                    raise ConfigError(
                        f"router_topk_groups={self.router_topk_groups} exceeds router_groups={groups}"
                    )
                if self.num_experts_per_tok > self.router_topk_groups * size:
                    raise ConfigError(
                        f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of the "
                        f"{self.router_topk_groups} eligible group(s) ({self.router_topk_groups * size})"
                    )
                if self.routed_scaling_factor <= 0:
                    raise ConfigError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")

    # ------------------------------------------------------------------------------- derived
    @property
    def blocks(self) -> list[str]:
        """The layout expanded into blocks, e.g. ['AMF', 'MF', ...]."""
        return list(self._blocks)

    @property
    def layer_types(self) -> list[str]:
        """One letter per layer, in order."""
        return list("".join(self._blocks))

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def mamba_intermediate_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels through the conv: x plus B and C of every group."""
        return self.mamba_intermediate_size + 2 * self.mamba_n_groups * self.mamba_state_size

    @property
    def shared_intermediate_size(self) -> int:
        return self.shared_expert_intermediate_size or self.expert_intermediate_size

    # ------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["time_step_limit"] = list(self.time_step_limit)
        out["model_type"] = "turbos"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurboSConfig:
        """A validated config from a dict of its fields; ``model_type`` and the Hugging Face
        bookkeeping keys (``HF_BOOKKEEPING_KEYS``) are ignored, any other unknown key refused."""
        data = {k: v for k, v in data.items() if k != "model_type" and k not in HF_BOOKKEEPING_KEYS}
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        limit = data.get("time_step_limit")
        if limit is not None:
            data["time_step_limit"] = tuple(math.inf if v is None else float(v) for v in limit)
        return cls(**data)

    def replace(self, **changes: Any) -> TurboSConfig:
        """A validated copy with some fields changed."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_json_string(self) -> str:
        data = self.to_dict()
        data["time_step_limit"] = [None if math.isinf(v) else v for v in self.time_step_limit]
        return json.dumps(data, indent=2) + "\n"

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` atomically (temporary name, then rename)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json_string())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> TurboSConfig:
        """Read ``config.json`` from a directory (or a JSON file path)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # not UTF-8, or not JSON
            raise DamagedFileError(path, err) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:  # a wrong type, or a value out of range
            raise ConfigError(f"{path}: {err}") from None
