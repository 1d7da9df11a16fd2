"""GRPO end to end on tiny random models: rollout log-probabilities against the trainer's, live
weights in the engine, a run whose reward must rise, exact resume, dynamic sampling, prompt
filtering, the recipe and the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from serve_helpers import save_model_dir, tiny_model, tiny_tokenizer
from turbos.cli import main
from turbos.config import ConfigError
from turbos.data.tasks import generate_problems
from turbos.model import TurboSForCausalLM
from turbos.rl import GRPORecipe, run_grpo
from turbos.rl.rollout import pack_samples, rollout_groups, token_logprobs
from turbos.rl.trainer import RolloutSource
from turbos.serve import LLMEngine
from turbos.serve.chat_template import THINK_ID


def digits(prompts, completions, **meta) -> list[float]:
    """A reward a random model can learn in seconds: the share of digits in the reply."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("rl") / "base")


def _recipe(base: Path, out: Path, **changes) -> GRPORecipe:
    settings = dict(
        model=str(base),
        output_dir=str(out),
        prompts={"problems": 16, "levels": [1, 2]},
        group_size=4,
        prompts_per_rollout=4,
        steps=6,
        max_tokens=8,
        lr=1e-2,
        filter_prompts=False,
        adaptive={"enabled": False},
        success=0.5,
        device="cpu",
    )
    return GRPORecipe.from_dict({**settings, **changes})


def _trained_logprobs(samples) -> list[float]:
    records = [s.state() for s in samples]
    _, order = pack_samples(records, 256)
    out = []
    for i in order:
        out += [v for v, keep in zip(records[i]["logprobs"], records[i]["trained"], strict=True) if keep]
    return out


def _recomputed(model, samples) -> torch.Tensor:
    chat, _ = pack_samples([s.state() for s in samples], 256)
    with torch.no_grad():
        return token_logprobs(model, chat)[0]


def test_engine_logprobs_equal_the_trainers_for_the_same_tokens_and_follow_the_live_weights() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.get_vocab_size())
    engine = LLMEngine(model, tokenizer, max_running=16, seed=0)
    problems = generate_problems(4, families=["add"], levels=[1, 2], seed=0)
    groups = rollout_groups(engine, problems, [0, 1, 2, 3], 3, 1, 16, 1.0, "t")
    samples = [s for g in groups for s in g]
    assert [s.mode for s in groups[0]] == ["auto"] * 3 + ["think", "no_think"]
    think, short = groups[0][3], groups[0][4]
    assert think.completion_ids[0] == THINK_ID and not think.trained[0] and all(think.trained[1:])
    assert short.completion_ids[0] != THINK_ID and not short.trained[0]
    engine_lp = torch.tensor(_trained_logprobs(samples))
    gap = (_recomputed(model, samples) - engine_lp).abs().max().item()
    assert gap <= 1e-4, f"train/rollout log-probabilities differ by {gap:.2e} (fp32)"

    with torch.no_grad():  # what an optimizer step does: the parameters change in place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    again = [s for g in rollout_groups(engine, problems, [0, 1, 2, 3], 3, 1, 16, 1.0, "t") for s in g]
    new_lp = torch.tensor(_trained_logprobs(again))
    assert (_recomputed(model, again) - new_lp).abs().max().item() <= 1e-4, (
        "the engine samples the new weights"
    )
    assert [s.completion_ids for s in again] != [s.completion_ids for s in samples]


def test_a_grpo_run_raises_the_reward(base, tmp_path) -> None:
    recipe = _recipe(base, tmp_path / "grpo", steps=30, prompts_per_rollout=8, group_size=8, max_tokens=12)
    summary = run_grpo(recipe, reward_fn=digits, progress=False)
    records = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    assert len(records) == 30 and len(rewards) == 15, "one rollout per updates_per_rollout=2 steps"
    assert rewards[0] < 0.15 and sum(rewards[-3:]) / 3 > 0.5, rewards
    first = records[0]
    assert first["logprob_gap"] <= 1e-4 and first["clip_fraction"] == 0.0, "on-policy at the first update"
    assert any(r["clip_fraction"] > 0 for r in records[1::2]), "the second update is off-policy: clips act"
    assert all(r["kl"] >= 0 for r in records) and records[-1]["kl"] > 0
    for key in ("rollout_s", "reference_s", "update_s", "rollout_tokens_per_s", "entropy", "groups_dropped"):
        assert key in first, key
    TurboSForCausalLM.from_pretrained(summary["model_dir"])  # servable


