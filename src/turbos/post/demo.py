"""`turbos demo`: the TurboS pipeline in miniature on built-in data (report §2-§3.2.1).

Stages, each in its own folder under the output directory. A finished stage (its ``done.json``
exists) is reused on a re-run unless ``fresh``, or the settings it depends on changed, or an
earlier stage was redone. A training stage (1, 2, 4) saves checkpoints; one that was interrupted
resumes from its latest checkpoint when re-run with the same settings.

1. ``pretrain``: the `tiny` recipe (WSD, annealing, long-context stages) on built-in text.
2. ``sft-short``: SFT of the pre-trained model on problems with bare answers: the short-CoT model.
3. ``fusion``: the short model answers every problem (greedy, plus ``fusion_samples`` samples);
   problems it always gets right keep its short answer, the others get a wrong attempt followed by
   the built-in teacher's step-by-step continuation inside ``<think>`` (``turbos.post.cot_fusion``).
4. ``sft-adaptive``: SFT of the pre-trained model on the fused data plus general chats.
5. ``eval``: held-out problems by difficulty in the three modes (no_think, think, auto):
   accuracy, mean generated tokens, thinking rate.
6. ``grpo`` (``grpo=false`` skips it): GRPO with the adaptive-CoT rewards from the adaptive SFT
   model (``recipes/grpo-reasoning.yaml``, report §3.2.2 and §3.5), then the evaluation of stage 5
   on the RL model. ``report.md`` puts SFT and RL side by side; ``results.json`` and PNGs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from turbos.data.tasks import generate_problems
from turbos.post.chat_data import general_records, short_cot_records, write_records
from turbos.post.cot_fusion import BuiltinTeacher, fuse_dataset, write_jsonl
from turbos.post.sft import SFTRecipe
from turbos.settings import apply_overrides, check_settings, parse_settings, setting
from turbos.train.loop import Interrupted, deferred_interrupts, signal_number
from turbos.train.plots import pyplot, save_figure

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
RECIPE, GRPO_RECIPE = RECIPES / "tiny.yaml", RECIPES / "grpo-reasoning.yaml"
STAGE2_RECIPE = RECIPES / "grpo-general.yaml"


@dataclass
class DemoSettings:
    families: tuple[str, ...] = setting(("add", "expr"), nonempty=True)
    levels: tuple[int, ...] = setting((1, 2, 3, 4), nonempty=True)
    pretrain_overrides: list[str] = field(default_factory=list)
    """``key.sub=value`` changes to the pre-training recipe (``turbos.train.recipe.load_recipe``)."""
    short_problems: int = setting(4000, ge=1)
    short_steps: int = setting(2000, ge=1)
    fusion_problems: int = setting(3000, ge=1)
    fusion_samples: int = setting(4, ge=0)
    """Sampled answers (temperature ``fusion_temperature``) the short model gives besides its greedy
    one; a problem is "solved" (short response) only when all are right. 0: greedy only."""
    fusion_temperature: float = setting(0.7, ge=0)
    fusion_check_share: float = setting(0.0, ge=0, le=1)
    """Share of solved problems whose right short answer is checked in a think block, so forced
    thinking on easy problems stays in distribution (``turbos.post.cot_fusion``). Off by default,
    as in the report's fusion: 0.1 fixed forced thinking on easy additions in 4 runs of 4, and
    auto then trailed think by 13-20 points (docs/adaptive-cot.md)."""
    general_chats: int = setting(600, ge=0)
    adaptive_steps: int = setting(1000, ge=1)
    adaptive_from: Literal["base", "short"] = "base"
    """Model the adaptive SFT starts from: "base" (the pre-trained model, as the report does) or
    "short" (the short-CoT model, keeping its direct-answer skill; an ablation)."""
    adaptive_loss: Literal["token", "sequence"] = "sequence"
    """Loss normalization of the adaptive SFT (``SFTRecipe.loss_normalization``): "sequence" lets a
    short direct answer count as much as a long fused response; "token" weighs by length."""
    sft_batch: int = setting(32, ge=1)
    sft_lr: float = setting(2e-3, gt=0)
    eval_per_level: int = setting(60, ge=1)
    max_tokens: int = setting(200, ge=1)
    grpo: bool = True
    """Stage 6: GRPO from the adaptive SFT model, then its evaluation."""
    grpo_overrides: list[str] = field(default_factory=list)
    """``key=value`` changes to ``recipes/grpo-reasoning.yaml`` (``turbos.rl.GRPORecipe``)."""
    stage2: bool = False
    """Stage 7 (``--with-stage2``): GRPO Stage II from the stage 6 model, then instruction
    following and reasoning measured on the stage 6 and the stage 7 models."""
    stage2_overrides: list[str] = field(default_factory=list)
    """``key=value`` changes to ``recipes/grpo-general.yaml``."""
    instruction_prompts: int = setting(200, ge=1)
    """Held-out instruction prompts of stage 7's measurement."""
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked before any stage runs, not when the adaptive SFT is reached minutes later.
        check_settings(self, "demo settings")
        generate_problems(0, families=self.families, levels=self.levels)  # unknown ones fail here

    @classmethod
    def load(cls, path: str | Path) -> DemoSettings:
        """The settings a demo run saved (its ``settings.json``)."""
        return parse_settings(cls, json.loads(Path(path).read_text()), "demo settings")

    def replaced(self, changes: dict[str, Any]) -> DemoSettings:
        """A copy with ``changes`` (from JSON or YAML: lists for tuples, and number strings such as
        ``1e-3``, which YAML reads as text, for floats), checked as ``load`` checks them."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return parse_settings(type(self), {**current, **changes}, "demo settings")

    def with_overrides(self, overrides: list[str]) -> DemoSettings:
        """``key=value`` strings (values parsed as YAML), e.g. ``adaptive_loss=token`` or ``levels.0=2``."""
        return self.replaced(apply_overrides(json.loads(json.dumps(asdict(self))), overrides))

    @classmethod
    def quick(cls) -> DemoSettings:
        """Minutes-long settings that check the pipeline runs end to end (not its quality)."""
        return cls(
            pretrain_overrides=[
                "stages.0.steps=12",
                "schedule.warmup_steps=4",
                "stages.1.steps=4",
                "stages.2.steps=2",
                "stages.3.steps=2",
                "eval.interval=10",
                "eval.batches=1",
                "data.tokenizer.max_documents=2000",
            ],
            short_problems=200,
            short_steps=10,
            fusion_problems=48,
            fusion_samples=1,
            fusion_check_share=0.25,
            general_chats=20,
            adaptive_steps=10,
            sft_batch=8,
            eval_per_level=4,
            max_tokens=48,
            grpo_overrides=[
                "steps=2",
                "prompts.problems=24",
                "prompts_per_rollout=4",
                "group_size=4",
                "adaptive.probes=1",
                "max_tokens=48",
                "filter_prompts=false",
            ],
            stage2_overrides=[
                "steps=2",
                "prompts.problems=24",
                "prompts_per_rollout=4",
                "group_size=4",
                "max_tokens=48",
            ],
            instruction_prompts=8,
        )


# The settings each stage depends on (a change redoes that stage and every later one).
STAGE_SETTINGS = {
    "pretrain": ("pretrain_overrides", "seed"),
    "sft-short": ("families", "levels", "short_problems", "short_steps", "sft_batch", "sft_lr"),
    "fusion": (
        "fusion_problems",
        "fusion_samples",
        "fusion_temperature",
        "fusion_check_share",
        "general_chats",
    ),
    "sft-adaptive": ("adaptive_steps", "adaptive_from", "adaptive_loss"),
    "eval": ("eval_per_level", "max_tokens"),
    "grpo": ("grpo", "grpo_overrides"),
    "grpo-general": ("stage2", "stage2_overrides", "instruction_prompts"),
}


def _finished(folder: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's saved result when it finished with these inputs, else None."""
    done = folder / "done.json"
    if not done.exists():
        return None
    result = json.loads(done.read_text())
    return result if result.get("inputs") == inputs else None


