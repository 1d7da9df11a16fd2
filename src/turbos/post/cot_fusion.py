"""Adaptive long-short chain-of-thought fusion, SFT part (report §3.2.1).

1. A short-CoT model answers every reasoning problem; the problem's verifier checks the answer.
   Optionally it answers several times (greedy, then samples) and only a problem it gets right
   every time counts as solved, so lucky guesses do not teach the adaptive model to skip thinking.
2. Correct: the training response is the short answer as the model wrote it, after an empty
   ``<think></think>`` block. Every fused response opens a think block, so the model's first
   decision is whether to close it at once; ``no_think`` inference primes exactly that empty
   block (``turbos.serve.chat_template``), which the model has then seen in training.
3. Wrong: a teacher sees the question and the failed attempt(s) and continues reasoning, with
   reflection on the mistake, until it reaches the verified answer; a wrong continuation becomes
   one more failed attempt and the teacher goes again (up to ``max_rounds``). The training
   response is every failed attempt followed by the correct continuation, inside ``<think>``,
   then the final answer::

       <think>
       Answer: 41                       <- the short model's failed attempt
       That is not right. Let me work it out step by step.
       8+9+0=17, write 7 carry 1: 7     <- the teacher's continuation (house style)
       ...
       </think>
       Answer: 1357

A correct short answer becomes ``<think></think>Answer: 42``. A short-model reply that opened a
think block of its own is judged, and kept, by its answer alone (after ``</think>``): a right one
becomes the same ``<think></think>Answer: 42``, and a wrong one's reasoning is not carried into
the failed attempt, which is only its answer. Optionally (``check_share``) a share
of the solved problems instead get a think block that checks the right attempt and confirms it::

    <think>
    Answer: 1357
    Let me check it step by step.
    7+0+0=7, write 7 carry 0: 7         <- the teacher's derivation from scratch
    ...
    </think>
    Answer: 1357

Without these, every think block in the data rejects its first answer, so a model forced to think
(``/think``) on a problem it can answer directly writes the right answer, rejects it and derives a
wrong one. The share is small, so the model's own first choice on such problems stays "answer
directly".

Reasoning data carries no mode prompt (the report stores plain <problem, response> pairs), so the
model learns to decide on its own whether a problem needs thinking.

Teachers are pluggable: ``BuiltinTeacher`` (our step-by-step solver), ``ModelTeacher`` (a turbos
model directory, run in-process), or anything with a ``continue_reasoning(problem, attempts) ->
str`` method, e.g. ``EndpointTeacher`` for any OpenAI-compatible server (a real reasoning model
behind vLLM, or ``turbos serve``). An endpoint reply with no usable text (no choices, no content)
is a failed round like a wrong one; an endpoint that cannot be reached or answers with an error
raises ``TeacherError``, so a long run stops at once rather than dropping every problem.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from turbos.data.tasks import Problem, extract_answer, render_short, verify
from turbos.data.tasks.answers import ANSWER_LINE
from turbos.data.tokenizer import END_THINK_TOKEN, THINK_TOKEN
from turbos.serve.chat_template import prepare_chat
from turbos.serve.reasoning import parse_reasoning
from turbos.serve.sampling import SamplingParams

if TYPE_CHECKING:
    from turbos.serve import LLMEngine

REFLECTION = "That is not right. Let me work it out step by step."
CHECK = "Let me check it step by step."
NO_ANSWER = "(no answer)"
"""A failed attempt with no text of its own (an empty reply), as the teacher is shown it."""


class TeacherError(ConnectionError):
    """The teacher cannot be asked (an endpoint that is unreachable or answers with an error); an
    OSError, so the CLI reports it as one line."""


class Teacher(Protocol):
    """Continues failed attempts with long reasoning that should end in ``Answer: <answer>``;
    with no attempts, reasons from scratch (the derivation of a checked example)."""

    def continue_reasoning(self, problem: Problem, attempts: Sequence[str]) -> str: ...


class BuiltinTeacher:
    """Our exact step-by-step solver: a reflection line (when there are failed attempts), the
    problem's derivation, the answer."""

    def continue_reasoning(self, problem: Problem, attempts: Sequence[str]) -> str:
        reflection = (REFLECTION,) if attempts else ()
        return "\n".join((*reflection, *problem.steps, render_short(problem)))


