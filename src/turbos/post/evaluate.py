"""Evaluation on reasoning problems in the three thinking modes (report §3.2, Table 5).

For each problem and mode the model answers greedily through the serving engine (the same chat
template and mode handling as ``turbos serve``); we record whether the final answer verifies, how
many tokens it generated, and whether it thought (a non-empty ``<think>`` block). Problems come
from the built-in tasks (test split: never seen in training) or from a user JSONL file of
``{"question": ..., "answer": ...}`` records (answers compared after normalisation).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from turbos.data.jsonl import JsonlError, read_jsonl
from turbos.data.tasks import Problem, generate_problems, normalize_answer, verify
from turbos.serve import LLMEngine, SamplingParams
from turbos.serve.chat_template import THINKING_MODES, prepare_chat
from turbos.serve.reasoning import parse_reasoning


@dataclass
class Answer:
    problem: Problem
    mode: str
    text: str
    correct: bool
    tokens: int
    thought: bool

    def row(self) -> dict[str, Any]:
        """A JSON-ready record (the demo's ``eval/answers.jsonl``; ``turbos.post.routing.paired``)."""
        p = self.problem
        return {
            "uid": p.uid,
            "family": p.family,
            "level": p.level,
            "mode": self.mode,
            "correct": self.correct,
            "tokens": self.tokens,
            "thought": self.thought,
            "question": p.question,
            "text": self.text,
        }


def read_problems(path: str | os.PathLike) -> list[Problem]:
    """User problems: JSONL with ``question`` and ``answer`` (optional integer ``level``, string
    ``family``, and ``id``, a string or an integer, unique; default the line number). ValueError
    naming the file and line for a bad record, and for a file with no problems."""
    problems, lines_of = [], {}
    for number, record in read_jsonl(path, "problems"):
        if not all(isinstance(record.get(k), str) for k in ("question", "answer")):
            raise JsonlError(path, number, "need string fields 'question' and 'answer'")
        level, family, uid = record.get("level", 0), record.get("family", "user"), record.get("id", number)
        if type(level) is not int:
            raise JsonlError(path, number, f"'level' must be an integer, got {level!r}")
        if not isinstance(family, str):
            raise JsonlError(path, number, f"'family' must be a string, got {family!r}")
        if type(uid) not in (int, str):
            raise JsonlError(path, number, f"'id' must be a string or an integer, got {uid!r}")
        if str(uid) in lines_of:
            raise JsonlError(
                path,
                number,
                f"id {str(uid)!r} repeats line {lines_of[str(uid)]}'s "
                "(a record with no id has its line number)",
            )
        lines_of[str(uid)] = number
        problems.append(
            Problem(
                family=family,
                level=level,
                question=record["question"],
                answer=normalize_answer(record["answer"]),
                steps=(),
                uid=str(uid),
            )
        )
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def builtin_problems(n: int, families: Sequence[str] | None, levels: Sequence[int] | None, seed: int = 0):
    """Held-out built-in problems (test split), balanced over families x levels."""
    return generate_problems(n, families=families, levels=levels, split="test", seed=seed)


def answer_problems(
    engine: LLMEngine,
    problems: Sequence[Problem],
    mode: str,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[Answer]:
    """Answers to every problem in one thinking mode, batched by the engine: greedy by default,
    else sampled at ``temperature`` (problem i seeded with ``seed`` + i, so reproducible)."""
    if mode not in THINKING_MODES:
        raise ValueError(f"mode must be one of {THINKING_MODES}, got {mode!r}")
    base = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    prompts, params = [], []
    for index, problem in enumerate(problems):
        chat = prepare_chat([{"role": "user", "content": problem.question}], mode)
        prompts.append(chat.text)
        params.append(chat.sampling_params(base, seed=seed + index if temperature > 0 else None))
    answers = []
    for problem, result in zip(problems, engine.generate(prompts, params), strict=True):
        reasoning, content = parse_reasoning(result.text, mode)
        answers.append(
            Answer(
                problem=problem,
                mode=mode,
                text=result.text,
                correct=verify(problem, content),
                tokens=len(result.token_ids),
                thought=bool(reasoning and reasoning.strip()),
            )
        )
    return answers


def summarize(answers: Sequence[Answer]) -> dict[str, Any]:
    """Accuracy, mean generated tokens and thinking rate: overall, per level, and per family and
    level (keys like ``"add 2"``)."""

    def stats(group: Sequence[Answer]) -> dict[str, float]:
        n = max(len(group), 1)
        return {
            "n": len(group),
            "accuracy": sum(a.correct for a in group) / n,
            "mean_tokens": sum(a.tokens for a in group) / n,
            "think_rate": sum(a.thought for a in group) / n,
        }

    by_level: dict[int, list[Answer]] = defaultdict(list)
    by_family_level: dict[tuple[str, int], list[Answer]] = defaultdict(list)
    for a in answers:
        by_level[a.problem.level].append(a)
        by_family_level[a.problem.family, a.problem.level].append(a)
    return {
        "overall": stats(answers),
        "by_level": {str(k): stats(v) for k, v in sorted(by_level.items())},
        "by_family_level": {f"{f} {k}": stats(v) for (f, k), v in sorted(by_family_level.items())},
    }


def repeated_answers(
    engine: LLMEngine,
    problems: Sequence[Problem],
    samples: int = 0,
    temperature: float = 0.7,
    seed: int = 0,
    max_tokens: int = 24,
) -> list[list[str]]:
    """Per problem, the model's greedy answer (auto mode) then ``samples`` sampled ones: the input
    of CoT fusion (``turbos.post.cot_fusion.fuse_dataset``)."""
    runs = [answer_problems(engine, problems, "auto", max_tokens)]
    for k in range(samples):
        start = seed + (k + 1) * len(problems)
        runs.append(answer_problems(engine, problems, "auto", max_tokens, temperature, start))
    return [[run[i].text for run in runs] for i in range(len(problems))]


def evaluate_modes(
    engine: LLMEngine,
    problems: Sequence[Problem],
    modes: Sequence[str] = THINKING_MODES,
    max_tokens: int = 256,
) -> tuple[dict[str, Any], list[Answer]]:
    """{mode: summary} and every answer, for each mode."""
    results, everything = {}, []
    for mode in modes:
        answers = answer_problems(engine, problems, mode, max_tokens)
        results[mode] = summarize(answers)
        everything += answers
    return results, everything


def format_table(results: dict[str, Any], by: str = "level") -> str:
    """A plain-text table: one row per level (``by="level"``) or per family and level
    (``by="family_level"``), columns accuracy / tokens / think rate per mode."""
    if by not in ("level", "family_level"):
        raise ValueError(f"by must be 'level' or 'family_level', got {by!r}")
    modes = list(results)
    groups = list(next(iter(results.values()))[f"by_{by}"])
    label = by.replace("_", " ")
    width = max(len(g) for g in [*groups, "overall", label]) + 1
    head = label.ljust(width) + "".join(f"| {m:^26} " for m in modes)
    sub = " " * width + "".join("|   acc  tokens  thinks    " for _ in modes)
    lines = [head, sub, "-" * len(head)]
    for group in [*groups, "overall"]:
        row = group.ljust(width)
        for m in modes:
            s = results[m]["overall"] if group == "overall" else results[m][f"by_{by}"][group]
            row += f"| {s['accuracy'] * 100:5.1f}% {s['mean_tokens']:7.1f} {s['think_rate'] * 100:6.1f}%    "
        lines.append(row)
    return "\n".join(lines)


def evaluate_instructions(
    engine: LLMEngine, instructions: Sequence[Any], mode: str = "auto", max_tokens: int = 200
) -> dict[str, float]:
    """Instruction following (``turbos.rl.instructions``, IFEval's two scores): the share of
    prompts whose reply meets every constraint, and the share of constraints met; greedy."""
    from turbos.rl.instructions import check_all

    base = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    chats = [prepare_chat([{"role": "user", "content": i.prompt}], mode) for i in instructions]
    results = engine.generate([c.text for c in chats], [c.sampling_params(base) for c in chats])
    met = []
    for inst, result in zip(instructions, results, strict=True):
        _, content = parse_reasoning(result.text, mode)
        met.append(check_all(content, inst.constraints))
    return {
        "n": len(met),
        "prompt_accuracy": sum(all(m) for m in met) / max(len(met), 1),
        "constraint_accuracy": sum(map(sum, met)) / max(sum(map(len, met)), 1),
    }