def _stage(
    folder: Path, redo: bool, inputs: dict[str, Any], title: str, index: int, count: int, run
) -> tuple[dict, bool]:
    """Run a stage or reuse it; returns (result, whether it ran).

    ``run(resume)``: ``resume`` is True when this stage was started before with the same inputs
    (and no earlier stage was redone since), so its checkpoints may be continued. An interrupt
    becomes an ``Interrupted`` naming the stage and what it saved: running the demo again with the
    same arguments reuses the finished stages and continues this one.
    """
    previous = None if redo else _finished(folder, inputs)
    if previous is not None:
        print(f"[{index}/{count}] {title}: reusing {folder}")
        return previous, False
    print(f"[{index}/{count}] {title} ...", flush=True)
    start = time.perf_counter()
    started = folder / "started.json"
    resume = not redo and started.is_file() and json.loads(started.read_text()) == inputs
    folder.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(inputs, indent=2) + "\n")
    try:
        result = run(resume)
    except KeyboardInterrupt as err:
        raise _stage_interrupted(err, index, count, title) from None
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["inputs"] = inputs
    with deferred_interrupts():  # never half a done.json
        (folder / "done.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{index}/{count}] {title}: done in {result['wall_s']:.0f} s", flush=True)
    return result, True


def _stage_interrupted(err: KeyboardInterrupt, index: int, count: int, title: str) -> Interrupted:
    """An interrupt of stage ``index``, with where its training stopped and what it saved."""
    inner = err if isinstance(err, Interrupted) else Interrupted(signal_number(err))
    where = f"in stage {index}/{count} ({title})" + (f" {inner.where}" if inner.where else "")
    saved = inner.saved or "nothing saved for this stage, which starts again (finished stages are kept)"
    return Interrupted(inner.signum, where, saved, inner.checkpoint)


