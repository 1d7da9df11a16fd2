"""SFT under torchrun on CPU: two gloo ranks sharing each step's conversations match one process.

The model never overflows an expert (capacity factor num_experts / top_k), so routing does not
depend on how the step is split, and has no router aux loss: that one is each rank's own (the
mean over ranks, as over pre-training's micro-batches), not the whole step's. Packing stays on:
each rank packs its own share, which changes rows but not the loss (each conversation sees only
itself) beyond rounding. "Same" means within 1e-5 in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_helpers import exported_weights, max_diff, run_ranks
from serve_helpers import tiny_model, tiny_tokenizer
from turbos.data.tokenizer import load_tokenizer, save_tokenizer
from turbos.distributed.parallel import ParallelConfig, ParallelError, barrier
from turbos.post.sft import ChatBatches, SFTRecipe, encode_datasets, run_sft
from turbos.serve.chat_template import save_chat_template
from turbos.train.metrics import read_metrics

TOL = 1e-5
NORMALIZATIONS = ("token", "sequence")


def _recipe(tmp_path: Path, out: str, **changes: object) -> SFTRecipe:
    settings = dict(
        model=str(tmp_path / "base"),
        data=[{"path": str(tmp_path / "chats.jsonl")}],
        output_dir=str(tmp_path / out),
        max_len=256,
        steps=3,
        batch_size=4,
        warmup_steps=1,
        group_by_length=2,
        checkpoint_interval=2,
    )
    return SFTRecipe(**{**settings, **changes})


def _two_ranks(tmp_path: Path) -> None:
    for normalization in NORMALIZATIONS:
        run_sft(_recipe(tmp_path, f"two-{normalization}", loss_normalization=normalization), progress=False)
    run_sft(_recipe(tmp_path, "two-ep", parallel=ParallelConfig(ep=2)), progress=False)
    barrier()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model directory and chats of varied lengths, then 3 steps on 2 ranks per
    normalization, and with expert parallelism."""
    tmp_path = tmp_path_factory.mktemp("sft")
    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"
    model = tiny_model(tokenizer.get_vocab_size(), capacity_factor=2.0, router_aux_loss_coef=0.0)
    model.save_pretrained(base)
    save_tokenizer(tokenizer, base)
    save_chat_template(base)
    with (tmp_path / "chats.jsonl").open("w") as f:
        for a in range(12):
            reply = f"Answer: {a + 1}" if a % 2 else f"<think>\n{a}+1={a + 1}\n</think>\nAnswer: {a + 1}"
            chat = [{"role": "user", "content": f"What is {a} + 1?" + " Please." * (a % 3)}]
            f.write(json.dumps({"messages": [*chat, {"role": "assistant", "content": reply}]}) + "\n")
    run_ranks(_two_ranks, 2, tmp_path)
    return tmp_path


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_two_ranks_match_one_process_losses_andexported_weights(runs: Path, normalization: str) -> None:
    one = run_sft(_recipe(runs, f"one-{normalization}", loss_normalization=normalization), progress=False)
    two = runs / f"two-{normalization}"
    assert (two / "checkpoints" / "step-00000002" / "dcp").is_dir(), "checkpoints are sharded"
    mine, theirs = read_metrics(two), read_metrics(runs / f"one-{normalization}")
    assert [r["step"] for r in mine] == [1, 2, 3], "rank 0 logs each step once"
    for a, b in zip(mine, theirs, strict=True):
        assert abs(a["lm_loss"] - b["lm_loss"]) < TOL, (a["step"], a["lm_loss"], b["lm_loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < TOL and a["tokens"] == b["tokens"]
    assert json.loads((two / "sft_summary.json").read_text())["tokens"] == one["tokens"]
    assert max_diff(exported_weights(two), exported_weights(runs / f"one-{normalization}")) < TOL


def test_expert_parallel_sft_matches_one_process(runs: Path) -> None:
    """Each rank holds half of the routed experts (FSDP2 over their one replica) and its share of
    every step's conversations: the losses and weights of one process."""
    run_sft(_recipe(runs, "one-ep"), progress=False)
    mine, theirs = read_metrics(runs / "two-ep"), read_metrics(runs / "one-ep")
    assert [r["step"] for r in mine] == [1, 2, 3]
    for a, b in zip(mine, theirs, strict=True):
        assert abs(a["lm_loss"] - b["lm_loss"]) < TOL and abs(a["grad_norm"] - b["grad_norm"]) < TOL
    assert max_diff(exported_weights(runs / "two-ep"), exported_weights(runs / "one-ep")) < TOL


def test_a_two_rank_checkpoint_resumes_on_one_process(runs: Path) -> None:
    checkpoint = runs / "two-token" / "checkpoints" / "step-00000002"
    resumed = run_sft(_recipe(runs, "resumed"), progress=False, resume=str(checkpoint))
    assert [r["step"] for r in read_metrics(runs / "resumed")] == [3]
    assert (
        max_diff(exported_weights(Path(resumed["model_dir"]).parent), exported_weights(runs / "two-token"))
        < TOL
    )


def test_a_step_that_cannot_be_shared_evenly_is_refused(runs: Path) -> None:
    recipe = _recipe(runs, "uneven", batch_size=3)
    data = encode_datasets(recipe.data, load_tokenizer(runs / "base"), recipe.max_len)
    with pytest.raises(ParallelError, match="batch_size=3 conversations a step cannot be shared evenly by 2"):
        ChatBatches(data, recipe, rank=0, ranks=2)
