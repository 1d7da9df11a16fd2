"""SFT: assistant-only loss masking, data validation, mixing, and a short run that learns."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
import yaml

from serve_helpers import save_model_dir, tiny_tokenizer
from turbos.cli import main
from turbos.config import ConfigError
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX
from turbos.post.sft import (
    EncodedData,
    SFTRecipe,
    batch_rows,
    encode_conversation,
    read_conversations,
    row_sampler,
    run_sft,
    sequence_mean_loss,
)


def test_loss_covers_exactly_the_assistant_replies() -> None:
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "Answer: 5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "<think>\n4+4+0=8\n</think>\nAnswer: 8"},
    ]
    ids, labels = encode_conversation(messages, tok)
    assert len(ids) == len(labels)
    trained = [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX]
    assert tok.decode(trained, skip_special_tokens=False) == (
        "Answer: 5<|end|><think>\n4+4+0=8\n</think>\nAnswer: 8<|end|>"
    ), "the reasoning of the last reply is trained; replies end with <|end|>"
    context = tok.decode(
        [t for t, y in zip(ids, labels, strict=True) if y == IGNORE_INDEX], skip_special_tokens=False
    )
    assert "What is 2 + 3?" in context and "Be brief." in context and "Answer" not in context
    assert all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != IGNORE_INDEX)


def test_bad_chat_files_fail_with_the_line_number(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n'
    )
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="no assistant message"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="role"):
        read_conversations(path)


def test_recipe_rejects_unknown_keys_and_bad_values(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        SFTRecipe.from_dict({"model": "m", "data": [{"path": "x"}], "output_dir": "o", "lerning_rate": 1})
    with pytest.raises(ConfigError, match="weight"):
        SFTRecipe.from_dict({"model": "m", "data": [{"path": "x", "weight": 0}], "output_dir": "o"})
    with pytest.raises(ConfigError, match="precision"):
        SFTRecipe.from_dict({"model": "m", "data": [{"path": "x"}], "output_dir": "o", "precision": "fp16"})


def test_datasets_mix_by_weight_not_by_size() -> None:
    data = EncodedData(ids=[[1]] * 100, labels=[[1]] * 100, source=[0] * 90 + [1] * 10, skipped=0)
    probs = row_sampler(data, [1.0, 1.0], seed=0)
    assert probs[:90].sum().item() == pytest.approx(0.5) and probs[90:].sum().item() == pytest.approx(0.5)


def test_length_grouped_batches_pad_less_and_keep_the_mix() -> None:
    lengths = [5] * 50 + [100] * 50
    probs = torch.full((100,), 1 / 100)

    def padded_fraction(group: int) -> tuple[float, float]:
        batches = batch_rows(probs, lengths, lengths, 8, group, torch.Generator().manual_seed(0))
        drawn, weights = zip(*(next(batches) for _ in range(400)), strict=True)
        # Weighted batch losses count every token alike: weight = batch tokens / mean batch tokens.
        tokens = [sum(lengths[r] for r in rows) for rows in drawn]
        for start in range(0, 400, group):
            chunk = tokens[start : start + group]
            expected = [t / (sum(chunk) / len(chunk)) for t in chunk]
            assert weights[start : start + group] == pytest.approx(expected)
        padded = sum(8 * max(lengths[r] for r in rows) for rows in drawn)
        real = sum(lengths[r] for rows in drawn for r in rows)
        long_share = sum(r >= 50 for rows in drawn for r in rows) / (8 * len(drawn))
        assert all(len(rows) == 8 for rows in drawn)
        return padded / real, long_share

    plain, plain_share = padded_fraction(1)
    grouped, grouped_share = padded_fraction(8)
    assert plain > 1.6 and grouped < 1.2, (plain, grouped)
    assert abs(plain_share - 0.5) < 0.05 and abs(grouped_share - 0.5) < 0.05


def test_sequence_loss_weighs_every_reply_alike() -> None:
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 3, -100, -100, -100, -100], [-100, 1, 2, 3, 4, 5]])
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"
    )
    short = per_token[0, 0]
    long = per_token[1].mean()
    assert sequence_mean_loss(logits, labels).item() == pytest.approx(((short + long) / 2).item(), rel=1e-5)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert token_mean.item() == pytest.approx(((short + 5 * long) / 6).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="loss_normalization"):
        SFTRecipe.from_dict(
            {"model": "m", "data": [{"path": "x"}], "output_dir": "o", "loss_normalization": "x"}
        )


def test_short_sft_run_learns_the_replies_and_exports_a_servable_model(tmp_path) -> None:
    base = save_model_dir(tmp_path / "base")
    chats = tmp_path / "chats.jsonl"
    with chats.open("w") as f:
        for a in range(10):
            chat = [
                {"role": "user", "content": f"What is {a} + 1?"},
                {"role": "assistant", "content": f"Answer: {a + 1}"},
            ]
            f.write(json.dumps({"messages": chat}) + "\n")
    recipe = SFTRecipe(
        model=str(base),
        data=[{"path": str(chats)}],
        output_dir=str(tmp_path / "sft"),
        steps=40,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
    )
    summary = run_sft(recipe, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and lines[-1]["lm_loss"] < 0.5 * lines[0]["lm_loss"], (
        lines[0]["lm_loss"],
        lines[-1]["lm_loss"],
    )
    model = TurboSForCausalLM.from_pretrained(summary["model_dir"])
    assert torch.isfinite(next(model.parameters())).all()
    config = json.loads((tmp_path / "sft" / "model" / "tokenizer_config.json").read_text())
    assert "chat_template" in config


def _resume_recipe(tmp_path, out: str, **changes) -> SFTRecipe:
    base = tmp_path / "base"
    if not base.exists():
        save_model_dir(base)
    chats = tmp_path / "chats.jsonl"
    if not chats.exists():
        with chats.open("w") as f:
            for a in range(12):
                reply = f"Answer: {a + 1}" if a % 2 else f"<think>\n{a}+1={a + 1}\n</think>\nAnswer: {a + 1}"
                chat = [
                    {"role": "user", "content": f"What is {a} + 1?"},
                    {"role": "assistant", "content": reply},
                ]
                f.write(json.dumps({"messages": chat}) + "\n")
    settings = dict(
        model=str(base),
        data=[{"path": str(chats)}],
        output_dir=str(tmp_path / out),
        steps=8,
        batch_size=4,
        warmup_steps=2,
        group_by_length=2,
        loss_normalization="sequence",
    )
    return SFTRecipe(**{**settings, **changes})


def test_stopped_and_resumed_sft_matches_a_straight_run_bit_for_bit(tmp_path) -> None:
    straight = run_sft(_resume_recipe(tmp_path, "straight"), progress=False)
    recipe = _resume_recipe(tmp_path, "resumed", checkpoint_interval=2, keep_last=2)
    stopped = run_sft(recipe, progress=False, stop_at=5)
    assert stopped["stopped_at"] == 5 and not (tmp_path / "resumed" / "model").exists()
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "step-00000004",
        "step-00000005",
    ], "every checkpoint_interval steps and at the stop, the newest keep_last kept"
    with pytest.raises(FileExistsError, match="--resume auto"):
        run_sft(recipe, progress=False)  # starting again would lose the checkpoints
    with pytest.raises(ValueError, match=r"\['lr'\] differ"):
        run_sft(_resume_recipe(tmp_path, "resumed", lr=5e-3), progress=False, resume="auto")
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts in
    resumed = run_sft(
        recipe, progress=False, resume=str(tmp_path / "resumed" / "checkpoints" / "step-00000004")
    )

    expected = TurboSForCausalLM.from_pretrained(straight["model_dir"]).state_dict()
    got = TurboSForCausalLM.from_pretrained(resumed["model_dir"]).state_dict()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9)), "step 5 logged once, after the resume"
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    assert resumed["tokens"] == straight["tokens"]
    run_sft(recipe, progress=False, overwrite=True, stop_at=1)  # --overwrite starts afresh
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000001"]


def test_sft_cli_stops_resumes_and_refuses_to_restart_over_checkpoints(tmp_path, capsys) -> None:
    recipe = _resume_recipe(tmp_path, "cli", checkpoint_interval=3)
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(recipe)))))
    assert main(["sft", "--recipe", str(path), "--stop-at", "4", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["stopped_at"] == 4
    assert main(["sft", "--recipe", str(path), "--no-progress"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["sft", "--recipe", str(path), "--resume", "auto", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 8
    assert (tmp_path / "cli" / "model" / "model.safetensors").is_file()