def test_stopped_and_resumed_grpo_matches_a_straight_run_bit_for_bit(base, tmp_path) -> None:
    straight = run_grpo(_recipe(base, tmp_path / "straight"), reward_fn=digits, progress=False)
    recipe = _recipe(base, tmp_path / "resumed")
    stopped = run_grpo(recipe, reward_fn=digits, progress=False, stop_at=3)  # mid-rollout
    assert stopped["stopped_at"] == 3
    state = json.loads(
        (tmp_path / "resumed" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text()
    )
    assert len(state["data"]["pending"]) == 1, "the rollout's second update is kept for the resume"
    torch.manual_seed(123)
    resumed = run_grpo(recipe, reward_fn=digits, progress=False, resume="auto")
    expected = TurboSForCausalLM.from_pretrained(straight["model_dir"]).state_dict()
    got = TurboSForCausalLM.from_pretrained(resumed["model_dir"]).state_dict()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    strip = ("tokens_per_s", "rollout_s", "reference_s", "update_s", "rollout_tokens_per_s")

    def records(name: str) -> list[dict]:
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in strip} for r in rows]

    assert records("resumed") == records("straight")


def _source(base: Path, recipe: GRPORecipe, reward) -> RolloutSource:
    model = TurboSForCausalLM.from_pretrained(base)
    engine = LLMEngine(model, tiny_tokenizer(), max_running=64, seed=0)
    from turbos.rl.trainer import load_prompts

    return RolloutSource(engine, None, load_prompts(recipe), reward, recipe, write=lambda _: None)


def test_dynamic_sampling_drops_groups_without_signal_and_refills(base, tmp_path) -> None:
    seen_levels: list[list[int]] = []

    def level_one_is_constant(prompts, completions, **meta) -> list[float]:
        seen_levels.append(meta["level"])
        return [
            1.0 if level == 1 else float(len(c)) for level, c in zip(meta["level"], completions, strict=True)
        ]

    recipe = _recipe(base, tmp_path / "x", prompts_per_rollout=6, max_refills=10, kl_coef=0)
    source = _source(base, recipe, level_one_is_constant)
    source.rollout()
    stats = source.take_stats()
    level_one_groups = sum(levels.count(1) for levels in seen_levels) // recipe.group_size
    assert stats["groups_dropped"] == level_one_groups > 0
    assert stats["groups"] == 6 and stats["refill_rounds"] == len(seen_levels) - 1 >= 1
    trained = [s for micro in source.pending for s in micro["samples"]]
    assert len(trained) == 6 * recipe.group_size and all(s["advantage"] != 0 for s in trained[:1])


