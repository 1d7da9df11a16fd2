"""GRPO under torchrun on CPU: two gloo ranks sharing each rollout's prompts and each micro-batch's
samples match one process.

The model has no router aux loss (that one is each rank's own) and the policy routes as at
inference (no expert capacity), so the split changes nothing but rounding. Three prompts a
rollout share unevenly over the ranks (2 + 1), and 4 micro-batches of a step's 6 samples hold
1 or 2 samples each, so rank 1 trains a stand-in batch on every other one. The sampled tokens,
rewards and advantages equal one process's exactly; the engine's log-probabilities differ by the
rounding of another batch mix (measured about 5e-7, as with another ``max_running`` in one
process), so losses and weights agree within 1e-5. The LR is small because Adam turns such
rounding in near-zero gradients into updates of up to the LR (at 1e-2 the weights differ by 3e-5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from dist_helpers import exported_weights, max_diff, run_ranks
from serve_helpers import tiny_model, tiny_tokenizer
from turbos.config import ConfigError
from turbos.data.tokenizer import save_tokenizer
from turbos.distributed.parallel import ParallelError
from turbos.rl import GRPORecipe, run_grpo
from turbos.serve.chat_template import save_chat_template
from turbos.train.metrics import read_metrics

TOL = 1e-5
ROLLOUT_FIELDS = ("reward", "auto/accuracy", "auto/tokens", "groups", "samples_trained", "rollout_tokens")
LOSS_FIELDS = ("loss", "pg_loss", "kl", "nll_loss", "clip_fraction", "entropy", "grad_norm")


def digits(prompts: list[str], completions: list[str], **meta: Any) -> list[float]:
    """The share of digits in the reply."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def _recipe(tmp_path: Path, out: str, **changes: Any) -> GRPORecipe:
    settings = dict(
        model=str(tmp_path / "base"),
        output_dir=str(tmp_path / out),
        prompts={"problems": 8, "levels": [1, 2]},
        group_size=4,
        prompts_per_rollout=3,
        steps=4,
        micro_batches=4,
        max_tokens=8,
        lr=1e-3,
        adaptive={"enabled": False},
        success=0.1,  # the filter keeps 4 of the 8 prompts
        device="cpu",
        checkpoint_interval=1,
        keep_last=0,
    )
    return GRPORecipe.from_dict({**settings, **changes})


def _two_ranks(tmp_path: Path) -> None:
    run_grpo(_recipe(tmp_path, "two"), reward_fn=digits, progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory, 4 GRPO steps on 2 ranks, then the same on one process."""
    tmp_path = tmp_path_factory.mktemp("grpo")
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer.get_vocab_size(), router_aux_loss_coef=0.0).save_pretrained(tmp_path / "base")
    save_tokenizer(tokenizer, tmp_path / "base")
    save_chat_template(tmp_path / "base")
    run_ranks(_two_ranks, 2, tmp_path)
    run_grpo(_recipe(tmp_path, "one"), reward_fn=digits, progress=False)
    return tmp_path


def _pending(run: Path, step: int) -> list[dict[str, Any]]:
    """The samples a checkpoint keeps for the rest of its rollout."""
    state = json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())
    return [s for micro in state["data"]["pending"] for s in micro["samples"]]


def test_two_ranks_sample_the_rollouts_of_one_process(runs: Path) -> None:
    two, one = runs / "two", runs / "one"
    filtered = [json.loads((run / "filter.json").read_text()) for run in (two, one)]
    assert [{k: v for k, v in f.items() if k != "seconds"} for f in filtered] == [
        {"pool": 8, "kept": 4, "always_solved": 0, "never_solved": 4}
    ] * 2, "the filter's pre-pass, shared by the ranks, keeps the same prompts"
    for mine, theirs in zip(read_metrics(two), read_metrics(one), strict=True):
        assert {k: mine.get(k) for k in ROLLOUT_FIELDS} == {k: theirs.get(k) for k in ROLLOUT_FIELDS}
    for step in (1, 3):  # mid-rollout: the second update's samples
        mine, theirs = _pending(two, step), _pending(one, step)
        assert len(mine) == 6
        for a, b in zip(mine, theirs, strict=True):
            assert a["completion_ids"] == b["completion_ids"] and a["advantage"] == b["advantage"]
            assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"], strict=True)) < TOL
            assert max(abs(x - y) for x, y in zip(a["ref_logprobs"], b["ref_logprobs"], strict=True)) < TOL


def test_two_ranks_match_one_process_losses_andexported_weights(runs: Path) -> None:
    two, one = runs / "two", runs / "one"
    assert (two / "checkpoints" / "step-00000002" / "dcp").is_dir(), "checkpoints are sharded"
    mine, theirs = read_metrics(two), read_metrics(one)
    assert [r["step"] for r in mine] == [1, 2, 3, 4], "rank 0 logs each step once"
    for a, b in zip(mine, theirs, strict=True):
        for key in LOSS_FIELDS:
            assert abs(a[key] - b[key]) < TOL, (a["step"], key, a[key], b[key])
        assert a["tokens"] == b["tokens"]
    summaries = [json.loads((run / "grpo_summary.json").read_text()) for run in (two, one)]
    assert summaries[0]["tokens"] == summaries[1]["tokens"]
    assert max_diff(exported_weights(two), exported_weights(one)) < TOL


def test_a_two_rank_checkpoint_resumes_on_one_process(runs: Path) -> None:
    checkpoint = runs / "two" / "checkpoints" / "step-00000001"  # mid-rollout
    resumed = run_grpo(_recipe(runs, "resumed"), reward_fn=digits, progress=False, resume=str(checkpoint))
    assert [r["step"] for r in read_metrics(runs / "resumed")] == [2, 3, 4]
    assert max_diff(exported_weights(Path(resumed["model_dir"]).parent), exported_weights(runs / "two")) < TOL


def test_parallel_degrees_are_checked(runs: Path) -> None:
    with pytest.raises(ParallelError, match="parallel.cp=2 does not divide the world size 1"):
        run_grpo(_recipe(runs, "cp", parallel={"cp": 2}), reward_fn=digits, progress=False)
    with pytest.raises(ConfigError, match="unknown key 'parallel.tp'"):
        _recipe(runs, "tp", parallel={"tp": 2})
