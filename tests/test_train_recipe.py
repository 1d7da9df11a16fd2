"""Recipes: the shipped YAML files, dotted-key overrides, and the errors for impossible values."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from turbos.settings import apply_overrides
from turbos.train.recipe import RecipeError, load_recipe, parse_recipe, plan_stages

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

BASE = {
    "model": {"preset": "tiny"},
    "data": {
        "sources": "builtin:reasoning",
        "tokenizer": {"vocab_size": 512},
        "seq_len": 64,
        "batch_size": 4,
    },
    "stages": [
        {"name": "pretrain", "steps": 10},
        {"name": "long", "steps": 5, "seq_len": 128, "rope_alpha": 4},
    ],
}


def recipe_dict(**sections) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(sections)
    return raw


@pytest.mark.parametrize("name", ["tiny", "small", "base-1b", "turbos-560b"])
def test_every_shipped_recipe_parses_and_validates(name: str) -> None:
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.model.preset == name
    assert plan_stages(recipe), "a recipe has at least one stage"


def test_turbos_560b_recipe_has_the_reports_numbers() -> None:
    recipe = load_recipe(RECIPES / "turbos-560b.yaml")
    opt = recipe.optimizer
    assert (opt.beta1, opt.beta2, opt.weight_decay) == (0.9, 0.95, 0.1), "report §2.3 AdamW settings"
    assert recipe.data.seq_len == 4096 and recipe.schedule.min_lr == 5e-6
    stages = {stage.name: stage for stage in recipe.stages}
    anneal = next(stage for stage in recipe.stages if stage.lr_policy == "cosine")
    assert anneal.tokens == 300e9, "annealing: 300B tokens (report §2.3)"
    long = [stage for stage in recipe.stages if stage.short_long_ratio]
    assert [(s.seq_len, s.rope_alpha, s.tokens, s.lr) for s in long] == [
        (32768, 50, 30e9, 5e-6),
        (262144, 1000, 20e9, 5e-6),
    ], "long-context curriculum of report §2.4"
    assert all(s.short_long_ratio == [3, 1] for s in long)
    assert len(stages) == len(recipe.stages)


def test_tiny_recipe_exercises_the_long_context_curriculum() -> None:
    plans = plan_stages(load_recipe(RECIPES / "tiny.yaml"))
    lengths = [plan.seq_len for plan in plans]
    alphas = [plan.rope_alpha for plan in plans]
    assert lengths[-1] >= 4 * lengths[0] and alphas[-1] > alphas[0] > 0, (lengths, alphas)


def test_overrides_set_nested_keys_list_items_and_parse_yaml_values() -> None:
    raw = apply_overrides(
        recipe_dict(), ["optimizer.lr=1e-3", "stages.1.steps=7", "model.overrides.hidden_size=64", "seed=3"]
    )
    recipe = parse_recipe(raw)
    assert recipe.optimizer.lr == 1e-3, "'1e-3' (a string to YAML 1.1) is read as a float"
    assert recipe.stages[1].steps == 7 and recipe.seed == 3
    assert recipe.model_config().hidden_size == 64


def test_tokens_budget_becomes_steps_at_the_stages_tokens_per_step() -> None:
    raw = apply_overrides(
        recipe_dict(), ["stages.1.steps=null", "stages.1.tokens=2560", "stages.1.batch_size=2"]
    )
    plans = plan_stages(parse_recipe(raw))
    assert plans[1].steps == 10, "2560 tokens / (128 tokens x 2 sequences) = 10 steps"
    assert plans[1].start == 10 and plans[1].end == 20


def test_unknown_key_is_named_with_the_valid_keys() -> None:
    with pytest.raises(
        RecipeError, match=r"unknown key 'optimizer\.lrr'; valid keys in 'optimizer': \['lr', 'beta1'"
    ):
        parse_recipe(apply_overrides(recipe_dict(), ["optimizer.lrr=0.1"]))
    with pytest.raises(RecipeError, match=r"unknown key 'stages\[0\]\.sequence'"):
        parse_recipe(apply_overrides(recipe_dict(), ["stages.0.sequence=4"]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=many", r"data\.batch_size: expected int"),
        ("optimizer.lr=[1]", r"optimizer\.lr: expected float"),
        ("seed=1.5", r"seed: expected int"),
        ("precision=fp16", r"precision: expected one of \['auto', 'fp32', 'bf16'\]"),
        ("optimizer.decay_embeddings=1", r"expected true or false"),
    ],
)
def test_wrong_types_are_rejected_with_the_key(override: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(apply_overrides(recipe_dict(), [override]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.1.seq_len=4096"], r"seq_len 4096 exceeds the model's max_position_embeddings 1024"),
        (["stages.0.steps=0"], r"stages\[0\]\.steps must be > 0, got 0"),
        (["stages.1.rope_alpha=0.5"], r"stages\[1\]\.rope_alpha must be >= 1, got 0\.5"),
        (["data.val_fraction=1"], r"data\.val_fraction must be in \(0, 1\), got 1\.0"),
        (["optimizer.beta2=1"], r"optimizer\.beta2 must be in \[0, 1\), got 1\.0"),
        (["stages.1.seq_len=32"], r"stages out of order"),
        (["stages.0.rope_alpha=8"], r"stages out of order"),
        (["stages.0.tokens=100"], r"exactly one of 'steps' and 'tokens'"),
        (["stages.1.name=pretrain"], r"distinct, non-empty names"),
        (["stages.1.short_long_ratio=[3, 1]"], r"long_sources and short_long_ratio go together"),
        (["schedule.warmup_steps=11"], r"warmup_steps=11 is longer than the first stage"),
        (["stages=[]"], r"at least one stage"),
        (
            ["data.tokenizer.path=tok"],
            r"data\.tokenizer needs exactly one of 'path' \(load\) and 'vocab_size'",
        ),
        (
            ["stages.1.short_long_ratio=[3, 0]", "stages.1.long_sources=builtin:reasoning"],
            r"short_long_ratio\[1\] must be > 0",
        ),
        (["model.overrides.num_experts=1"], r"model: num_experts_per_tok=2 \(top-k\) exceeds"),
        (["schedule.min_lr=1e-3"], r"schedule\.min_lr=0\.001 exceeds optimizer\.lr=0\.0003"),
        (["optimizer.grad_clip=-1"], r"optimizer\.grad_clip must be >= 0, got -1"),
        (["data.sources=5"], r"data\.sources: expected a source spec string, a \{source, \.\.\.\} mapping"),
        (["data.sources=[]"], r"data\.sources: .* or a non-empty list of them, got \[\]"),
        (["data.sources=[builtin:reasoning, 5]"], r"data\.sources: expected a source spec string"),
        (["stages.0.sources=5"], r"stages\[0\] \('pretrain'\)\.sources: expected a source spec string"),
    ],
)
def test_impossible_recipes_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe(apply_overrides(recipe_dict(), overrides))


def test_overrides_of_a_recipe_file_fail_as_recipe_errors(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert load_recipe(path, ["stages.1.steps=3"]).stages[1].steps == 3
    with pytest.raises(RecipeError, match=r"'stages\.5' needs an index below 2"):
        load_recipe(path, ["stages.5.steps=1"])


def test_missing_recipe_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_recipe_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(RecipeError, match=r"list\.yaml: a recipe must be a mapping of keys to values"):
        load_recipe(path)
