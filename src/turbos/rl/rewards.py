"""Rewards for GRPO: a user's reward function or the built-in verifier, and the adaptive-CoT
shaping of report §3.2.2.

A reward function has TRL's signature, ``reward(prompts, completions, **meta) -> list[float]``:
``prompts`` are the user messages, ``completions`` the generated replies (with their
``<think>...</think>`` block, if any), and ``meta`` holds per-sample lists: ``answer`` (the
reference answer), ``family``, ``level``, ``mode`` (how the sample was drawn: ``auto``, or a
depth probe ``think`` / ``no_think``), ``thought`` and ``reasoning`` / ``content`` (the reply
split at ``</think>``). A recipe names one as:

- ``builtin:NAME``: a built-in reward (below);
- ``package.module:function``: a function of an importable module;
- ``http://HOST:PORT/v1/reward`` (or ``https://...``): a reward served over HTTP by
  ``turbos reward serve`` (``turbos.rl.remote.remote_reward``; any failure raises
  ``RemoteRewardError``, never a made-up score).

Built-in rewards (``BUILTIN_REWARDS``), each scoring ``content``:

- ``correct``: 1.0 when the `Answer:` line equals ``answer`` exactly (numbers by value);
- ``verified``: 1.0 when the final answer (`Answer:` line, else the last ``\\boxed{}``) is
  equivalent to ``answer`` (``turbos.rl.verifier``: exact numbers across fractions, decimals and
  percentages, units, LaTeX, lists); a true ``unordered`` in meta compares lists in any order;
- ``code``: 1.0 when the reply's code passes the hidden tests in ``answer``, run in the isolated
  sandbox (the built-in ``code`` family, ``turbos.data.tasks.code``);
- ``instructions``: the fraction of the sample's ``constraints`` (a list of constraint dicts,
  ``turbos.rl.instructions``) the reply meets, or 1.0 / 0.0 (all or none) where meta's
  ``all_or_nothing`` is true; 1.0 for a sample without constraints.

Adaptive-CoT shaping (``adaptive_cot_rewards``), per group of responses to one prompt, with
``correct_i`` = reward_i >= ``success`` and depth_i = long (it thought) or short:

- difficulty from the policy's own samples: the pass rates ``p_long`` and ``p_short`` of its
  long and short responses in the group (free auto-mode samples plus the forced depth probes, the
  online rejection sampling of the report). A prompt "needs long reasoning" when
  ``p_long > p_short + margin``; otherwise short answers "succeed as often" and short is the
  preferred depth. (With no sample of one depth there is no preference.)
- difficulty-adaptive reward: a correct response of the preferred depth earns ``depth_bonus``
  more: long CoT on prompts only long reasoning solves, short answers where they suffice.
- compression reward: among the group's correct long responses, the one with the fewest
  reasoning tokens earns ``compression`` more, the longest nothing, linearly in between
  ("among equally correct responses, shorter reasoning earns more").

    reward_i = base_i + correct_i * (depth_bonus * [depth_i == preferred]
                                     + compression * [long_i] * (L_max - L_i) / (L_max - L_min))

Wrong responses get no bonus, so a prompt neither depth solves teaches nothing about depth.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from turbos.data.tasks import extract_answer, normalize_answer
from turbos.rl.instructions import check_all, constraint_from_dict
from turbos.rl.verifier import answers_match, final_answer

RewardFn = Callable[..., list[float]]


def correct_reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """1.0 when the reply's final answer (after any think block) equals ``answer``, else 0.0."""
    contents, answers = meta["content"], meta["answer"]
    return [
        float(extract_answer(content) == normalize_answer(answer))
        for content, answer in zip(contents, answers, strict=True)
    ]


def verified_reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """1.0 when the reply's final answer is equivalent to ``answer`` (``answers_match``; in any
    order where ``unordered`` is true), else 0.0."""
    contents, answers = meta["content"], meta["answer"]
    unordered = meta.get("unordered") or [False] * len(contents)
    return [
        float(answers_match(final_answer(content) or "", str(answer), unordered=bool(flag)))
        for content, answer, flag in zip(contents, answers, unordered, strict=True)
    ]


def instructions_reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """The fraction of the sample's ``constraints`` the reply meets (all or none where
    ``all_or_nothing`` is true; 1.0 without constraints); ValueError for a malformed constraint."""
    contents, specs = meta["content"], meta["constraints"]
    all_or_none = meta.get("all_or_nothing") or [False] * len(contents)
    rewards = []
    for content, sample_specs, all_or_nothing in zip(contents, specs, all_or_none, strict=True):
        met = check_all(content, [constraint_from_dict(spec) for spec in sample_specs or ()])
        if not met:
            rewards.append(1.0)
        else:
            rewards.append(float(all(met)) if all_or_nothing else sum(met) / len(met))
    return rewards


