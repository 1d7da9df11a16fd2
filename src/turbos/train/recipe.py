"""Training recipes: a YAML file parsed into a validated `Recipe` (report §2.1, §2.3, §2.4).

A recipe names a model preset, the data, the optimizer, the LR schedule and a list of *stages*
run in order. Stages carry the long-context curriculum: each may change the sequence length, the
NTK RoPE alpha, the LR policy and the short:long data ratio (report: 4K -> 32K with alpha 50 ->
256K with alpha 1000 at a constant 5e-6, short:long 3:1). ``apply_overrides`` changes any field
from the command line with dotted keys, e.g. ``optimizer.lr=1e-3`` or ``stages.0.steps=20``.

Every error names the offending key: unknown keys list the valid ones, wrong types say what was
expected, impossible stages say why.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from turbos.config import ConfigError, TurboSConfig
from turbos.presets import get_preset


class RecipeError(ConfigError):
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
    vocab_size: int | None = None
    """Train a byte-level BPE of this many tokens on the training sources; the model's vocab_size
    follows it unless model.overrides sets one."""
    max_documents: int | None = None
    """Train the tokenizer on at most this many documents (None: all of them)."""


@dataclass
class DataSpec:
    sources: Any = None
    """Source spec(s) of turbos.data.corpora: a spec string, a {source, ...} mapping, or a list of
    them (a weighted mixture, `weight` key)."""
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    seq_len: int = 4096
    """Tokens per training sequence of the first stage (report: 4,096)."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    val_fraction: float = 0.01
    """Share of the documents held out for validation."""


@dataclass
class OptimizerSpec:
    """AdamW (report §2.3: beta1 0.9, beta2 0.95, weight decay 0.1)."""

    lr: float = 3e-4
    """Peak (stable-phase) learning rate. The report does not give it."""
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    decay_embeddings: bool = False
    """Apply weight decay to the token embeddings too."""


@dataclass
class ScheduleSpec:
    warmup_steps: int = 0
    """Linear warm-up from 0 at the start of the first stage."""
    min_lr: float = 5e-6
    """Where a cosine (annealing) stage ends (report: 5e-6)."""


@dataclass
class StageSpec:
    """One stage of training; stages run in order on one global step counter."""

    name: str = ""
    seq_len: int | None = None
    """Tokens per sequence (default data.seq_len)."""
    steps: int | None = None
    """Optimizer steps; give this or `tokens`."""
    tokens: int | None = None
    """Token budget, turned into steps at this stage's tokens per step."""
    rope_alpha: float = 1.0
    """NTK-aware RoPE alpha for this stage (report: 50 at 32K, 1000 at 256K)."""
    lr_policy: Literal["constant", "cosine"] = "constant"
    """'constant': hold `lr` (default optimizer.lr; the stable phase of WSD). 'cosine': decay from
    the LR the previous stage ended at to `lr` (default schedule.min_lr; the annealing stage)."""
    lr: float | None = None
    batch_size: int | None = None
    """Sequences per micro-batch (default data.batch_size)."""
    grad_accum: int | None = None
    """Micro-batches per step (default data.grad_accum)."""
    sources: Any = None
    """This stage's source spec(s) in place of data.sources (e.g. the annealing mix, report §2.3)."""
    long_sources: Any = None
    """Long-document source spec(s) mixed into this stage."""
    short_long_ratio: list[float] | None = None
    """[short, long] document weights of the stage's sources vs long_sources (report: [3, 1])."""


@dataclass
class MoESpec:
    aux_loss_coef: float | None = None
    """Load-balancing loss weight (None: the preset's router_aux_loss_coef)."""
    capacity_factor: float | None = None
    """Training expert capacity factor (None: the preset's; report: 1.5)."""
    expert_lr: Literal["sqrt", "linear", "none"] = "sqrt"
    """Routed-expert LR rule, see turbos.train.optim.expert_lr_scale."""


@dataclass
class EvalSpec:
    interval: int = 100
    """Validate every this many steps (and at step 0 and at the end); 0 disables."""
    batches: int = 8
    """Validation batches per evaluation."""


