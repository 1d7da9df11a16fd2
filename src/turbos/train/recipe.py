"""Training recipes: a YAML file parsed into a validated `Recipe` (report §2.1, §2.3, §2.4).

A recipe names a model preset, the data, the optimizer, the LR schedule and a list of *stages*
run in order. Stages carry the long-context curriculum: each may change the sequence length, the
NTK RoPE alpha, the LR policy and the short:long data ratio (report: 4K -> 32K with alpha 50 ->
256K with alpha 1000 at a constant 5e-6, short:long 3:1). ``apply_overrides`` changes any field
from the command line with dotted keys, e.g. ``optimizer.lr=1e-3`` or ``stages.0.steps=20``.

Fields are parsed by ``turbos.settings`` (types and declared ranges), so every error names the
offending key: unknown keys list the valid ones, wrong types say what was expected, values out of
range give the range; ``validate_recipe`` adds the checks that relate several fields and says why
an impossible stage is impossible.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from turbos.config import ConfigError, TurboSConfig
from turbos.distributed.parallel import ParallelConfig
from turbos.presets import get_preset
from turbos.settings import SettingsError, apply_overrides, parse_settings, read_yaml, setting


class RecipeError(SettingsError):
    """A recipe value is missing, unknown, of the wrong type, or impossible."""


@dataclass
class ModelSpec:
    preset: str = "tiny"
    """A name from turbos.presets."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """TurboSConfig fields changed from the preset."""


@dataclass
class TokenizerSpec:
    """Either `path` (a directory with tokenizer.json) or `vocab_size` (train one on the data)."""

    path: str | None = None
    vocab_size: int | None = setting(None, gt=0)
    """Train a byte-level BPE of this many tokens on the training sources; the model's vocab_size
    follows it unless model.overrides sets one."""
    max_documents: int | None = setting(None, gt=0)
    """Train the tokenizer on at most this many documents (None: all of them)."""


@dataclass
class DataSpec:
    sources: Any = None
    """Source spec(s) of turbos.data.corpora: a spec string, a {source, ...} mapping, or a list of
    them (a weighted mixture, `weight` key)."""
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    seq_len: int = setting(4096, gt=0)
    """Tokens per training sequence of the first stage (report: 4,096)."""
    batch_size: int = setting(8, gt=0)
    """Sequences per micro-batch."""
    grad_accum: int = setting(1, gt=0)
    """Micro-batches per optimizer step."""
    val_fraction: float = setting(0.01, gt=0, lt=1)
    """Share of the documents held out for validation."""
    reset_at_eos: bool = False
    """Each document in a packed row sees only itself: attention, Mamba2 state and positions
    restart after every EOS (``seq_idx``). Off: rows are read as one text, across documents."""


@dataclass
class OptimizerSpec:
    """AdamW (report §2.3: beta1 0.9, beta2 0.95, weight decay 0.1)."""

    lr: float = setting(3e-4, gt=0)
    """Peak (stable-phase) learning rate. The report does not give it."""
    beta1: float = setting(0.9, ge=0, lt=1)
    beta2: float = setting(0.95, ge=0, lt=1)
    weight_decay: float = setting(0.1, ge=0)
    eps: float = setting(1e-8, gt=0)
    grad_clip: float = setting(1.0, ge=0)
    """Max global grad norm; 0 disables clipping."""
    decay_embeddings: bool = False
    """Apply weight decay to the token embeddings too."""


@dataclass
class ScheduleSpec:
    warmup_steps: int = setting(0, ge=0)
    """Linear warm-up from 0 at the start of the first stage."""
    min_lr: float = setting(5e-6, gt=0)
    """Where a cosine (annealing) stage ends (report: 5e-6)."""


@dataclass
class StageSpec:
    """One stage of training; stages run in order on one global step counter."""

    name: str = ""
    seq_len: int | None = setting(None, gt=0)
    """Tokens per sequence (default data.seq_len)."""
    steps: int | None = setting(None, gt=0)
    """Optimizer steps; give this or `tokens`."""
    tokens: int | None = setting(None, gt=0)
    """Token budget, turned into steps at this stage's tokens per step."""
    rope_alpha: float = setting(1.0, ge=1)
    """NTK-aware RoPE alpha for this stage (report: 50 at 32K, 1000 at 256K); 1 is plain RoPE."""
    lr_policy: Literal["constant", "cosine"] = "constant"
    """'constant': hold `lr` (default optimizer.lr; the stable phase of WSD). 'cosine': decay from
    the LR the previous stage ended at to `lr` (default schedule.min_lr; the annealing stage)."""
    lr: float | None = setting(None, gt=0)
    batch_size: int | None = setting(None, gt=0)
    """Sequences per micro-batch (default data.batch_size)."""
    grad_accum: int | None = setting(None, gt=0)
    """Micro-batches per step (default data.grad_accum)."""
    sources: Any = None
    """This stage's source spec(s) in place of data.sources (e.g. the annealing mix, report §2.3)."""
    long_sources: Any = None
    """Long-document source spec(s) mixed into this stage."""
    short_long_ratio: list[float] | None = setting(None, gt=0)
    """[short, long] document weights of the stage's sources vs long_sources (report: [3, 1])."""