def _sft_recipe(
    settings: DemoSettings, out: Path, name: str, start: Path, data: list[dict], steps: int, loss: str
) -> SFTRecipe:
    return SFTRecipe(
        model=str(start),
        data=data,
        output_dir=str(out / name),
        max_len=512,
        batch_size=settings.sft_batch,
        steps=steps,
        lr=settings.sft_lr,
        min_lr=settings.sft_lr / 10,
        warmup_steps=max(1, steps // 20),
        seed=settings.seed,
        loss_normalization=loss,
        checkpoint_interval=max(1, steps // 10),
    )


def short_sft_recipe(settings: DemoSettings, out: Path) -> SFTRecipe:
    """Stage 2: the pre-trained model on problems with bare answers."""
    data = [{"path": str(out / "sft-short" / "short_cot.jsonl")}]
    start = out / "pretrain" / "model"
    return _sft_recipe(settings, out, "sft-short", start, data, settings.short_steps, "token")


def adaptive_sft_recipe(settings: DemoSettings, out: Path) -> SFTRecipe:
    """Stage 4: the fused data (weight 4) plus general chats (weight 1); ``recipes/sft-adaptive.yaml``
    is this recipe for ``runs/demo`` with the default settings."""
    data = [
        {"path": str(out / "fusion" / "fused.jsonl"), "weight": 4.0},
        {"path": str(out / "fusion" / "general.jsonl"), "weight": 1.0},
    ]
    start = out / ("pretrain" if settings.adaptive_from == "base" else "sft-short") / "model"
    return _sft_recipe(
        settings, out, "sft-adaptive", start, data, settings.adaptive_steps, settings.adaptive_loss
    )


def grpo_recipe(
    settings: DemoSettings, out: Path, run_dir: Path, seed: int | None = None, stage2: bool = False
):
    """Stage 6: ``recipes/grpo-reasoning.yaml`` on the adaptive SFT model of ``out``, on the
    demo's families in even shares, with ``grpo_overrides``; or with ``stage2``, stage 7:
    ``recipes/grpo-general.yaml`` on the stage 6 model, with ``stage2_overrides``. Both write to
    ``run_dir`` and use the demo's levels and seed (or ``seed``)."""
    from turbos.rl import GRPORecipe

    common = [
        f"output_dir={run_dir}",
        f"seed={settings.seed if seed is None else seed}",
        f"prompts.levels={json.dumps(list(settings.levels))}",
    ]
    if stage2:
        model = out / "grpo" / "model"
        return GRPORecipe.load(STAGE2_RECIPE, [f"model={model}", *common, *settings.stage2_overrides])
    own = [f"prompts.families={json.dumps(list(settings.families))}", "prompts.shares={}"]
    model = out / "sft-adaptive" / "model"
    return GRPORecipe.load(GRPO_RECIPE, [f"model={model}", *common, *own, *settings.grpo_overrides])


def run_demo(out: str | Path, settings: DemoSettings, fresh: bool = False, progress: bool = True) -> dict:
    """Run (or resume) every stage; returns the evaluation results with the target checks."""
    from turbos.model import TurboSForCausalLM
    from turbos.post.sft import export_model, run_sft
    from turbos.serve import LLMEngine
    from turbos.train.checkpoint import latest_checkpoint
    from turbos.train.recipe import load_recipe
    from turbos.train.trainer import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    fams, levels = list(settings.families), list(settings.levels)
    base_model = out / "pretrain" / "model"

    def resume_point(run_dir: Path, resume: bool) -> str | None:
        """The checkpoint an interrupted run of this stage left, else None (start afresh)."""
        latest = latest_checkpoint(run_dir) if resume else None
        if latest is None:
            return None
        print(f"      resuming from {latest}", flush=True)
        return str(latest)

    def pretrain(resume: bool) -> dict:
        if not RECIPE.is_file():
            raise FileNotFoundError(f"the demo needs {RECIPE} (run from a source checkout)")
        run_dir = out / "pretrain"
        overrides = [*settings.pretrain_overrides, f"output_dir={run_dir}", f"seed={settings.seed}"]
        recipe = load_recipe(RECIPE, overrides)
        trainer = Trainer(recipe, resume=resume_point(run_dir, resume), overwrite=True, progress=progress)
        summary = trainer.train()
        from turbos.data.tokenizer import load_tokenizer

        checkpoint = latest_checkpoint(run_dir)
        export_model(TurboSForCausalLM.from_pretrained(checkpoint), load_tokenizer(checkpoint), base_model)
        return {"val_loss": summary["val_loss"], "steps": summary["steps"], "model": str(base_model)}

    def sft(recipe: SFTRecipe, resume: bool) -> dict:
        where = resume_point(Path(recipe.output_dir), resume)
        return run_sft(recipe, progress, resume=where, overwrite=True)

    def short_sft(resume: bool) -> dict:
        problems = generate_problems(
            settings.short_problems, families=fams, levels=levels, seed=settings.seed + 1
        )
        recipe = short_sft_recipe(settings, out)
        write_records(short_cot_records(problems), recipe.data[0].path)
        return sft(recipe, resume)

    def fusion(_resume: bool) -> dict:
        from turbos.post.evaluate import repeated_answers

        engine = LLMEngine.from_pretrained(out / "sft-short" / "model", max_running=64, seed=settings.seed)
        problems = generate_problems(
            settings.fusion_problems, families=fams, levels=levels, seed=settings.seed + 2
        )
        responses = repeated_answers(
            engine, problems, settings.fusion_samples, settings.fusion_temperature, settings.seed
        )
        examples, stats = fuse_dataset(
            problems, responses, BuiltinTeacher(), check_share=settings.fusion_check_share, seed=settings.seed
        )
        write_jsonl(examples, out / "fusion" / "fused.jsonl")
        write_records(
            general_records(settings.general_chats, settings.seed), out / "fusion" / "general.jsonl"
        )
        return stats.to_dict()

    def adaptive_sft(resume: bool) -> dict:
        return sft(adaptive_sft_recipe(settings, out), resume)

    def evaluate(_resume: bool) -> dict:
        return evaluate_adaptive(out / "sft-adaptive" / "model", settings, out / "eval")

    def grpo(resume: bool) -> dict:
        from turbos.rl import run_grpo

        run_dir = out / "grpo"
        recipe = grpo_recipe(settings, out, run_dir)
        summary = run_grpo(recipe, progress=progress, resume=resume_point(run_dir, resume), overwrite=True)
        evaluation = evaluate_adaptive(run_dir / "model", settings, run_dir / "eval")
        return {"summary": summary, **evaluation}

    stages = [
        ("pretrain", "pre-train tiny", pretrain),
        ("sft-short", "short-CoT SFT", short_sft),
        ("fusion", "long-short CoT fusion", fusion),
        ("sft-adaptive", "adaptive SFT", adaptive_sft),
        ("eval", "evaluate no_think / think / auto", evaluate),
    ]

    def stage2(resume: bool) -> dict:
        from turbos.rl import run_grpo

        run_dir = out / "grpo-general"
        recipe = grpo_recipe(settings, out, run_dir, stage2=True)
        before = instruction_following(out / "grpo" / "model", settings)
        summary = run_grpo(recipe, progress=progress, resume=resume_point(run_dir, resume), overwrite=True)
        evaluation = evaluate_adaptive(run_dir / "model", settings, run_dir / "eval")
        after = instruction_following(run_dir / "model", settings)
        return {"summary": summary, "instructions": {"before": before, "after": after}, **evaluation}

    if settings.grpo:
        stages.append(("grpo", "GRPO with adaptive-CoT rewards, then evaluate", grpo))
    if settings.stage2:
        if not settings.grpo:
            raise ValueError("stage2 needs the stage 6 model: set grpo=true too")
        stages.append(("grpo-general", "GRPO Stage II (instruction following), then evaluate", stage2))
    redo = fresh  # a stage redone invalidates every later one
    outcome: dict[str, Any] = {}
    plain = json.loads(json.dumps(asdict(settings)))
    for index, (folder, title, run) in enumerate(stages, 1):
        inputs = {key: plain[key] for key in STAGE_SETTINGS[folder]}
        outcome[folder], ran = _stage(out / folder, redo, inputs, title, index, len(stages), run)
        redo = redo or ran
    final = outcome.get("grpo", outcome["eval"])
    if "grpo" in outcome:
        final["targets"].update(rl_keeps_thinking(outcome["eval"]["results"], final["results"]))
    print("\n" + final["table"])
    for name, target in final["targets"].items():
        print(f"{'met ' if target['met'] else 'MISS'}  {name}: {target['measured']}")
    write_report(out, outcome, settings)
    return outcome


def instruction_following(model_dir: Path, settings: DemoSettings) -> dict[str, float]:
    """Held-out instruction prompts (test split) answered in auto mode, greedy
    (``turbos.post.evaluate.evaluate_instructions``)."""
    from turbos.post.evaluate import evaluate_instructions
    from turbos.rl.instructions import generate_instructions
    from turbos.serve import LLMEngine

    engine = LLMEngine.from_pretrained(model_dir, max_running=64, seed=settings.seed)
    prompts = generate_instructions(settings.instruction_prompts, seed=settings.seed, split="test")
    return evaluate_instructions(engine, prompts, "auto", settings.max_tokens)


def evaluate_adaptive(model_dir: Path, settings: DemoSettings, out: Path) -> dict[str, Any]:
    """Stage 5 on any adaptive model: the held-out problems in no_think, think and auto (greedy).

    Writes ``out/answers.jsonl`` (every answer); returns the results, the target checks and the
    table.
    """
    from turbos.post.evaluate import builtin_problems, evaluate_modes, format_table
    from turbos.serve import LLMEngine

    fams, levels = list(settings.families), list(settings.levels)
    engine = LLMEngine.from_pretrained(model_dir, max_running=64, seed=settings.seed)
    problems = builtin_problems(
        settings.eval_per_level * len(fams) * len(levels), fams, levels, settings.seed
    )
    results, answers = evaluate_modes(engine, problems, ("no_think", "think", "auto"), settings.max_tokens)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "answers.jsonl").open("w") as f:
        f.writelines(json.dumps(a.row()) + "\n" for a in answers)
    return {"results": results, "targets": check_targets(results), "table": format_table(results)}


# The demo's three targets for the adaptive model: think's gain over no_think on the hardest level;
# auto's accuracy drop and token share against think; auto's thinking rates on the hardest and the
# easiest level.
MIN_THINK_GAIN, MAX_DROP, MAX_TOKEN_RATIO = 0.20, 0.03, 0.60
HARDEST_THINK_RATE, EASIEST_THINK_RATE = 0.8, 0.2


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The three claims the demo makes about the adaptive model (adaptive CoT, report §3.2),
    measured on evaluation results by mode."""
    levels = sorted(results["auto"]["by_level"], key=int)
    hard, easy = levels[-1], levels[0]
    think, no_think, auto = results["think"], results["no_think"], results["auto"]
    gain = think["by_level"][hard]["accuracy"] - no_think["by_level"][hard]["accuracy"]
    gap = think["overall"]["accuracy"] - auto["overall"]["accuracy"]
    token_ratio = auto["overall"]["mean_tokens"] / max(think["overall"]["mean_tokens"], 1e-9)
    hard_rate, easy_rate = auto["by_level"][hard]["think_rate"], auto["by_level"][easy]["think_rate"]
    return {
        "think beats no_think by >= 20 points on the hardest level": {
            "met": gain >= MIN_THINK_GAIN,
            "measured": f"{gain * 100:+.1f} points at level {hard}",
            "values": {"think_gain_hardest": gain},
        },
        "auto within 3 points of think overall, with <= 60% of its tokens": {
            "met": gap <= MAX_DROP and token_ratio <= MAX_TOKEN_RATIO,
            "measured": f"auto {gap * -100:+.1f} points vs think, {token_ratio * 100:.0f}% of think's tokens",
            "values": {"auto_minus_think": -gap, "token_ratio": token_ratio},
        },
        "auto thinks on >= 80% of the hardest and <= 20% of the easiest": {
            "met": hard_rate >= HARDEST_THINK_RATE and easy_rate <= EASIEST_THINK_RATE,
            "measured": f"{hard_rate * 100:.0f}% at level {hard}, {easy_rate * 100:.0f}% at level {easy}",
            "values": {"think_rate_hardest": hard_rate, "think_rate_easiest": easy_rate},
        },
    }


MAX_THINK_LOSS = 0.02


def rl_keeps_thinking(sft: dict[str, Any], rl: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The RL stage's own target: think-mode accuracy at most 2 points below the SFT model's."""
    before, after = sft["think"]["overall"]["accuracy"], rl["think"]["overall"]["accuracy"]
    return {
        "think accuracy after RL not more than 2 points below SFT's": {
            "met": after >= before - MAX_THINK_LOSS,
            "measured": f"{after * 100:.1f}% vs {before * 100:.1f}% ({(after - before) * 100:+.1f} points)",
            "values": {"think_rl": after, "think_sft": before},
        }
    }


def family_table(results: dict[str, Any]) -> list[str]:
    """report.md lines with the table by family and level (none for results saved before it)."""
    from turbos.post.evaluate import format_table

    if any("by_family_level" not in r for r in results.values()):
        return []
    return ["By family and level:", "", "```", format_table(results, by="family_level"), "```", ""]


def _targets_table(targets: dict[str, dict[str, Any]]) -> list[str]:
    return [
        "| target | met | measured |",
        "|---|---|---|",
        *[f"| {k} | {'yes' if v['met'] else 'no'} | {v['measured']} |" for k, v in targets.items()],
        "",
    ]


def write_report(out: Path, outcome: dict[str, Any], settings: DemoSettings) -> None:
    """report.md with the stages, the SFT (and RL) tables and targets, plus two PNGs."""
    from turbos.post.routing import routing_report

    evaluation = outcome["eval"]
    rl = outcome.get("grpo")
    models = {"adaptive SFT": evaluation["results"], **({"after GRPO": rl["results"]} if rl else {})}
    final_dir = out / ("grpo/eval" if rl else "eval")
    answers = final_dir / "answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()] if answers.is_file() else []
    (out / "results.json").write_text(json.dumps({k: v for k, v in outcome.items()}, indent=2) + "\n")
    plot_accuracy_vs_tokens(models, out / "accuracy_vs_tokens.png")
    plot_think_rate(models, out / "think_rate.png")
    fusion = outcome["fusion"]
    stages = [
        f"| pre-train tiny | {outcome['pretrain']['wall_s']} | {outcome['pretrain']['steps']} steps, "
        f"val loss {outcome['pretrain']['val_loss']} |",
        f"| short-CoT SFT | {outcome['sft-short']['wall_s']} | final loss "
        f"{outcome['sft-short']['final_loss']:.3f} |",
        f"| CoT fusion | {fusion['wall_s']} | {fusion['short']} short (correct), "
        f"{fusion['checked']} checked (correct), {fusion['long']} long (wrong, fused), "
        f"{fusion['dropped']} dropped |",
        f"| adaptive SFT | {outcome['sft-adaptive']['wall_s']} | final loss "
        f"{outcome['sft-adaptive']['final_loss']:.3f} |",
        f"| evaluation | {evaluation['wall_s']} | held-out test split, greedy |",
    ]
    if rl:
        prompts = rl["summary"].get("prompts", {})
        stages.append(
            f"| GRPO + evaluation | {rl['wall_s']} | {rl['summary']['steps']} updates, "
            f"{rl['summary'].get('rollouts', '?')} rollouts; {prompts.get('kept', '?')} of "
            f"{prompts.get('pool', '?')} prompts kept by the filter |"
        )
    if "grpo-general" in outcome:
        stages.append(
            f"| GRPO Stage II + evaluation | {outcome['grpo-general']['wall_s']} | "
            f"{outcome['grpo-general']['summary']['steps']} updates |"
        )
    total = sum(outcome[k]["wall_s"] for k in outcome)
    lines = [
        "# turbos demo",
        "",
        f"Families {', '.join(settings.families)}; levels {settings.levels[0]}-{settings.levels[-1]}.",
        "",
        "| stage | wall s | notes |",
        "|---|---|---|",
        *stages,
        f"| all | {total:.1f} | |",
        "",
        "## Adaptive SFT",
        "",
        "```",
        evaluation["table"],
        "```",
        "",
        *family_table(evaluation["results"]),
        *_targets_table(evaluation["targets"]),
    ]
    if rl:
        lines += [
            "## After GRPO (report §3.2.2, §3.5)",
            "",
            "```",
            rl["table"],
            "```",
            "",
            *family_table(rl["results"]),
            *_targets_table(rl["targets"]),
        ]
    stage2 = outcome.get("grpo-general")
    if stage2:
        before, after = stage2["instructions"]["before"], stage2["instructions"]["after"]
        lines += [
            "## After GRPO Stage II (instruction following, report §3.5)",
            "",
            "| model | prompts meeting every constraint | constraints met | think | auto |",
            "|---|---|---|---|---|",
            f"| after Stage I | {before['prompt_accuracy'] * 100:.1f}% | "
            f"{before['constraint_accuracy'] * 100:.1f}% | "
            f"{rl['results']['think']['overall']['accuracy'] * 100:.1f}% | "
            f"{rl['results']['auto']['overall']['accuracy'] * 100:.1f}% |",
            f"| after Stage II | {after['prompt_accuracy'] * 100:.1f}% | "
            f"{after['constraint_accuracy'] * 100:.1f}% | "
            f"{stage2['results']['think']['overall']['accuracy'] * 100:.1f}% | "
            f"{stage2['results']['auto']['overall']['accuracy'] * 100:.1f}% |",
            "",
        ]
    lines += [
        *(routing_report(rows) if rows else []),
        "![accuracy vs tokens](accuracy_vs_tokens.png) ![thinking rate](think_rate.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))


MODE_MARKERS = (("no_think", "s"), ("think", "^"), ("auto", "o"))


def plot_accuracy_vs_tokens(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Each mode's overall accuracy against its mean tokens, one marker style per model (hollow
    for the first, filled for the last), an arrow from one to the other."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    names = list(models)
    for m, (mode, marker) in enumerate(MODE_MARKERS):
        points = [models[name][mode]["overall"] for name in names]
        for k, (name, point) in enumerate(zip(names, points, strict=True)):
            filled = k == len(names) - 1
            ax.scatter(
                point["mean_tokens"],
                point["accuracy"] * 100,
                s=80,
                marker=marker,
                facecolors=f"C{m}" if filled else "none",
                edgecolors=f"C{m}",
                label=f"{mode} ({name})",
            )
        if len(points) > 1:
            (a, b) = points[0], points[-1]
            ax.annotate(
                "",
                (b["mean_tokens"], b["accuracy"] * 100),
                (a["mean_tokens"], a["accuracy"] * 100),
                arrowprops={"arrowstyle": "->", "color": f"C{m}", "alpha": 0.6},
            )
    ax.set_xlabel("mean generated tokens")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs tokens by thinking mode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_think_rate(models: dict[str, dict[str, Any]], path: Path) -> None:
    """Accuracy by level per mode (dashed: the first model, solid: the last), and auto mode's
    thinking rate by level, one bar per model."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(models)
    for k, name in enumerate(names):
        results = models[name]
        style = "o-" if k == len(names) - 1 else "o--"
        for m, (mode, _) in enumerate(MODE_MARKERS):
            levels = sorted(results[mode]["by_level"], key=int)
            accuracy = [results[mode]["by_level"][v]["accuracy"] * 100 for v in levels]
            left.plot(levels, accuracy, style, color=f"C{m}", label=f"{mode} ({name})", alpha=0.5 + 0.5 * k)
        auto = results["auto"]["by_level"]
        levels = sorted(auto, key=int)
        width = 0.8 / len(names)
        right.bar(
            [i + (k - (len(names) - 1) / 2) * width for i in range(len(levels))],
            [auto[v]["think_rate"] * 100 for v in levels],
            width,
            label=name,
        )
        right.set_xticks(range(len(levels)), levels)
    left.set_xlabel("difficulty level")
    left.set_ylabel("accuracy (%)")
    left.set_title("Accuracy by level")
    left.legend(fontsize=7)
    right.set_xlabel("difficulty level")
    right.set_ylabel("answers that thought (%)")
    right.set_ylim(0, 100)
    right.set_title("auto mode: thinking rate by level")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save_figure(fig, path)