@dataclass
class CheckpointSpec:
    interval: int = 1000
    """Save every this many steps (and always at the end)."""
    keep_last: int = 3
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
# Parsing: dict -> dataclasses, with a checked type for every field
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def yaml_number(value: Any) -> float | None:
    """A YAML value as a number: YAML 1.1 reads '5e-6' (no dot) as a string, so accept that too."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except RecipeError as err:
                errors.append(err)
        raise (
            errors[0]
            if len(errors) == 1
            else RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        )
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, dataclasses.asdict(value) if isinstance(value, tp) else value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(item, arg, f"{where}[{i}]") for i, (item, arg) in enumerate(zip(value, args, strict=True))
        )
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {value!r}")
        return value
    number = yaml_number(value)
    if tp is float and number is not None and math.isfinite(number):
        return float(number)
    if tp is int and number is not None and math.isfinite(number) and float(number).is_integer():
        return int(number)
    raise RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise RecipeError(f"unknown key {key!r}; valid keys{f' in {where!r}' if where else ''}: {names}")
    values = {
        key: _coerce(value, hints[key], f"{where}.{key}" if where else key) for key, value in data.items()
    }
    return cls(**values)


def coerce_fields(instance: Any) -> None:
    """Check every field of a dataclass instance against its type hint, in place, as recipes are
    checked: numbers written as strings (YAML 1.1 reads ``1e-4`` as one) become numbers, and a
    value of the wrong type or a non-finite number is a RecipeError that names the field."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        setattr(instance, f.name, _coerce(getattr(instance, f.name), hints[f.name], f.name))


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation
# ----------------------------------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries in a raw recipe dict (values are parsed as YAML).

    List items are addressed by index (``stages.1.seq_len=256``). Keys are checked when the
    recipe is built, so a misspelt key fails there with the list of valid ones.
    """
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {item!r}: {here!r} needs an index below {len(node)}")
                part = int(part)
            elif not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:depth])!r} is not a section")
            if last:
                node[part] = yaml.safe_load(text)
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return raw


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    """Build and validate a Recipe from a plain dict."""
    recipe = _build(Recipe, raw, "")
    validate_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply dotted-key overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err
    return parse_recipe(apply_overrides(raw, overrides or []))


def _positive(value: float | None, where: str) -> None:
    if value is not None and value <= 0:
        raise RecipeError(f"{where} must be > 0, got {value}")


def validate_recipe(recipe: Recipe) -> None:
    """Raise RecipeError for values that cannot train: sizes, rates, and the stage curriculum."""
    data, opt, tok = recipe.data, recipe.optimizer, recipe.data.tokenizer
    if data.sources is None:
        raise RecipeError("data.sources is required: a source spec string or a list of them")
    _check_sources(data.sources, "data.sources")
    if (tok.path is None) == (tok.vocab_size is None):
        raise RecipeError("data.tokenizer needs exactly one of 'path' (load) and 'vocab_size' (train)")
    for name in ("seq_len", "batch_size", "grad_accum"):
        _positive(getattr(data, name), f"data.{name}")
    _positive(tok.vocab_size, "data.tokenizer.vocab_size")
    _positive(tok.max_documents, "data.tokenizer.max_documents")
    if not 0 < data.val_fraction < 1:
        raise RecipeError(f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    for name in ("lr", "eps"):
        _positive(getattr(opt, name), f"optimizer.{name}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(opt, name) < 1:
            raise RecipeError(f"optimizer.{name} must be in [0, 1), got {getattr(opt, name)}")
    for name in ("weight_decay", "grad_clip"):
        if getattr(opt, name) < 0:
            raise RecipeError(f"optimizer.{name} must be >= 0, got {getattr(opt, name)}")
    if recipe.schedule.warmup_steps < 0:
        raise RecipeError("schedule.warmup_steps must be >= 0")
    _positive(recipe.schedule.min_lr, "schedule.min_lr")
    if recipe.schedule.min_lr > opt.lr:
        raise RecipeError(
            f"schedule.min_lr={recipe.schedule.min_lr} exceeds optimizer.lr={opt.lr}: "
            "a cosine stage would raise the LR instead of annealing it"
        )
    if recipe.eval.interval < 0 or recipe.eval.batches <= 0:
        raise RecipeError("eval.interval must be >= 0 and eval.batches > 0")
    if recipe.checkpoint.interval <= 0 or recipe.checkpoint.keep_last < 0:
        raise RecipeError("checkpoint.interval must be > 0 and checkpoint.keep_last >= 0")
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
        if (stage.steps or stage.tokens or 0) <= 0:
            raise RecipeError(f"{where}: steps/tokens must be > 0")
        seq_len = stage.seq_len or recipe.data.seq_len
        _positive(seq_len, f"{where}.seq_len")
        if seq_len > config.max_position_embeddings:
            raise RecipeError(
                f"{where}: seq_len {seq_len} exceeds the model's max_position_embeddings "
                f"{config.max_position_embeddings} (raise it in model.overrides)"
            )
        if stage.rope_alpha < 1:
            raise RecipeError(f"{where}: rope_alpha must be >= 1 (1 is plain RoPE), got {stage.rope_alpha}")
        if seq_len < prev_len or stage.rope_alpha < prev_alpha:
            raise RecipeError(
                f"{where}: stages out of order: seq_len and rope_alpha must not decrease "
                f"(previous stage: seq_len {prev_len}, alpha {prev_alpha})"
            )
        prev_len, prev_alpha = seq_len, stage.rope_alpha
        for name in ("sources", "long_sources"):
            if getattr(stage, name) is not None:
                _check_sources(getattr(stage, name), f"{where}.{name}")
        _positive(stage.lr, f"{where}.lr")
        _positive(stage.batch_size, f"{where}.batch_size")
        _positive(stage.grad_accum, f"{where}.grad_accum")
        ratio = stage.short_long_ratio
        if (ratio is None) != (stage.long_sources is None):
            raise RecipeError(f"{where}: long_sources and short_long_ratio go together")
        if ratio is not None and (len(ratio) != 2 or min(ratio) <= 0):
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

    @property
    def end(self) -> int:
        return self.start + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def plan_stages(recipe: Recipe) -> list[StagePlan]:
    """Resolve defaults and token budgets: a `tokens` budget becomes ceil(tokens / tokens per step)."""
    plans, start = [], 0
    for i, stage in enumerate(recipe.stages):
        seq_len = stage.seq_len or recipe.data.seq_len
        batch_size = stage.batch_size or recipe.data.batch_size
        grad_accum = stage.grad_accum or recipe.data.grad_accum
        steps = stage.steps or math.ceil(stage.tokens / (seq_len * batch_size * grad_accum))
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
            )
        )
        start += steps
    return plans