class EndpointTeacher:
    """A teacher behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    The teacher is shown the question and the failed attempts and asked to continue until the
    right answer, ending with an ``Answer:`` line. Its reasoning (``reasoning_content`` when the
    server separates it) and answer are rewritten into the house style by ``house_style``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout: float = 60.0,
    ) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=1)
        self.base_url, self.model = base_url, model
        self.temperature, self.max_tokens = temperature, max_tokens
        self.empty_replies = 0
        """Replies with no usable text so far (each one a failed round)."""

    def probe(self, problem: Problem) -> None:
        """Ask for one token of ``problem``'s derivation, so that an unreachable endpoint, a wrong
        model name or key fails with ``TeacherError`` before any generation."""
        self._create(teacher_prompt(problem, []), max_tokens=1)

    def continue_reasoning(self, problem: Problem, attempts: Sequence[str]) -> str:
        reply = self._create(teacher_prompt(problem, attempts), self.max_tokens)
        choices = getattr(reply, "choices", None)
        message = getattr(choices[0], "message", None) if isinstance(choices, list) and choices else None
        parts = [getattr(message, name, None) for name in ("reasoning_content", "content")]
        text = house_style(*(part for part in parts if isinstance(part, str)))
        if not text:
            self.empty_replies += 1
        return text

    def _create(self, prompt: str, max_tokens: int) -> Any:
        """The endpoint's reply to ``prompt``; a malformed one is returned as None."""
        import openai

        try:
            return self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=self.temperature,
                max_tokens=max_tokens,
            )
        except openai.APIResponseValidationError:
            return None
        except openai.APIError as err:
            detail = " ".join(str(err).split())[:200]
            raise TeacherError(f"teacher endpoint {self.base_url}: {type(err).__name__}: {detail}") from err


class ModelTeacher:
    """A turbos model directory as the teacher, run in-process (no server): the prompt and the
    house-style rewriting of ``EndpointTeacher``, answered in ``thinking`` mode (default think),
    greedy unless ``temperature`` > 0. A reply gets at most the room the prompt leaves in the
    context; a prompt (grown with the attempts) that leaves none is a failed round ("")."""

    def __init__(
        self, engine: LLMEngine, thinking: str = "think", temperature: float = 0.0, max_tokens: int = 512
    ) -> None:
        self.engine, self.thinking = engine, thinking
        self.params = SamplingParams(temperature=temperature, max_tokens=max_tokens)

    def continue_reasoning(self, problem: Problem, attempts: Sequence[str]) -> str:
        chat = prepare_chat([{"role": "user", "content": teacher_prompt(problem, attempts)}], self.thinking)
        room = self.engine.max_context - len(self.engine.encode(chat.text))
        if room < 1:
            return ""
        params = chat.sampling_params(self.params, max_tokens=min(self.params.max_tokens, room))
        (result,) = self.engine.generate([chat.text], [params])
        return house_style(*parse_reasoning(result.text, chat.mode))


def teacher_prompt(problem: Problem, attempts: Sequence[str]) -> str:
    """What a model teacher is asked: continue the failed attempts to the right answer, or, with
    no attempts, reason from scratch; either way ending with an ``Answer:`` line."""
    if not attempts:
        return f"{problem.question}\n\nReason step by step. End with a line 'Answer: <answer>'."
    tried = "\n".join(f"Attempt {i + 1}:\n{a.strip()}" for i, a in enumerate(attempts))
    return (
        f"{problem.question}\n\nEarlier attempts, all wrong:\n{tried}\n\n"
        "Reflect on the mistake, then reason step by step to the correct answer. "
        "End with a line 'Answer: <answer>'."
    )


def house_style(*parts: str | None) -> str:
    """Rewrite a teacher's output (its parts joined, e.g. reasoning and reply) into our style: think
    tags removed, blank lines collapsed, and a single final ``Answer:`` line (the last answer the
    text gives)."""
    text = "\n".join(part for part in parts if part)
    answer = extract_answer(text)
    body = text.replace(THINK_TOKEN, "").replace(END_THINK_TOKEN, "")
    body = ANSWER_LINE.sub("", body)
    lines = [line.rstrip() for line in body.splitlines() if line.strip()]
    if answer is not None:
        lines.append(f"Answer: {answer}")
    return "\n".join(lines)


def strip_answer_lines(text: str) -> str:
    """``text`` without its answer lines (``ANSWER_LINE``) and blank lines."""
    return "\n".join(line for line in ANSWER_LINE.sub("", text).splitlines() if line.strip())


def short_form(answer: str) -> str:
    """A direct answer behind an empty think block."""
    return f"{THINK_TOKEN}{END_THINK_TOKEN}{answer.strip()}"


def long_response(problem: Problem, attempts: Sequence[str], continuation: str) -> str:
    """Failed attempts + the correct continuation inside <think>, then the final answer."""
    thoughts = [a.strip() for a in attempts] + [strip_answer_lines(continuation)]
    return f"{THINK_TOKEN}\n" + "\n".join(thoughts) + f"\n{END_THINK_TOKEN}\n" + render_short(problem)


@dataclass
class FusedExample:
    problem: Problem
    response: str
    thought: bool
    """True when the response carries long reasoning (a fused or a checked example)."""
    teacher_rounds: int
    checked: bool = False
    """True for a solved problem whose right attempt is checked in a think block."""

    def to_record(self) -> dict:
        """One SFT JSONL record: a plain <problem, response> chat, no mode prompt."""
        return {
            "messages": [
                {"role": "user", "content": self.problem.question},
                {"role": "assistant", "content": self.response},
            ],
            "meta": {
                "family": self.problem.family,
                "level": self.problem.level,
                "uid": self.problem.uid,
                "thought": self.thought,
                "teacher_rounds": self.teacher_rounds,
                "checked": self.checked,
            },
        }


