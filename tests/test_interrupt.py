"""Ctrl-C and SIGTERM: a long command stops with one line saying what it saved and the command that
goes on, and that command finishes with the weights of a run never interrupted."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_train_loop import MICRO, final_weights
from turbos import cli
from turbos.post.demo import DemoSettings, run_demo
from turbos.train.checkpoint import list_checkpoints
from turbos.train.loop import Interrupted, deferred_interrupts
from turbos.train.metrics import read_metrics
from turbos.train.recipe import load_recipe
from turbos.train.trainer import Trainer

TURBOS = [sys.executable, "-m", "turbos.cli"]
PRETRAIN_STEPS = ["stages.1.steps=10"]  # 12 steps: the run is far from done at its first checkpoint

# The demo at its smallest: a micro model, a few steps per stage, a handful of problems.
MODEL = {k: v for k, v in MICRO["model"]["overrides"].items() if k != "max_position_embeddings"}
DEMO = [
    "pretrain_overrides="
    + json.dumps(
        [
            *(f"model.overrides.{key}={value}" for key, value in MODEL.items()),
            "data.tokenizer.vocab_size=300",
            "data.tokenizer.max_documents=300",
            "data.batch_size=2",
            "schedule.warmup_steps=1",
            "stages.0.steps=2",
            "stages.1.steps=1",
            "stages.2.steps=1",
            "stages.3.steps=1",
            "eval.batches=1",
        ]
    ),
    "short_problems=40",
    "short_steps=20",
    "sft_batch=4",
    "fusion_problems=6",
    "fusion_samples=0",
    "general_chats=2",
    "adaptive_steps=2",
    "eval_per_level=1",
    "max_tokens=8",
]


def run_until(command: list[str], ready: Callable[[], bool], sig: int, logs: Path) -> tuple[int, str]:
    """Run ``command``, send it ``sig`` once ``ready()``; its exit code and stderr."""
    with (logs / "stdout.txt").open("w") as out, (logs / "stderr.txt").open("w") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err)
        while not ready() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(sig)
        code = process.wait(timeout=600)
    return code, (logs / "stderr.txt").read_text()


def resume_command(line: str) -> list[str]:
    """The command after "resume with: ", run with this interpreter."""
    words = shlex.split(line.split("resume with: ", 1)[1])
    assert words[0] == "turbos", line
    return [*TURBOS, *words[1:]]


@pytest.fixture(scope="module")
def micro_recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "micro.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    return path


@pytest.fixture(scope="module")
def straight_pretrain(micro_recipe_file: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight")
    Trainer(load_recipe(micro_recipe_file, [*PRETRAIN_STEPS, f"output_dir={run}"]), progress=False).train()
    return run


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_an_interrupted_pretraining_saves_and_its_resume_command_finishes_the_same_run(
    micro_recipe_file: Path, straight_pretrain: Path, tmp_path: Path, sig: int, code: int
) -> None:
    run = tmp_path / "run"
    command = [*TURBOS, "pretrain", "--recipe", str(micro_recipe_file), *PRETRAIN_STEPS, f"output_dir={run}"]
    first = run / "checkpoints" / "step-00000002"
    exit_code, stderr = run_until([*command, "--no-progress"], first.is_dir, sig, tmp_path)

    assert exit_code == code, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, f"one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("interrupted at step ") and "saved checkpoint" in lines[0], lines[0]
    saved = list_checkpoints(run)[-1]
    assert str(saved) in lines[0], "the line names the checkpoint of the last completed step"
    assert lines[0].endswith("--no-progress --resume auto"), lines[0]

    assert subprocess.run(resume_command(lines[0]), capture_output=True).returncode == 0
    expected, got = final_weights(straight_pretrain), final_weights(run)
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == [], (
        "the resumed run must end with the uninterrupted run's weights, bit for bit"
    )
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(straight_pretrain)], (
        "every step logged once"
    )


def test_an_interrupted_demo_says_which_stage_stopped_and_rerunning_it_finishes_the_same_models(
    tmp_path: Path,
) -> None:
    reference = tmp_path / "reference"
    run_demo(reference, DemoSettings.quick().with_overrides(DEMO), progress=False)
    out = tmp_path / "demo"
    first = out / "sft-short" / "checkpoints" / "step-00000002"
    command = [*TURBOS, "demo", "--quick", "--out", str(out), "--no-progress", *DEMO]
    exit_code, stderr = run_until(command, first.is_dir, signal.SIGINT, tmp_path)

    assert exit_code == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, f"one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("interrupted in stage 2/6 (short-CoT SFT) at step "), lines[0]
    assert shlex.split(lines[0].split("resume with: ")[1])[1:] == command[3:], "the same demo command"

    finished = subprocess.run(resume_command(lines[0]), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "[1/6] pre-train tiny: reusing" in finished.stdout and "resuming from" in finished.stdout
    for stage in ("sft-short", "sft-adaptive"):
        expected = load_file(reference / stage / "model" / "model.safetensors")
        got = load_file(out / stage / "model" / "model.safetensors")
        assert [name for name in expected if not torch.equal(expected[name], got[name])] == [], (
            f"{stage}: the re-run must end with the uninterrupted demo's weights, bit for bit"
        )


def test_a_signal_during_a_deferred_block_is_raised_when_the_block_is_done() -> None:
    def stop(signum: int, _frame) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    finished = []
    try:
        with pytest.raises(Interrupted) as caught, deferred_interrupts():
            signal.raise_signal(signal.SIGTERM)
            finished.append(True)  # e.g. the rest of a checkpoint write
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert finished == [True], "the block runs to its end before the interrupt is raised"
    assert caught.value.signum == signal.SIGTERM


def test_an_interrupted_sft_line_resumes_with_auto_in_place_of_resume_and_overwrite(
    capsys, monkeypatch
) -> None:
    def interrupted(_args) -> int:
        raise Interrupted(signal.SIGINT, "at step 3/8", "saved checkpoint out/step-3", Path("out/step-3"))

    monkeypatch.setattr(cli, "_cmd_post_train", interrupted)
    assert cli.main(["sft", "--recipe", "r.yaml", "--overwrite", "--resume", "out/step-1", "lr=1e-3"]) == 130
    assert capsys.readouterr().err == (
        "interrupted at step 3/8: saved checkpoint out/step-3; "
        "resume with: turbos sft --recipe r.yaml lr=1e-3 --resume auto\n"
    )


def test_a_command_interrupted_before_it_saved_anything_is_given_again_as_it_was(capsys, monkeypatch) -> None:
    def interrupted(_args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_pretrain", interrupted)
    assert cli.main(["pretrain", "--recipe", "r.yaml", "--overwrite"]) == 130
    assert capsys.readouterr().err == (
        "interrupted before training began: nothing saved; "
        "start again with: turbos pretrain --recipe r.yaml --overwrite\n"
    )
