"""Post-training pipeline: the endpoint teacher on our own server, evaluation bookkeeping, and
`turbos demo --quick` end to end (reuse and resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from serve_helpers import running_server, save_model_dir
from turbos.cli import build_parser, main
from turbos.data.tasks import generate_problems, verify
from turbos.post.cot_fusion import EndpointTeacher, ModelTeacher, fuse_example, strip_answer_lines
from turbos.post.demo import DemoSettings, adaptive_sft_recipe, check_targets, run_demo
from turbos.post.evaluate import Answer, format_table, read_problems, summarize
from turbos.post.sft import SFTRecipe, run_sft
from turbos.serve import LLMEngine


def test_endpoint_teacher_talks_to_turbos_serve_on_loopback(tmp_path) -> None:
    model_dir = save_model_dir(tmp_path / "teacher")
    problem = generate_problems(1, families=["add"], levels=[3], seed=5)[0]
    with running_server(LLMEngine.from_pretrained(model_dir, seed=0), model_name="teacher") as (url, _):
        teacher = EndpointTeacher(f"{url}/v1", "teacher", max_tokens=24)
        teacher.probe(problem)  # one token: the server is there and knows the model
        reply = teacher.continue_reasoning(problem, ["Answer: 7"])
        seen: list[list[str]] = []

        class Recording:
            def continue_reasoning(self, p, attempts):
                seen.append(list(attempts))
                return teacher.continue_reasoning(p, attempts)

        example = fuse_example(problem, "Answer: 7", Recording(), max_rounds=2)
    # The same teacher in-process (auto mode, as the request named none): greedy, so the server
    # must have returned exactly this.
    local = ModelTeacher(LLMEngine.from_pretrained(model_dir, seed=0), thinking="auto", max_tokens=24)
    assert reply == local.continue_reasoning(problem, ["Answer: 7"])
    assert "<think>" not in reply and "</think>" not in reply
    # A random tiny teacher never reaches the answer, so both rounds fail: the first round's
    # continuation (the same greedy reply) is fed back as one more attempt, then the problem is dropped.
    assert not verify(problem, reply), "the random teacher's reply is wrong"
    assert seen == [["Answer: 7"], ["Answer: 7", strip_answer_lines(reply)]], "wrong continuation fed back"
    assert example is None, "no round verified: fusion drops the problem"


def answer(level: int, mode: str, correct: bool, tokens: int, thought: bool) -> Answer:
    problem = generate_problems(1, families=["add"], levels=[level], seed=level)[0]
    return Answer(problem, mode, "", correct, tokens, thought)


def test_summary_and_targets_follow_the_definitions() -> None:
    results = {}
    for mode, spec in {
        "no_think": {1: (True, 5, False), 4: (False, 5, False)},
        "think": {1: (True, 100, True), 4: (True, 80, True)},
        "auto": {1: (True, 5, False), 4: (True, 80, True)},
    }.items():
        answers = [answer(level, mode, *spec[level]) for level in (1, 4) for _ in range(5)]
        results[mode] = summarize(answers)
    assert results["think"]["by_level"]["4"] == {
        "n": 5,
        "accuracy": 1.0,
        "mean_tokens": 80.0,
        "think_rate": 1.0,
    }
    assert results["think"]["by_family_level"] == {
        "add 1": results["think"]["by_level"]["1"],
        "add 4": results["think"]["by_level"]["4"],
    }
    table = format_table(results, by="family_level").splitlines()
    assert [row.split("|")[0].strip() for row in table[3:]] == ["add 1", "add 4", "overall"]
    assert "80.0" in table[4].split("|")[2], "think's tokens at add 4"
    with pytest.raises(ValueError, match="family_level"):
        format_table(results, by="family")
    targets = check_targets(results)
    assert all(t["met"] for t in targets.values()), targets
    assert [t["values"] for t in targets.values()] == [
        {"think_gain_hardest": 1.0},
        {"auto_minus_think": 0.0, "token_ratio": pytest.approx(42.5 / 90)},
        {"think_rate_hardest": 1.0, "think_rate_easiest": 0.0},
    ]
    results["auto"]["by_level"]["1"]["think_rate"] = 0.5
    assert not check_targets(results)["auto thinks on >= 80% of the hardest and <= 20% of the easiest"]["met"]


def test_user_problem_files_are_validated(tmp_path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2+2?", "answer": "4", "level": 1}\n{"question": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:2"):
        read_problems(path)
    path.write_text('{"question": "2+2?", "answer": " 04 ", "level": 1}\n')
    assert read_problems(path)[0].answer == "4"

    def write(*records: dict) -> Path:
        path.write_text("".join(json.dumps({"question": "q", "answer": "4", **r}) + "\n" for r in records))
        return path

    for level in (None, [1], "hard", 2.9, True):  # 2.9 was read as level 2
        with pytest.raises(ValueError, match=r"p.jsonl:2: 'level' must be an integer, got"):
            read_problems(write({}, {"level": level}))
    with pytest.raises(ValueError, match="p.jsonl:1: 'family' must be a string"):
        read_problems(write({"family": None}))
    with pytest.raises(ValueError, match="p.jsonl:3: id '1' repeats line 1's"):
        read_problems(write({"id": "1"}, {}, {"id": 1}))
    with pytest.raises(ValueError, match="p.jsonl:2: id '1' repeats line 1's"):
        read_problems(write({}, {"id": 1}))  # a record with no id has its line number
    with pytest.raises(ValueError, match="p.jsonl: no problems"):
        read_problems(write())
    problem = read_problems(write({"id": "x", "level": 3, "family": "f"}))[0]
    assert (problem.uid, problem.level, problem.family) == ("x", 3, "f")


def test_demo_quick_runs_every_stage_and_reuses_them(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    outcome = run_demo(out, DemoSettings.quick(), progress=False)
    for name in ("report.md", "results.json", "accuracy_vs_tokens.png", "think_rate.png"):
        assert (out / name).is_file(), name
    assert DemoSettings.load(out / "settings.json") == DemoSettings.quick()
    report = (out / "report.md").read_text()
    assert "By family and level" in report
    assert "- thinking exactly where the direct answer is wrong: " in report, "the routing summary"
    results = outcome["eval"]["results"]
    assert set(results) == {"no_think", "think", "auto"}
    assert results["think"]["overall"]["think_rate"] == 1.0, "think mode always thinks"
    assert results["no_think"]["overall"]["think_rate"] == 0.0, "no_think never thinks"
    rl = outcome["grpo"]
    assert set(rl["results"]) == {"no_think", "think", "auto"} and rl["summary"]["steps"] == 2
    assert "think accuracy after RL not more than 2 points below SFT's" in rl["targets"]
    assert "## After GRPO" in report and "| GRPO + evaluation |" in report
    assert (out / "grpo" / "model" / "model.safetensors").is_file()
    fusion = outcome["fusion"]
    kept = fusion["short"] + fusion["checked"] + fusion["long"]
    assert kept + fusion["dropped"] == fusion["total"] == 48
    assert len((out / "fusion" / "fused.jsonl").read_text().splitlines()) == kept

    # An adaptive SFT interrupted at step 6 of 10 resumes there on a re-run, to the same weights.
    stage = out / "sft-adaptive"
    finished = load_file(stage / "model" / "model.safetensors")
    (stage / "done.json").unlink()
    shutil.rmtree(stage / "model")
    run_sft(SFTRecipe.load(stage / "sft_recipe.yaml"), progress=False, overwrite=True, stop_at=6)
    capsys.readouterr()
    run_demo(out, DemoSettings.quick(), progress=False)
    printed = capsys.readouterr().out
    assert (
        printed.count("reusing") == 3
        and f"resuming from {stage / 'checkpoints' / 'step-00000006'}" in printed
    )
    resumed = load_file(stage / "model" / "model.safetensors")
    assert all(torch.equal(finished[name], resumed[name]) for name in finished)

    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 6, printed
    assert json.loads((out / "results.json").read_text())["eval"]["targets"]

    # Stage II (stage 7) on top: the six stages reused, instruction following measured before and after.
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--with-stage2"]) == 0
    assert capsys.readouterr().out.count("reusing") == 6
    following = json.loads((out / "results.json").read_text())["grpo-general"]["instructions"]
    assert following["before"]["n"] == following["after"]["n"] == 8
    assert "## After GRPO Stage II" in (out / "report.md").read_text()


def test_demo_settings_are_checked_before_any_stage_runs(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="adaptive_from"):
        DemoSettings(adaptive_from="teacher")
    with pytest.raises(ValueError, match="adaptive_loss"):
        DemoSettings(adaptive_loss="mean")
    with pytest.raises(ValueError, match="fusion_check_share"):
        DemoSettings(fusion_check_share=1.5)
    changed = DemoSettings().with_overrides(["adaptive_loss=token", "adaptive_steps=800", "levels=[1, 2]"])
    assert (changed.adaptive_loss, changed.adaptive_steps, changed.levels) == ("token", 800, (1, 2))
    assert DemoSettings().with_overrides(["sft_lr=1"]).sft_lr == 1.0
    assert DemoSettings().with_overrides(["levels.0=2"]).levels == (2, 2, 3, 4), "list items by index"
    for bad, message in (
        ("adaptive_stepz=3", r"unknown key 'adaptive_stepz'; valid keys: \['families'"),
        ("adaptive_steps=many", r"adaptive_steps: expected int, got 'many'"),
        ("levels=[1, two]", r"levels\[1\]: expected int, got 'two'"),
        ("adaptive_loss", r"must look like key=value"),
        ("adaptive_loss=mean", r"adaptive_loss: expected one of \['token', 'sequence'\], got 'mean'"),
        ("families=[add, sort]", r"unknown task family 'sort'"),
        ("levels=[]", r"levels must not be empty"),
        ("adaptive_steps=0", r"adaptive_steps must be >= 1, got 0"),
        ("eval_per_level=0", r"eval_per_level must be >= 1, got 0"),
        ("max_tokens=0", r"max_tokens must be >= 1, got 0"),
        ("short_problems=0", r"short_problems must be >= 1, got 0"),
        ("fusion_samples=-1", r"fusion_samples must be >= 0, got -1"),
        ("general_chats=-1", r"general_chats must be >= 0, got -1"),
        ("fusion_temperature=-0.5", r"fusion_temperature must be >= 0, got -0\.5"),
        ("fusion_temperature=.inf", r"fusion_temperature: expected a finite float, got inf"),
        ("sft_lr=0", r"sft_lr must be > 0, got 0\.0"),
        ("sft_lr=.nan", r"sft_lr: expected a finite float, got nan"),
        ("sft_lr=fast", r"sft_lr: expected float, got 'fast'"),
        ("fusion_check_share=.nan", r"fusion_check_share: expected a finite float, got nan"),
    ):
        with pytest.raises(ValueError, match=message):
            DemoSettings().with_overrides([bad])
    # YAML reads 1e-3 (no dot) as a string: a number all the same.
    changed = DemoSettings().with_overrides(["sft_lr=1e-3", "fusion_temperature=5e-1", "fusion_samples=0"])
    assert (changed.sft_lr, changed.fusion_temperature, changed.fusion_samples) == (0.001, 0.5, 0)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--check-share", "2", "--no-progress"]) != 0
    assert "fusion_check_share must be in [0, 1]" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), "short_steps=-", "--no-progress"]) != 0
    assert "short_steps: expected int" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(out), "eval_per_level=0", "--no-progress"]) != 0
    assert "eval_per_level must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists(), "nothing ran"


def test_demo_check_share_help_gives_the_defaults() -> None:
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    (action,) = [a for a in demo._actions if a.dest == "check_share"]
    default, quick = DemoSettings().fusion_check_share, DemoSettings.quick().fusion_check_share
    assert f"default {default:g}, {quick:g} with --quick" in action.help


def test_the_adaptive_sft_recipe_file_is_the_demos_stage() -> None:
    recipe = SFTRecipe.load(Path(__file__).resolve().parents[1] / "recipes" / "sft-adaptive.yaml")
    assert recipe == adaptive_sft_recipe(DemoSettings(), Path("runs/demo"))