_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def reply_code(content: str) -> str:
    """The code of a reply: its last fenced block (```python ... ```), else the whole reply."""
    blocks = _FENCE.findall(content)
    return blocks[-1] if blocks else content


@functools.cache
def _shared_sandbox():
    """One sandbox for the code reward (8 runs at a time), made on first use."""
    from turbos.rl.sandbox import Sandbox

    return Sandbox(max_workers=8)


def code_reward(prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """1.0 when the reply's code (``reply_code``) passes the hidden tests in ``answer`` (Python
    asserts, as ``turbos.data.tasks.code.CodeProblem.test_source`` writes them), run in the
    isolated sandbox (``turbos.rl.sandbox``; it refuses to start without isolation), else 0.0."""
    from turbos.rl.sandbox import Program

    programs = [
        Program(reply_code(content), tests=str(tests))
        for content, tests in zip(meta["content"], meta["answer"], strict=True)
    ]
    return [float(bool(result.passed)) for result in _shared_sandbox().run_many(programs)]


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "correct": correct_reward,
    "verified": verified_reward,
    "instructions": instructions_reward,
    "code": code_reward,
}


def load_reward(spec: str | RewardFn) -> RewardFn:
    """A reward function: a callable as is, ``builtin:NAME``, ``package.module:function``, or the
    URL of a remote reward endpoint (``http://...`` / ``https://...``)."""
    if callable(spec):
        return spec
    if spec.startswith(("http://", "https://")):
        from turbos.rl.remote import remote_reward

        return remote_reward(spec)
    where, colon, name = spec.partition(":")
    if not colon or not where or not name:
        raise ValueError(f"reward {spec!r}: expected builtin:NAME or package.module:function")
    if where == "builtin":
        if name not in BUILTIN_REWARDS:
            raise ValueError(f"unknown built-in reward {name!r}; known: {sorted(BUILTIN_REWARDS)}")
        return BUILTIN_REWARDS[name]
    try:
        fn = getattr(importlib.import_module(where), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"reward {spec!r}: cannot import it ({err})") from err
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def call_reward(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str], **meta: Any) -> list[float]:
    """``fn``'s rewards, checked: one finite number per completion."""
    rewards = fn(list(prompts), list(completions), **meta)
    if not isinstance(rewards, Sequence) or len(rewards) != len(completions):
        raise ValueError(
            f"the reward function returned {type(rewards).__name__} of length "
            f"{len(rewards) if isinstance(rewards, Sequence) else '?'}; expected {len(completions)} numbers"
        )
    out = []
    for value in rewards:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(f"the reward function returned {value!r}; rewards must be finite numbers")
        out.append(float(value))
    return out


@dataclass(frozen=True)
class AdaptiveShaping:
    """The adaptive-CoT reward terms (see the module docstring)."""

    depth_bonus: float = 0.5
    compression: float = 0.2
    margin: float = 0.0


def adaptive_cot_rewards(
    base: Sequence[float],
    correct: Sequence[bool],
    thought: Sequence[bool],
    reasoning_tokens: Sequence[int],
    shaping: AdaptiveShaping,
) -> tuple[list[float], dict[str, Any]]:
    """One group's shaped rewards, and what they were judged from: ``p_long``, ``p_short``
    (None without such samples) and the ``preferred`` depth ("long", "short" or None)."""

    def rate(depth: bool) -> float | None:
        picked = [c for c, t in zip(correct, thought, strict=True) if t == depth]
        return sum(picked) / len(picked) if picked else None

    p_long, p_short = rate(True), rate(False)
    preferred = None
    if p_long is not None and p_short is not None:
        preferred = "long" if p_long > p_short + shaping.margin else "short"
    lengths = [n for n, c, t in zip(reasoning_tokens, correct, thought, strict=True) if c and t]
    shortest, longest = (min(lengths), max(lengths)) if lengths else (0, 0)
    rewards = []
    for r, c, t, n in zip(base, correct, thought, reasoning_tokens, strict=True):
        bonus = 0.0
        if c and preferred == ("long" if t else "short"):
            bonus += shaping.depth_bonus
        if c and t and longest > shortest:
            bonus += shaping.compression * (longest - n) / (longest - shortest)
        rewards.append(r + bonus)
    return rewards, {"p_long": p_long, "p_short": p_short, "preferred": preferred}
