"""The training loop end to end on a very small hybrid: exact resume, stages, metrics, CLI, plots."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from turbos.cli import main
from turbos.data.corpora import build_corpus
from turbos.data.packing import eos_seq_idx
from turbos.data.tokenizer import EOS_ID
from turbos.device import autocast_context
from turbos.model import TurboSForCausalLM
from turbos.train.checkpoint import list_checkpoints
from turbos.train.loop import Interrupted
from turbos.train.metrics import read_metrics
from turbos.train.recipe import parse_recipe
from turbos.train.trainer import Trainer

# Two stages (16 then 32 tokens, RoPE alpha 1 then 2) of 2 + 4 steps, 2 micro-batches per step,
# capacity factor 1.0 so that recycle routing (torch's global RNG) is busy.
MICRO = {
    "model": {
        "preset": "tiny",
        "overrides": {
            "hidden_size": 32,
            "layout": "AMF MF",
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "mamba_num_heads": 2,
            "mamba_head_dim": 16,
            "mamba_n_groups": 1,
            "mamba_state_size": 8,
            "mamba_chunk_size": 16,
            "expert_intermediate_size": 32,
            "max_position_embeddings": 64,
        },
    },
    "data": {
        "sources": [{"source": "builtin:reasoning", "n": 300}],
        "tokenizer": {"vocab_size": 300, "max_documents": 200},
        "seq_len": 16,
        "batch_size": 4,
        "grad_accum": 2,
        "val_fraction": 0.1,
    },
    "optimizer": {"lr": 3e-3},
    "schedule": {"warmup_steps": 1, "min_lr": 1e-4},
    "stages": [
        {"name": "short", "steps": 2},
        {
            "name": "long",
            "steps": 4,
            "seq_len": 32,
            "batch_size": 2,
            "rope_alpha": 2,
            "lr_policy": "cosine",
            "long_sources": {"source": "builtin:reasoning", "n": 100, "seed": 1},
            "short_long_ratio": [3, 1],
        },
    ],
    "moe": {"capacity_factor": 1.0},
    "eval": {"interval": 2, "batches": 2},
    "checkpoint": {"interval": 2, "keep_last": 0},
}
TOTAL = 6


def micro_recipe(run_dir: Path):
    raw = copy.deepcopy(MICRO)
    raw["output_dir"] = str(run_dir)
    return parse_recipe(raw)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(run_dir)[-1] / "model.safetensors"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """TOTAL steps in one go."""
    run_dir = tmp_path_factory.mktemp("straight")
    torch.manual_seed(0)
    Trainer(micro_recipe(run_dir), progress=False).train()
    return run_dir


@pytest.mark.parametrize(
    ("stop_at", "resume_from"),
    [(3, "auto"), (3, "step-00000002")],
    ids=["mid-stage", "stage-boundary-with-stale-log"],
)
def test_stopping_and_resuming_gives_bitwise_identical_weights(
    straight_run: Path, tmp_path: Path, stop_at: int, resume_from: str
) -> None:
    Trainer(micro_recipe(tmp_path), progress=False).train(stop_at=stop_at)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts in
    shutil.rmtree(tmp_path / "tokenizer")  # the checkpoint's own copy must be used
    resume = resume_from if resume_from == "auto" else str(tmp_path / "checkpoints" / resume_from)
    Trainer(micro_recipe(tmp_path), resume=resume, progress=False).train()

    expected, got = final_weights(straight_run), final_weights(tmp_path)
    different = [name for name in expected if not torch.equal(expected[name], got[name])]
    assert not different, f"resumed weights differ from the straight run in {different}"
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == list(range(TOTAL + 1)), (
        "the log has every step once, records after the checkpoint replaced"
    )
    straight = [r["loss"] for r in read_metrics(straight_run)[1:]]
    assert [r["loss"] for r in read_metrics(tmp_path)[1:]] == straight, "identical losses, step by step"


def test_an_interrupt_inside_a_step_checkpoints_the_step_before_and_resumes_it_exactly(
    straight_run: Path, tmp_path: Path
) -> None:
    trainer = Trainer(micro_recipe(tmp_path), progress=False)
    loss_fn, calls = trainer.loss_fn, []

    def interrupted_in_step_4(model, batch):
        calls.append(1)
        if len(calls) == 8:  # step 4's second micro-batch: the first one drew data, RNG and gradients
            raise KeyboardInterrupt
        return loss_fn(model, batch)

    trainer.loss_fn = interrupted_in_step_4
    with pytest.raises(Interrupted) as caught:
        trainer.train()
    step_3 = tmp_path / "checkpoints" / "step-00000003"
    assert (caught.value.checkpoint, caught.value.where) == (step_3, f"at step 3/{TOTAL}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"], (
        "step 3, the last completed one, is saved besides the interval's step 2"
    )
    Trainer(micro_recipe(tmp_path), resume="auto", progress=False).train()
    expected, got = final_weights(straight_run), final_weights(tmp_path)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == [], (
        "the partial step's data, RNG draws and gradients must leave no trace, bit for bit"
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(TOTAL + 1))


def test_parallelize_applies_to_the_model_before_the_optimizer_is_built(tmp_path: Path) -> None:
    def freeze_the_final_norm(model: torch.nn.Module) -> torch.nn.Module:
        model.model.norm.weight.requires_grad_(False)  # stands for a wrapper changing the parameters
        return model

    trainer = Trainer(micro_recipe(tmp_path), progress=False, parallelize=freeze_the_final_norm)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.model.model.norm.weight) not in optimized


def test_reset_at_eos_gives_the_model_each_rows_documents(tmp_path: Path, monkeypatch) -> None:
    raw = copy.deepcopy(MICRO)
    raw["data"]["reset_at_eos"] = True
    raw.update(output_dir=str(tmp_path), eval={"interval": 0})
    seen = []
    forward = TurboSForCausalLM.forward

    def spy(self, input_ids, *args, seq_idx=None, **kwargs):
        seen.append((input_ids, seq_idx))
        return forward(self, input_ids, *args, seq_idx=seq_idx, **kwargs)

    monkeypatch.setattr(TurboSForCausalLM, "forward", spy)
    Trainer(parse_recipe(raw), progress=False).train()
    assert len(seen) == 2 * TOTAL, "one forward per micro-batch"
    for inputs, seq_idx in seen:
        assert seq_idx is not None and torch.equal(seq_idx, eos_seq_idx(inputs, EOS_ID))
    assert any(int(seq_idx.max()) > 0 for _, seq_idx in seen), "rows hold several documents"


def test_metrics_log_every_step_with_lrs_routing_and_validation(straight_run: Path) -> None:
    records = read_metrics(straight_run)
    assert records[0]["step"] == 0 and "val_loss" in records[0], "validation before the first step"
    train = records[1:]
    assert [r["stage"] for r in train] == ["short"] * 2 + ["long"] * 4
    assert [r["seq_len"] for r in train] == [16] * 2 + [32] * 4
    first = train[0]
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "tokens", "tokens_per_s"):
        assert isinstance(first[key], float | int), key
    assert set(first["lr"]) == {"decay", "no_decay", "experts"}
    assert first["lr"]["experts"] == pytest.approx(first["lr"]["decay"] * 0.5**0.5), "sqrt(2 / 4) expert LR"
    assert len(first["expert_load"]) == 2 and all(
        sum(load) == pytest.approx(1) for load in first["expert_load"]
    )
    assert any(r["recycled_frac"] > 0 for r in train), "capacity factor 1.0 must make recycle routing work"
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4, 6]
    assert train[-1]["tokens"] == 2 * (16 * 4 * 2) + 4 * (32 * 2 * 2)


def test_checkpoints_carry_the_stage_rope_alpha_and_the_tokenizer(straight_run: Path) -> None:
    last = list_checkpoints(straight_run)[-1]
    config = json.loads((last / "config.json").read_text())
    assert config["rope_alpha"] == 2.0, "the long stage's alpha is part of the saved model"
    assert (last / "tokenizer.json").is_file()
    state = json.loads((last / "trainer_state.json").read_text())
    assert (state["step"], state["stage"]) == (TOTAL, 1), "the checkpoint is of the long stage's last step"


def test_a_run_directory_with_checkpoints_is_not_silently_overwritten(straight_run: Path) -> None:
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        Trainer(micro_recipe(straight_run), progress=False)


def test_resume_refuses_changed_stages_but_allows_output_and_checkpoint_changes(
    straight_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    one_stage = copy.deepcopy(MICRO)
    one_stage["stages"] = one_stage["stages"][:1]
    one_stage["output_dir"] = str(run_dir)
    with pytest.raises(ValueError, match=r"different recipe: \['stages'\] differ"):
        Trainer(parse_recipe(one_stage), resume="auto", progress=False)  # was an IndexError
    raw = copy.deepcopy(MICRO)
    raw.update(output_dir=str(run_dir), checkpoint={"interval": 3, "keep_last": 1}, eval={"interval": 0})
    trainer = Trainer(parse_recipe(raw), resume="auto", progress=False)
    assert trainer.step == TOTAL


def test_a_dense_model_without_experts_trains(tmp_path: Path) -> None:
    raw = copy.deepcopy(MICRO)
    raw["model"]["overrides"].update(ffn_type="dense", num_experts=0, intermediate_size=32)
    raw["output_dir"] = str(tmp_path)
    summary = Trainer(parse_recipe(raw), progress=False).train(stop_at=1)  # was a ZeroDivisionError
    assert summary["steps"] == 1


def test_a_malformed_jsonl_source_line_is_named_by_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a document"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: not valid JSON"):
        list(build_corpus(f"jsonl:{path}#text"))


def test_cli_pretrain_writes_metrics_and_a_checkpoint_then_plot_and_eval_ppl(tmp_path: Path, capsys) -> None:
    recipe_path = tmp_path / "micro.yaml"
    recipe_path.write_text(yaml.safe_dump(MICRO))
    run_dir = tmp_path / "run"
    code = main(
        [
            "pretrain",
            "--recipe",
            str(recipe_path),
            f"output_dir={run_dir}",
            "stages.1.steps=1",
            "--no-progress",
        ]
    )
    assert code == 0
    assert len(read_metrics(run_dir)) == 1 + 3
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000002", "step-00000003"]

    assert main(["plot", str(run_dir)]) == 0
    for name in ("loss.png", "lr.png", "expert_load.png"):
        png = run_dir / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} must be a PNG"

    capsys.readouterr()
    checkpoint = list_checkpoints(run_dir)[-1]
    args = ["eval-ppl", "--model", str(checkpoint), "--data", "builtin:reasoning", "--seq-len", "16"]
    assert main([*args, "--batch-size", "2", "--batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item(), rel=1e-5)
    assert result["tokens"] == 2 * 2 * 16


def test_cli_reports_a_bad_override_as_an_error(tmp_path: Path, capsys) -> None:
    recipe_path = tmp_path / "micro.yaml"
    recipe_path.write_text(yaml.safe_dump(MICRO))
    assert main(["pretrain", "--recipe", str(recipe_path), "optimizer.lrr=1"]) == 2
    assert "unknown key 'optimizer.lrr'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("precision", "dtype"), [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)]
)
def test_cpu_runs_fp32_unless_bf16_is_asked_for(precision: str, dtype: torch.dtype) -> None:
    linear = torch.nn.Linear(4, 4)
    with autocast_context(precision, torch.device("cpu")):
        out = linear(torch.randn(2, 4))
    assert out.dtype == dtype, f"precision {precision!r} on CPU must compute in {dtype}"


def test_cli_plot_and_eval_ppl_reject_bad_input_with_clear_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "lm_loss": 5.0, "loss": 5.0}\n[1, 2]\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl:2: expected a JSON object, got list" in capsys.readouterr().err
    for flag in ("--batch-size", "--batches"):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval-ppl", "--model", "unused", "--data", "builtin:reasoning", flag, "0"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err
