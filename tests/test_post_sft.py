"""SFT: assistant-only loss masking, data validation, mixing, and a short run that learns."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import small_config
from serve_helpers import save_model_dir, tiny_tokenizer
from turbos.cli import main
from turbos.config import ConfigError
from turbos.data.tokenizer import PAD_ID
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX
from turbos.post.sft import (
    ChatBatches,
    EncodedData,
    SFTDataset,
    SFTRecipe,
    batch_rows,
    collate,
    encode_conversation,
    encode_datasets,
    read_conversations,
    row_sampler,
    run_sft,
    sequence_mean_loss,
    sft_loss_fn,
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
    with pytest.raises(ValueError, match="no assistant reply to learn from"):
        read_conversations(path)
    path.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="role"):
        read_conversations(path)


def test_datasets_mix_by_weight_not_by_size() -> None:
    data = EncodedData(ids=[[1]] * 100, labels=[[1]] * 100, source=[0] * 90 + [1] * 10, skipped=[0, 0])
    probs = row_sampler(data, [1.0, 1.0])
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
    keep = labels[:, 1:] != -100
    conversation = torch.arange(2)[:, None].expand(2, 5)[keep]
    mean = sequence_mean_loss(logits[:, :-1][keep], labels[:, 1:][keep], conversation, 2)
    assert mean.item() == pytest.approx(((short + long) / 2).item(), rel=1e-5)
    token_mean = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    assert token_mean.item() == pytest.approx(((short + 5 * long) / 6).item(), rel=1e-5)
    with pytest.raises(ConfigError, match="loss_normalization"):
        SFTRecipe.from_dict(
            {"model": "m", "data": [{"path": "x"}], "output_dir": "o", "loss_normalization": "x"}
        )


def test_packing_fills_rows_first_fit_decreasing_and_no_conversation_predicts_the_next() -> None:
    ids = [[1] * 5, [2] * 3, [3] * 4, [4] * 2]
    batch = collate(ids, ids, pack_len=8)  # every token a label, to see which are masked
    pad = PAD_ID
    assert batch.input_ids.tolist() == [[1] * 5 + [2] * 3, [3] * 4 + [4] * 2 + [pad] * 2], (
        "longest first, each into the first row with room: 5 + 3 and 4 + 2"
    )
    assert batch.seq_idx.tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [1] * 4], "padding joins the last"
    assert batch.attention_mask.tolist() == [[1] * 8, [1] * 6 + [0] * 2]
    first = IGNORE_INDEX  # each conversation's first token is no target: the one before is another's
    assert batch.labels.tolist() == [
        [first, 1, 1, 1, 1, first, 2, 2],
        [first, 3, 3, 3, first, 4, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.num_tokens == 14
    assert batch.target_index.tolist() == [0, 1, 2, 3, 5, 6, 8, 9, 10, 12], "positions before targets"
    assert batch.target_ids.tolist() == [1, 1, 1, 1, 2, 2, 3, 3, 3, 4]
    assert batch.target_conversation.tolist() == [0] * 4 + [1] * 2 + [2] * 3 + [3]
    unpacked = collate(ids, ids)
    assert unpacked.seq_idx is None and unpacked.input_ids.shape == (4, 5)
    assert unpacked.target_ids.tolist() == batch.target_ids.tolist(), "the same targets either way"


def test_packed_batches_have_the_drawn_conversations_in_rows_as_wide_as_the_longest() -> None:
    lengths = [2, 3, 4, 12] * 5
    data = EncodedData([[7] * n for n in lengths], [[7] * n for n in lengths], [0] * 20, [0])
    settings = {
        "model": "m",
        "data": [{"path": "x"}],
        "output_dir": "o",
        "batch_size": 8,
        "group_by_length": 1,
    }
    packed = next(ChatBatches(data, SFTRecipe.from_dict(settings)))
    one_per_row = next(ChatBatches(data, SFTRecipe.from_dict({**settings, "packing": False})))
    assert one_per_row.input_ids.shape[0] == 8 and packed.num_tokens == one_per_row.num_tokens, (
        "the same conversations"
    )
    assert packed.input_ids.shape[1] == one_per_row.input_ids.shape[1], "no row wider than the longest"
    assert packed.input_ids.shape[0] < 8 and int(packed.seq_idx.max()) > 0


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_a_packed_batch_gives_the_loss_and_gradients_of_one_conversation_per_row(normalization: str) -> None:
    tok = tiny_tokenizer()
    chats = [
        [
            {"role": "user", "content": f"What is {a} + {3 * a}?" + " Please." * (a % 3)},
            {
                "role": "assistant",
                "content": f"<think>\n{a}+{3 * a}\n</think>\nAnswer: {4 * a}" if a % 2 else "5",
            },
        ]
        for a in range(1, 8)
    ]
    ids, labels = zip(*(encode_conversation(m, tok) for m in chats), strict=True)
    # Experts that never overflow: in train mode capacity and recycling depend on the batch layout.
    config = small_config(vocab_size=tok.get_vocab_size(), max_position_embeddings=256, capacity_factor=16.0)
    torch.manual_seed(0)
    model = TurboSForCausalLM(config).train()
    loss_fn = sft_loss_fn(per_sequence=normalization == "sequence")

    def loss_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        loss, metrics = loss_fn(model, batch)
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), float(metrics["aux_loss"].detach()), grads

    packed = collate(ids, labels, pack_len=3 * max(map(len, ids)))
    assert len(packed.input_ids) < len(ids) // 2, "several conversations share each row"
    loss, aux, grads = loss_and_gradients(packed)
    row_loss, row_aux, row_grads = loss_and_gradients(collate(ids, labels))
    assert abs(loss - row_loss) <= 1e-5 and abs(aux - row_aux) <= 1e-5, (
        f"fp32: packed {loss} (aux {aux}) vs one per row {row_loss} (aux {row_aux}), within 1e-5"
    )
    assert grads.keys() == row_grads.keys()
    worst = max((grads[name] - row_grads[name]).abs().max().item() for name in grads)
    assert worst <= 1e-5, f"gradients agree within fp32 rounding (1e-5), worst {worst:.2e}"


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
        max_len=256,
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
        max_len=256,
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
    assert main(["plot", str(tmp_path / "cli")]) == 0, "an SFT run's records have no stage"
    assert (tmp_path / "cli" / "plots" / "loss.png").is_file()


def test_history_replies_whose_reasoning_is_dropped_carry_no_loss() -> None:
    tok = tiny_tokenizer()
    messages = [
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "<think>7+5=12, carry 1</think>Answer: 42"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "<think>4+4=8</think>Answer: 8"},
    ]

    def trained(conversation: list[dict]) -> str:
        ids, labels = encode_conversation(conversation, tok)
        return tok.decode(
            [t for t, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX], skip_special_tokens=False
        )

    expected = "<think>4+4=8</think>Answer: 8<|end|>"
    assert trained(messages) == expected, "the first reply's answer is shown without its reasoning: no loss"
    messages[1] = {"role": "assistant", "content": "Answer: 42", "reasoning_content": "7+5=12, carry 1"}
    assert trained(messages) == expected


def test_chat_files_without_a_trainable_reply_or_with_bad_reasoning_are_refused(tmp_path) -> None:
    path = tmp_path / "chats.jsonl"
    turns = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>r</think>a"},
        {"role": "user", "content": "q2"},
    ]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(ValueError, match=r"chats\.jsonl:1: no assistant reply to learn from"):
        read_conversations(path)
    bad = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": 5}]
    path.write_text(json.dumps({"messages": bad}) + "\n")
    with pytest.raises(ValueError, match=r"chats\.jsonl:1: reasoning_content must be a string"):
        read_conversations(path)


def test_a_special_token_written_into_a_message_is_an_error_naming_the_conversation(tmp_path) -> None:
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Answer: 5"}]
    smuggled = [{"role": "user", "content": "the <|assistant|> tag"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (good, smuggled)))
    with pytest.raises(ValueError, match=r"chats\.jsonl: conversation 2: "):
        encode_datasets([SFTDataset(str(path))], tiny_tokenizer(), max_len=256)


def test_a_dataset_left_without_conversations_is_an_error_naming_it(tmp_path) -> None:
    tok = tiny_tokenizer()
    short = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    long = [{"role": "user", "content": "x " * 100}, {"role": "assistant", "content": "a"}]
    chats, mixed, empty = tmp_path / "chats.jsonl", tmp_path / "mixed.jsonl", tmp_path / "empty.jsonl"
    chats.write_text(json.dumps({"messages": short}) + "\n")
    mixed.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (short, long, short)))
    empty.write_text("\n")
    data = encode_datasets([SFTDataset(str(chats)), SFTDataset(str(mixed))], tok, max_len=32)
    assert data.source == [0, 1, 1] and data.skipped == [0, 1], (
        "skipped conversations are counted per dataset"
    )
    with pytest.raises(
        ValueError, match=r"empty\.jsonl \(weight 9\.0\) has no conversation .*: the file holds none"
    ):
        encode_datasets([SFTDataset(str(chats)), SFTDataset(str(empty), 9.0)], tok, max_len=32)
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps({"messages": long}) + "\n")
    with pytest.raises(
        ValueError, match=r"long\.jsonl .* every one of its 1 conversations is longer than max_len=32"
    ):
        encode_datasets([SFTDataset(str(chats)), SFTDataset(str(only_long))], tok, max_len=32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"lr": "abc"}, r"lr: expected float, got 'abc'"),
        ({"batch_size": 2.5}, r"batch_size: expected int, got 2\.5"),
        ({"betas": [0.9]}, r"betas: expected a list of 2 values, got \[0\.9\]"),
        ({"betas": [0.9, 1.5]}, r"betas\[1\] must be in \[0, 1\), got 1\.5"),
        ({"output_dir": None}, r"output_dir: expected a string, got None"),
        (
            {"data": [{"path": "x", "weight": float("nan")}]},
            r"data\[0\]\.weight: expected a finite float, got nan",
        ),
        (
            {"data": [{"path": "x", "weight": float("inf")}]},
            r"data\[0\]\.weight: expected a finite float, got inf",
        ),
        ({"data": [{"path": "x", "weight": 0}]}, r"data\[0\]\.weight must be > 0, got 0\.0"),
        ({"data": []}, r"data must not be empty"),
        ({"data": [{"weight": 2}]}, r"missing key 'data\[0\]\.path'"),
        ({"data": [{"path": "x", "wieght": 2}]}, r"unknown key 'data\[0\]\.wieght'"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0, got -1"),
        ({"warmup_steps": 200}, r"warmup_steps must be in \[0, steps=200\), got 200"),
        ({"checkpoint_interval": -1}, r"checkpoint_interval must be >= 0, got -1"),
        ({"keep_last": -1}, r"keep_last must be >= 0, got -1"),
        ({"grad_clip": -1.0}, r"grad_clip must be >= 0, got -1\.0"),
        ({"min_lr": 1e-2}, r"min_lr=0\.01 exceeds lr=0\.001"),
        ({"precision": "fp16"}, r"precision: expected one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
        ({"lerning_rate": 1}, r"unknown key 'lerning_rate'; valid keys: \['model', 'data', 'output_dir'"),
    ],
)
def test_recipe_values_are_checked_by_type_and_range(changes: dict, message: str) -> None:
    raw = {"model": "m", "data": [{"path": "x"}], "output_dir": "o", **changes}
    with pytest.raises(ConfigError, match=f"sft recipe: {message}"):
        SFTRecipe.from_dict(raw)


def test_recipe_numbers_yaml_reads_as_strings_are_numbers(tmp_path) -> None:
    path = tmp_path / "sft.yaml"
    path.write_text("model: m\ndata: [{path: x, weight: 2}]\noutput_dir: o\nlr: 1e-4\nmin_lr: 1e-5\n")
    recipe = SFTRecipe.load(path, ["steps='50'"])
    assert (recipe.lr, recipe.min_lr, recipe.steps, recipe.data[0].weight) == (1e-4, 1e-5, 50, 2.0)
    assert replace(recipe, seed=1).data == recipe.data, "datasets already built pass through"


def test_max_len_beyond_the_models_positions_is_refused(tmp_path) -> None:
    recipe = _resume_recipe(tmp_path, "long", max_len=512)
    with pytest.raises(
        ConfigError, match=r"max_len=512 exceeds the max_position_embeddings=256 of the model"
    ):
        run_sft(recipe, progress=False)


def test_grad_clip_zero_means_no_clipping(tmp_path) -> None:
    unclipped = run_sft(_resume_recipe(tmp_path, "zero", grad_clip=0.0, steps=3), progress=False)
    huge = run_sft(_resume_recipe(tmp_path, "huge", grad_clip=1e30, steps=3), progress=False)
    expected = TurboSForCausalLM.from_pretrained(huge["model_dir"]).state_dict()
    got = TurboSForCausalLM.from_pretrained(unclipped["model_dir"]).state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected), "0 must not scale gradients"


def test_a_finished_run_is_kept_reported_on_resume_and_set_aside_by_a_rewind(tmp_path, capsys) -> None:
    plain = _resume_recipe(tmp_path, "plain", steps=3)  # checkpoint_interval 0: no checkpoints
    run_sft(plain, progress=False)
    with pytest.raises(FileExistsError, match=r"holds a finished SFT run \(model, sft_summary\.json\)"):
        run_sft(plain, progress=False)

    out = tmp_path / "done"
    recipe = _resume_recipe(tmp_path, "done", checkpoint_interval=4, keep_last=0)
    summary = run_sft(recipe, progress=False)
    assert summary["datasets"] == [
        {"path": str(tmp_path / "chats.jsonl"), "conversations": 12, "skipped_too_long": 0}
    ]
    capsys.readouterr()
    assert run_sft(recipe, progress=False, resume="auto") == summary
    assert "already finished" in capsys.readouterr().err
    assert json.loads((out / "sft_summary.json").read_text()) == summary, "the summary is left alone"

    # Killed after its last checkpoint, before the export: the resume exports with the real loss.
    shutil.rmtree(out / "model")
    (out / "sft_summary.json").unlink()
    assert run_sft(recipe, progress=False, resume="auto")["final_loss"] == summary["final_loss"]

    # A rewind to step 4 abandons step 8 and the finished model, then trains them again.
    finished = load_file(out / "model" / "model.safetensors")
    run_sft(recipe, progress=False, resume=str(out / "checkpoints" / "step-00000004"))
    [aside] = (out / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == [
        "metrics.jsonl",
        "model",
        "sft_summary.json",
        "step-00000008",
    ]
    again = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(finished[name], again[name]) for name in finished)

    run_sft(recipe, progress=False, overwrite=True, stop_at=1)
    assert not (out / "model").exists() and not (out / "sft_summary.json").exists()