def test_the_prompt_filter_drops_prompts_always_or_never_solved(base, tmp_path) -> None:
    def by_level(prompts, completions, **meta) -> list[float]:
        return [
            {1: 1.0, 2: float(len(c) % 2), 3: 0.0}[level]
            for level, c in zip(meta["level"], completions, strict=True)
        ]

    recipe = _recipe(base, tmp_path / "x", prompts={"problems": 12, "levels": [1, 2, 3]}, filter_prompts=True)
    source = _source(base, recipe, by_level)
    source.filter_prompts()
    levels = [source.problems[i].level for i in source.kept]
    assert levels and set(levels) == {2}
    assert source.filter_stats["always_solved"] == 4 and source.filter_stats["never_solved"] == 4


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 5}, "multiple of updates_per_rollout"),
        ({"group_size": 1}, "group_size"),
        ({"kl_cof": 0.1}, "unknown key 'kl_cof'"),
        ({"adaptive": {"probes": -1}}, "adaptive.probes"),
        ({"min_lr": 1.0}, "exceeds lr"),
    ],
)
def test_recipe_values_are_checked(base, tmp_path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _recipe(base, tmp_path, **changes)


def test_a_bad_reward_is_a_clear_error(base, tmp_path) -> None:
    with pytest.raises(ValueError, match="expected builtin:NAME"):
        run_grpo(_recipe(base, tmp_path / "a", reward="nonsense"), progress=False)
    with pytest.raises(ValueError, match="expected 16 numbers"):
        run_grpo(_recipe(base, tmp_path / "b"), reward_fn=lambda p, c, **m: [1.0], progress=False)


def test_grpo_cli_runs_a_recipe_and_a_finished_run_is_kept(base, tmp_path, capsys) -> None:
    path = tmp_path / "grpo.yaml"
    raw = asdict(_recipe(base, tmp_path / "cli"))
    raw.update(reward="builtin:correct", adaptive={"enabled": True, "probes": 1}, prompts={"problems": 8})
    path.write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    assert main(["grpo", "--recipe", str(path), "steps=2", "--no-progress"]) == 0
    assert (tmp_path / "cli" / "model" / "model.safetensors").is_file()
    records = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert "think/accuracy" in records[0] and "auto/L1/think_rate" in records[0]
    assert main(["grpo", "--recipe", str(path), "steps=2", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_code_prompts_join_the_pool_and_are_scored_by_their_rule_in_the_sandbox(base, tmp_path) -> None:
    from turbos.rl.trainer import build_reward, load_prompts

    prompts = {"problems": 8, "families": ["add", "code"], "levels": [1, 2]}
    recipe = _recipe(base, tmp_path, prompts=prompts, reward="builtin:correct")
    problems = load_prompts(recipe)
    code = [p for p in problems if p.family == "code"]
    assert len(code) == 4 and len(problems) == 8 and all("assert " in p.answer for p in code)
    from turbos.data.tasks.code import generate_code_problems

    solution = {
        c.question: c.solution for c in generate_code_problems(4, levels=(1, 2), seed=recipe.seed + 3)
    }
    add = next(p for p in problems if p.family == "add")
    contents = [f"```python\n{solution[p.question]}```" for p in code] + [
        f"Answer: {add.answer}",
        "Answer: -1",
    ]
    rows = [*code, add, add]
    reward = build_reward(recipe)
    scores = reward(
        [p.question for p in rows],
        contents,
        content=contents,
        answer=[p.answer for p in rows],
        family=[p.family for p in rows],
    )
    assert scores == [1.0] * 5 + [0.0]


def test_stage_two_pools_share_families_and_score_instructions_by_their_checkers(base, tmp_path) -> None:
    from turbos.rl.trainer import build_reward, load_prompts, pool_counts

    shares = {"instructions": 0.9, "add": 0.05, "expr": 0.05}
    assert pool_counts(256, ["instructions", "add", "expr"], shares) == {
        "instructions": 231,
        "add": 13,
        "expr": 12,
    }
    assert pool_counts(5, ["add", "expr"], {}) == {"add": 3, "expr": 2}
    with pytest.raises(ValueError, match="not in prompts.families"):
        pool_counts(8, ["add"], {"code": 1.0})
    prompts = {"problems": 10, "families": ["instructions", "add"], "shares": {"instructions": 4, "add": 1}}
    recipe = _recipe(base, tmp_path, prompts=prompts, reward="builtin:correct")
    problems = load_prompts(recipe)
    ifs = [p for p in problems if p.family == "instructions"]
    assert len(ifs) == 8 and len(problems) == 10
    test_split = {p.question for p in load_prompts(recipe, split="test") if p.family == "instructions"}
    assert not test_split & {p.question for p in ifs}, "held-out instruction prompts never train"
    inst = ifs[0]
    constraints = json.loads(inst.answer)
    reward = build_reward(recipe)
    scores = reward(
        [inst.question],
        ["whatever"],
        content=["whatever"],
        answer=[inst.answer],
        family=["instructions"],
        constraints=[constraints],
    )
    from turbos.rl.instructions import check_all, constraint_from_dict

    met = check_all("whatever", [constraint_from_dict(c) for c in constraints])
    assert scores == [sum(met) / len(met)]