def fuse_example(
    problem: Problem,
    short_response: str | Sequence[str],
    teacher: Teacher,
    max_rounds: int = 3,
    check: bool = False,
) -> FusedExample | None:
    """The fused training example for one problem, or None when the teacher never got it right.

    ``short_response`` may be several answers of the short model to the problem (e.g. greedy then
    samples): the problem counts as solved only when every one is right (a reliable skill, not a
    lucky draw); otherwise the first wrong answer is the failed attempt the teacher continues.
    The response kept for a solved problem is the first one; with ``check``, it is followed in a
    think block by the teacher's derivation from scratch, which confirms it (kept short if the
    derivation does not verify). Each response is an ``auto``-mode reply: only its answer (after
    a think block of its own, if any) is verified and kept, and a failed attempt's own reasoning
    is not carried into the fused response.
    """
    replies = [short_response] if isinstance(short_response, str) else list(short_response)
    if not replies:
        raise ValueError(f"no short-model response for {problem.uid}")
    responses = [parse_reasoning(reply, "auto")[1] for reply in replies]
    wrong = [r for r in responses if not verify(problem, r)]
    if not wrong:
        if check:
            derivation = teacher.continue_reasoning(problem, [])
            if verify(problem, derivation):
                response = long_response(problem, [responses[0]], f"{CHECK}\n{derivation}")
                return FusedExample(problem, response, thought=True, teacher_rounds=1, checked=True)
        return FusedExample(problem, short_form(responses[0]), thought=False, teacher_rounds=0)
    attempts = [wrong[0].strip() or NO_ANSWER]
    for round_ in range(1, max_rounds + 1):
        continuation = teacher.continue_reasoning(problem, attempts)
        if verify(problem, continuation):
            return FusedExample(problem, long_response(problem, attempts, continuation), True, round_)
        attempts.append(strip_answer_lines(continuation) or continuation.strip() or NO_ANSWER)
    return None


@dataclass
class FusionStats:
    total: int = 0
    short: int = 0
    checked: int = 0
    long: int = 0
    dropped: int = 0
    by_level: dict[int, Counter] = field(default_factory=dict)

    def add(self, problem: Problem, example: FusedExample | None) -> None:
        if example is None:
            kind = "dropped"
        else:
            kind = "checked" if example.checked else ("long" if example.thought else "short")
        self.total += 1
        setattr(self, kind, getattr(self, kind) + 1)
        self.by_level.setdefault(problem.level, Counter())[kind] += 1

    def to_dict(self) -> dict:
        return {
            "total": self.total,
            "short": self.short,
            "checked": self.checked,
            "long": self.long,
            "dropped": self.dropped,
            "by_level": {str(k): dict(v) for k, v in sorted(self.by_level.items())},
        }


def check_share_value(share: float) -> float:
    """``share`` if it is a valid ``check_share`` (in [0, 1]), else ValueError."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"check_share must be in [0, 1], got {share}")
    return share


def fuse_dataset(
    problems: Sequence[Problem],
    short_responses: Sequence[str | Sequence[str]],
    teacher: Teacher,
    max_rounds: int = 3,
    check_share: float = 0.0,
    seed: int = 0,
) -> tuple[list[FusedExample], FusionStats]:
    """Fuse every problem with its short-model response(s) (see ``fuse_example``); a solved problem
    is checked with probability ``check_share`` (drawn with ``seed``). Returns the examples kept
    and counts."""
    if len(problems) != len(short_responses):
        raise ValueError(f"{len(problems)} problems but {len(short_responses)} short responses")
    check_share_value(check_share)
    rng = random.Random(seed)
    stats, examples = FusionStats(), []
    for problem, response in zip(problems, short_responses, strict=True):
        check = rng.random() < check_share
        example = fuse_example(problem, response, teacher, max_rounds, check)
        stats.add(problem, example)
        if example is not None:
            examples.append(example)
    return examples, stats


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def check_output(path: str | os.PathLike) -> Path:
    """``path`` as a Path if ``write_jsonl`` can write it (checked by creating and removing its
    temporary file), else OSError naming it: to call before hours of generation."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output {str(path)!r} is a directory")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output {str(path)!r}: no directory {str(path.parent)!r}")
    _partial(path).touch()
    _partial(path).unlink()
    return path


def write_jsonl(examples: Sequence[FusedExample], path: str | os.PathLike) -> None:
    """One SFT record per line, written atomically (a temporary file beside ``path``, renamed over
    it), so a failure never leaves a partial file."""
    path = Path(path)
    partial = _partial(path)
    try:
        with partial.open("w") as f:
            f.writelines(json.dumps(example.to_record()) + "\n" for example in examples)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