@dataclass
class MoESpec:
    aux_loss_coef: float | None = setting(None, ge=0)
    """Load-balancing loss weight (None: the preset's router_aux_loss_coef)."""
    capacity_factor: float | None = setting(None, gt=0)
    """Training expert capacity factor (None: the preset's; report: 1.5)."""
    expert_lr: Literal["sqrt", "linear", "none"] = "sqrt"
    """Routed-expert LR rule, see turbos.train.optim.expert_lr_scale."""


@dataclass
class EvalSpec:
    interval: int = setting(100, ge=0)
    """Validate every this many steps (and at step 0 and at the end); 0 disables."""
    batches: int = setting(8, gt=0)
    """Validation batches per evaluation."""


@dataclass
class CheckpointSpec:
    interval: int = setting(1000, gt=0)
    """Save every this many steps (and always at the end)."""
    keep_last: int = setting(3, ge=0)
    """Checkpoints kept; older ones are deleted. 0 keeps all."""


@dataclass
class Recipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    stages: list[StageSpec] = field(default_factory=list)
    moe: MoESpec = field(default_factory=MoESpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How training spreads over torchrun's ranks (``turbos.distributed``); a single process
    ignores it but for activation checkpointing."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto': fp32 on CPU, bf16 autocast on CUDA. 'bf16' also autocasts on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    output_dir: str = "runs/default"

    def model_config(self) -> TurboSConfig:
        """The network's config: preset + overrides, the tokenizer's vocab and the MoE settings."""
        changes = dict(self.model.overrides)
        if self.data.tokenizer.vocab_size is not None:
            changes.setdefault("vocab_size", self.data.tokenizer.vocab_size)
        if self.moe.aux_loss_coef is not None:
            changes["router_aux_loss_coef"] = self.moe.aux_loss_coef
        if self.moe.capacity_factor is not None:
            changes["capacity_factor"] = self.moe.capacity_factor
        return get_preset(self.model.preset, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from a plain dict."""
    try:
        recipe = parse_settings(Recipe, raw)
    except SettingsError as err:
        raise RecipeError(str(err)) from err
    validate_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted-key overrides (``stages.0.steps=20``), validate."""
    try:
        raw = apply_overrides(read_yaml(path, "recipe"), overrides or [])
    except SettingsError as err:
        raise RecipeError(str(err)) from err
    return parse_recipe(raw)


def validate_recipe(recipe: Recipe) -> None:
    """Raise RecipeError for what the field ranges cannot say: the required sources and tokenizer,
    min_lr against lr, the model config and the stage curriculum."""
    data, opt, tok = recipe.data, recipe.optimizer, recipe.data.tokenizer
    if data.sources is None:
        raise RecipeError("data.sources is required: a source spec string or a list of them")
    _check_sources(data.sources, "data.sources")
    if (tok.path is None) == (tok.vocab_size is None):
        raise RecipeError("data.tokenizer needs exactly one of 'path' (load) and 'vocab_size' (train)")
    if recipe.schedule.min_lr > opt.lr:
        raise RecipeError(
            f"schedule.min_lr={recipe.schedule.min_lr} exceeds optimizer.lr={opt.lr}: "
            "a cosine stage would raise the LR instead of annealing it"
        )
    try:
        config = recipe.model_config()
    except ConfigError as err:
        raise RecipeError(f"model: {err}") from err
    _validate_stages(recipe, config)


def _check_sources(sources: Any, where: str) -> None:
    """A source spec string, a {source, ...} mapping, or a non-empty list of them."""
    entries = sources if isinstance(sources, list) else [sources]
    if not entries or not all(isinstance(entry, (str, dict)) for entry in entries):
        raise RecipeError(
            f"{where}: expected a source spec string, a {{source, ...}} mapping or a non-empty list "
            f"of them, got {sources!r}"
        )


def _validate_stages(recipe: Recipe, config: TurboSConfig) -> None:
    stages = recipe.stages
    if not stages:
        raise RecipeError("stages: give at least one stage (name, steps or tokens, seq_len)")
    names = [stage.name for stage in stages]
    if "" in names or len(set(names)) != len(names):
        raise RecipeError(f"stages need distinct, non-empty names, got {names}")
    prev_len, prev_alpha = 0, 1.0
    for i, stage in enumerate(stages):
        where = f"stages[{i}] ({stage.name!r})"
        if (stage.steps is None) == (stage.tokens is None):
            raise RecipeError(f"{where}: give exactly one of 'steps' and 'tokens'")
        seq_len = stage.seq_len or recipe.data.seq_len
        if seq_len > config.max_position_embeddings:
            raise RecipeError(
                f"{where}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings} (raise it in model.overrides)"
            )
        if seq_len < prev_len or stage.rope_alpha < prev_alpha:
            raise RecipeError(
                f"{where}: stages out of order: seq_len and rope_alpha must not decrease "
                f"(previous stage: seq_len {prev_len}, alpha {prev_alpha})"
            )
        prev_len, prev_alpha = seq_len, stage.rope_alpha
        for name in ("sources", "long_sources"):
            if getattr(stage, name) is not None:
                _check_sources(getattr(stage, name), f"{where}.{name}")
        ratio = stage.short_long_ratio
        if (ratio is None) != (stage.long_sources is None):
            raise RecipeError(f"{where}: long_sources and short_long_ratio go together")
        if ratio is not None and len(ratio) != 2:
            raise RecipeError(f"{where}: short_long_ratio must be two positive weights, got {ratio}")
    plans = plan_stages(recipe)
    if recipe.schedule.warmup_steps > plans[0].steps:
        raise RecipeError(
            f"schedule.warmup_steps={recipe.schedule.warmup_steps} is longer than the first "
            f"stage ({plans[0].steps} steps)"
        )


@dataclass(frozen=True)
class StagePlan:
    """A stage resolved to numbers: where it sits on the global step counter and what it runs."""

    index: int
    name: str
    start: int
    """Global step at which the stage begins (steps already done before it)."""
    steps: int
    seq_len: int
    batch_size: int
    grad_accum: int
    rope_alpha: float
    lr_policy: str
    lr: float
    """Constant LR, or the end value of a cosine stage."""
    data_parallel: int = 1
    """Ranks that each run ``grad_accum`` micro-batches of ``batch_size`` rows per step."""

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum * self.data_parallel


def plan_stages(recipe: Recipe, data_parallel: int = 1) -> list[StagePlan]:
    """Resolve defaults and token budgets: a `tokens` budget becomes ceil(tokens / tokens per step),
    a step taking ``grad_accum`` micro-batches on each of ``data_parallel`` ranks."""
    plans, start = [], 0
    for i, stage in enumerate(recipe.stages):
        seq_len = stage.seq_len or recipe.data.seq_len
        batch_size = stage.batch_size or recipe.data.batch_size
        grad_accum = stage.grad_accum or recipe.data.grad_accum
        steps = stage.steps or math.ceil(stage.tokens / (seq_len * batch_size * grad_accum * data_parallel))
        default_lr = recipe.optimizer.lr if stage.lr_policy == "constant" else recipe.schedule.min_lr
        plans.append(
            StagePlan(
                index=i,
                name=stage.name,
                start=start,
                steps=steps,
                seq_len=seq_len,
                batch_size=batch_size,
                grad_accum=grad_accum,
                rope_alpha=stage.rope_alpha,
                lr_policy=stage.lr_policy,
                lr=stage.lr if stage.lr is not None else default_lr,
                data_parallel=data_parallel,
            )
        )
        start += steps
    return plans
