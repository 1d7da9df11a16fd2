"""The GRPO recipe: what ``turbos grpo --recipe FILE [key=value ...]`` runs, every field checked
by the settings parser of the pre-training and SFT recipes (``turbos.settings``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from turbos.config import ConfigError
from turbos.distributed.parallel import ParallelConfig
from turbos.rl.losses import GRPOLossConfig
from turbos.rl.rewards import AdaptiveShaping
from turbos.settings import apply_overrides, check_settings, parse_settings, read_yaml, setting


@dataclass
class GRPOPrompts:
    """The prompts: built-in problems of the train split, or a JSONL file of
    ``{"question", "answer"[, "level", "family", "id"]}`` records (``path``)."""

    families: tuple[str, ...] = setting(("add", "expr"), nonempty=True)
    """Built-in families (``turbos.data.tasks``), ``code`` (``turbos.data.tasks.code``, levels 1-5)
    and ``instructions`` (``turbos.rl.instructions``), the last two scored by ``reward_rules``."""
    levels: tuple[int, ...] = setting((1, 2, 3, 4), nonempty=True)
    problems: int = setting(256, gt=0)
    """Built-in problems in the pool (before filtering)."""
    shares: dict[str, float] = field(default_factory=dict)
    """Relative share of the pool per family (``{instructions: 9, add: 0.5, expr: 0.5}``); empty:
    even shares."""
    path: str | None = None
    """A user JSONL file of problems instead of the built-in ones."""


@dataclass
class GRPOAdaptive:
    """Adaptive-CoT RL (report §3.2.2; ``turbos.rl.rewards``)."""

    enabled: bool = True
    probes: int = setting(2, ge=0)
    """Forced samples of each depth (long, short) per prompt, besides the free ones; their
    correctness joins the free samples' in judging the prompt's difficulty."""
    depth_bonus: float = setting(0.5, ge=0)
    compression: float = setting(0.2, ge=0)
    margin: float = setting(0.0, ge=0, le=1)

    def shaping(self) -> AdaptiveShaping:
        return AdaptiveShaping(self.depth_bonus, self.compression, self.margin)


@dataclass
class GRPORecipe:
    """A GRPO run. ``model``: a directory with config.json, model.safetensors and tokenizer files
    (an SFT output); the frozen reference model is the same weights."""

    model: str
    output_dir: str
    prompts: GRPOPrompts = field(default_factory=GRPOPrompts)
    reward: str = "builtin:correct"
    """``builtin:NAME`` or ``package.module:function`` (``turbos.rl.rewards``)."""
    reward_rules: dict[str, str] = field(
        default_factory=lambda: {"code": "builtin:code", "instructions": "builtin:instructions"}
    )
    """Per-domain rules: the reward of the samples whose family is a key (``turbos.rl.aggregate``)."""
    repetition_penalty: float = setting(0.0, ge=0)
    """Subtracted times the reply's repeated 4-gram rate (``turbos.rl.aggregate``)."""
    success: float = 1.0
    """A reward at least this counts as a correct response (group adjustment, accuracy, shaping)."""
    adaptive: GRPOAdaptive = field(default_factory=GRPOAdaptive)
    group_size: int = setting(8, ge=2)
    """Free samples per prompt (G)."""
    prompts_per_rollout: int = setting(16, gt=0)
    updates_per_rollout: int = setting(2, gt=0)
    """Optimizer steps per rollout, each on its share of the samples (after the first the policy
    is off the sampling policy and the clipped ratio acts)."""
    micro_batches: int = setting(1, gt=0)
    """Gradient-accumulation micro-batches per optimizer step."""
    steps: int = setting(40, gt=0)
    """Optimizer steps (a multiple of ``updates_per_rollout``)."""
    max_tokens: int = setting(160, gt=0)
    temperature: float = setting(1.0, gt=0)
    filter_prompts: bool = True
    """The pre-pass: drop prompts the starting policy always or never solves in one group."""
    max_refills: int = setting(2, ge=0)
    """Dynamic sampling: rounds of new prompts drawn to replace groups with all-zero advantages."""
    lr: float = setting(1e-4, gt=0)
    min_lr: float | None = setting(None, gt=0)
    """Where a cosine decay ends; None: a constant LR after warm-up."""
    warmup_steps: int = setting(0, ge=0)
    weight_decay: float = setting(0.0, ge=0)
    betas: tuple[float, float] = setting((0.9, 0.99), ge=0, lt=1)
    grad_clip: float = setting(1.0, ge=0)
    expert_lr: Literal["sqrt", "linear", "none"] = "sqrt"
    eps_low: float = setting(0.2, ge=0, lt=1)
    eps_high: float = setting(0.28, ge=0)
    kl_coef: float = setting(0.001, ge=0)
    """The K3 KL coefficient (Stage I: small)."""
    kl_max: float = setting(10.0, gt=0)
    nll_coef: float = setting(0.05, ge=0)
    """The best-of-N likelihood loss on positive-advantage samples."""
    pack_len: int = setting(1024, gt=0)
    """Tokens per packed row of the update."""
    max_running: int = setting(128, gt=0)
    """The engine's batch of sequences in flight."""
    checkpoint_interval: int = setting(0, ge=0)
    keep_last: int = setting(1, ge=0)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Under torchrun: FSDP2 over the ranks, which share each rollout's prompts and each
    micro-batch's samples (``turbos.rl.trainer``)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_settings(self, "grpo recipe")
        if self.steps % self.updates_per_rollout:
            raise ConfigError(
                f"grpo recipe: steps={self.steps} must be a multiple of "
                f"updates_per_rollout={self.updates_per_rollout}"
            )
        if self.warmup_steps >= self.steps:
            raise ConfigError(f"grpo recipe: warmup_steps must be in [0, steps={self.steps})")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"grpo recipe: min_lr={self.min_lr} exceeds lr={self.lr}")

    @property
    def loss(self) -> GRPOLossConfig:
        return GRPOLossConfig(self.eps_low, self.eps_high, self.kl_coef, self.kl_max, self.nll_coef)

    @property
    def probes(self) -> int:
        return self.adaptive.probes if self.adaptive.enabled else 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GRPORecipe:
        return parse_settings(cls, raw, "grpo recipe")

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> GRPORecipe:
        """A YAML recipe file, with ``key=value`` overrides (values read as YAML) applied."""
        return cls.from_dict(apply_overrides(read_yaml(path, "recipe"), overrides))
