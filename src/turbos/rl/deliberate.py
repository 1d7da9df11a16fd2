"""Multi-round deliberation learning (report §3.3).

One round: the SFT model and one or more rival models answer the same prompts; a panel of judges
compares every (model, rival) pair of replies on several dimensions; a consensus rule turns the
panel's votes into one preference per dimension, and a weighted sum over the dimensions into the
pair's outcome (the model wins, ties or loses). The outcomes, per prompt category, are the model's
weakness profile; the prompts it lost (or got wrong) become targeted "loss data" drawn toward the
weak categories, and SFT on that data gives the model of the next round, which is profiled again.

Prompts are built-in problems of the **train** split (the test split stays held out for
``turbos eval``), balanced over families and levels; a prompt's category is ``"{family} L{level}"``.
Round ``r`` profiles on the problems of seed ``seed + r``, so each profile is measured on prompts
the model was not fine-tuned on in the round before (the final profile uses ``seed + rounds``).

Dimensions (``DIMENSIONS``) and the rule-based judge (``RuleJudge``, deterministic). These are
*proxies*: cheap, reproducible stand-ins for what a human or model judge would score, good enough
for verifiable problems with a known answer; they are not measures of real helpfulness or safety.

- accuracy: the reply's final answer (``turbos.rl.verifier.final_answer``: the last ``Answer:``
  line, else the last ``\\boxed{}``) matches the problem's (``answers_match``): 1 or 0; the
  correct reply is preferred.
- helpfulness: accuracy-weighted: 2 for a correct reply that explains (any text besides its answer
  line, reasoning included), 1 for a correct bare answer, 0 for a wrong one.
- harmlessness: 1 unless the reply contains one of a small list of banned strings
  (``BANNED_STRINGS``, case-insensitive; the judge takes its own list).
- coherence: the reply's word 4-gram ``repetition_rate`` (``turbos.rl.aggregate``): the lower wins
  when the two differ by more than ``repetition_tolerance``; an empty reply counts as rate 1.
- conciseness: only between equally accurate replies (else a tie: a short wrong answer is not
  "concise"), the shorter one (characters, reasoning included) wins when the longer is more than
  ``length_tolerance`` (relative) longer.
- instruction_adherence: the reply has a final ``Answer:`` line with a value (the format every
  built-in prompt asks for); the one that has it is preferred.

A model judge (``ModelJudge``: ``turbos.rl.judge.Judge``, pairwise with position swap, on the
replies' answers) can join the panel: its overall verdict is its vote on each of its dimensions
(default: all but accuracy, which the verifier decides); a verdict that failed is an abstention.

Consensus (``consensus``): per dimension, the votes (+1 the model's reply is better, 0 tie, -1 the
rival's) of the judges that voted; ``"majority"``: the option (+1, 0 or -1) with the most votes, a
tie between the top options (or no vote) giving 0; ``"weighted"``: the sign of the sum of
``judge weight x vote``. A pair's outcome is the sign of the sum over dimensions of
``dimension weight x consensus`` (``DEFAULT_DIMENSION_WEIGHTS``: accuracy 2, the others 1).

Profile (``build_profile``): per category, the model's accuracy and, against each rival, its win,
tie and loss counts and rates; ``score`` = (wins - losses) / pairs over all rivals; the weakest
category has the lowest score (tie-break: lower accuracy, then name). Written as JSON, a markdown
table and a PNG bar chart.

Loss data (``loss_data``): one target per prompt the model lost against some rival, or got wrong:
the reply of a rival that beat it and is correct (the one with the best outcome margin, then rival
order), else the built-in teacher's verified step-by-step solution in the fused-data format of the
demo (``<think>\\nsteps\\n</think>\\nAnswer: X``, ``turbos.post.cot_fusion.long_response``).
Categories get quotas in proportion to their weakness ((1 - score) / 2) out of a budget (default:
every candidate), each capped by what the category has; plus ``keep_share`` x (loss records) of
the model's own correct, unbeaten replies, against forgetting. Replies are written in the fused
format (``<think>reasoning</think>answer``; ``<think></think>answer`` without reasoning), records
deduplicated, each with its category, source and kind in its ``meta`` field (``read_conversations``
reads only ``messages``, like the demo's fused data).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from turbos.data.tasks import Problem, extract_answer, generate_problems, verify
from turbos.data.tasks.generate import _resolve
from turbos.post.chat_data import write_records
from turbos.rl.aggregate import repetition_rate
from turbos.rl.verifier import answers_match, final_answer

if TYPE_CHECKING:
    from turbos.rl.judge import Judge

DIMENSIONS = (
    "accuracy",
    "helpfulness",
    "harmlessness",
    "coherence",
    "conciseness",
    "instruction_adherence",
)
DEFAULT_DIMENSION_WEIGHTS = {d: (2.0 if d == "accuracy" else 1.0) for d in DIMENSIONS}
BANNED_STRINGS = (
    "kill yourself",
    "build a bomb",
    "make a bomb",
    "credit card number",
    "social security number",
    "<script",
    "rm -rf /",
)
CONSENSUS_RULES = ("majority", "weighted")
Vote = int  # +1: the model's reply is better, 0: tie, -1: the rival's is better


def category_of(problem: Problem) -> str:
    return f"{problem.family} L{problem.level}"


def deliberation_problems(
    per_category: int,
    families: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    seed: int = 0,
) -> list[Problem]:
    """``per_category`` train-split problems of every (family, level), balanced."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    cells = len(_resolve(families, levels))
    return generate_problems(per_category * cells, families=families, levels=levels, split="train", seed=seed)


# ------------------------------------------------------------------------------------ contestants
def split_reply(reply: str) -> tuple[str, str]:
    """(reasoning, answer part) of a reply; reasoning "" without a think block."""
    from turbos.serve.reasoning import parse_reasoning

    reasoning, content = parse_reasoning(reply, "auto")
    return (reasoning or "").strip(), content.strip()


def with_reasoning(reasoning: str, content: str) -> str:
    """A contestant's reply: ``<think>\\nreasoning\\n</think>\\nanswer``, or the answer alone."""
    reasoning = reasoning.strip()
    return f"<think>\n{reasoning}\n</think>\n{content}" if reasoning else content


def house_reply(reply: str) -> str:
    """A reply in the fused-data format: ``<think>\\nreasoning\\n</think>\\nanswer``, or
    ``<think></think>answer`` (``cot_fusion.short_form``) when it has no reasoning."""
    from turbos.post.cot_fusion import short_form

    reasoning, content = split_reply(reply)
    return with_reasoning(reasoning, content) if reasoning else short_form(content)


class Contestant:
    """A named answer source: ``answer(questions)`` gives one reply per question (reasoning, when
    any, inside ``<think>...</think>`` before the answer)."""

    name: str = "contestant"

    def answer(self, questions: Sequence[str]) -> list[str]:
        raise NotImplementedError


class ScriptedContestant(Contestant):
    """Replies from a mapping question -> reply (missing: ``default``) or a callable."""

    def __init__(
        self, name: str, replies: Mapping[str, str] | Callable[[str], str], default: str = ""
    ) -> None:
        self.name, self.replies, self.default = name, replies, default

    def answer(self, questions: Sequence[str]) -> list[str]:
        if callable(self.replies):
            return [self.replies(q) for q in questions]
        return [self.replies.get(q, self.default) for q in questions]


class ModelContestant(Contestant):
    """A turbos model directory, answering in-process through ``LLMEngine`` with the chat
    template, in thinking ``mode``, greedy; the engine is loaded per call and freed after."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        name: str | None = None,
        mode: str = "auto",
        max_tokens: int = 256,
        device: str = "auto",
    ) -> None:
        from turbos.serve.chat_template import THINKING_MODES

        if mode not in THINKING_MODES:
            raise ValueError(f"mode must be one of {THINKING_MODES}, got {mode!r}")
        self.model_dir, self.mode, self.max_tokens, self.device = str(model_dir), mode, max_tokens, device
        path = Path(model_dir).resolve()
        self.name = name or (f"{path.parent.name}/{path.name}" if path.name == "model" else path.name)

    def answer(self, questions: Sequence[str]) -> list[str]:
        from turbos.serve import LLMEngine, SamplingParams
        from turbos.serve.chat_template import prepare_chat
        from turbos.serve.reasoning import parse_reasoning

        engine = LLMEngine.from_pretrained(self.model_dir, device=self.device)
        base = SamplingParams(max_tokens=self.max_tokens, temperature=0.0)
        chats = [prepare_chat([{"role": "user", "content": q}], self.mode) for q in questions]
        prompts, params, slots = [], [], []
        for index, chat in enumerate(chats):
            room = engine.max_context - len(engine.encode(chat.text))
            if room >= 1:
                prompts.append(chat.text)
                params.append(chat.sampling_params(base, max_tokens=min(self.max_tokens, room)))
                slots.append(index)
        replies = [""] * len(questions)  # a question leaving no room gets an empty reply
        for index, result in zip(slots, engine.generate(prompts, params) if prompts else [], strict=True):
            reasoning, content = parse_reasoning(result.text, chats[index].mode)
            replies[index] = with_reasoning(reasoning or "", content)
        del engine
        return replies


class EndpointContestant(Contestant):
    """A model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (standard-library
    HTTP, temperature 0); a server's separate ``reasoning_content`` goes inside ``<think>``. A
    failed request raises ``ConnectionError`` (a profile with silent empty replies would lie)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        name: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 256,
        timeout: float = 60.0,
    ) -> None:
        from turbos.rl.judge import ChatEndpoint

        self.endpoint = ChatEndpoint(base_url, model, api_key, timeout, max_tokens)
        self.name = name or model

    def _one(self, question: str) -> str:
        from turbos.rl.judge import RequestFailed

        try:
            message = self.endpoint.message([{"role": "user", "content": question}])
        except RequestFailed as err:
            raise ConnectionError(f"contestant {self.name}: {err.reason}") from None
        return with_reasoning(message.get("reasoning_content") or "", message.get("content") or "")

    def answer(self, questions: Sequence[str]) -> list[str]:
        return [self._one(q) for q in questions]


def contestant_from_spec(spec: str | Contestant, **options: Any) -> Contestant:
    """A contestant from a CLI spec: ``http(s)://HOST[:PORT][/v1]#MODEL`` (an endpoint; model name
    after ``#``, default ``default``) or a model directory; a Contestant is returned as it is."""
    if isinstance(spec, Contestant):
        return spec
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return EndpointContestant(url, model or "default", max_tokens=options.get("max_tokens", 256))
    return ModelContestant(spec, **options)


# ----------------------------------------------------------------------------------------- judges
@dataclass(frozen=True)
class Reply:
    """A reply as the rule judge reads it."""

    text: str
    reasoning: str
    content: str
    correct: bool
    has_answer_line: bool
    explains: bool

    @classmethod
    def of(cls, problem: Problem, text: str) -> Reply:
        from turbos.post.cot_fusion import strip_answer_lines

        reasoning, content = split_reply(text)
        answer = final_answer(content)
        correct = answer is not None and answers_match(answer, problem.answer)
        explanation = "\n".join(p for p in (reasoning, strip_answer_lines(content)) if p).strip()
        return cls(
            text=text,
            reasoning=reasoning,
            content=content,
            correct=correct,
            has_answer_line=extract_answer(content) is not None,
            explains=bool(explanation),
        )


def _sign(x: float) -> Vote:
    return (x > 0) - (x < 0)


class PanelJudge:
    """A panel member: per-dimension votes on a pair (absent dimension: abstains)."""

    name: str = "judge"

    def votes(self, problem: Problem, model: Reply, rival: Reply) -> dict[str, Vote]:
        raise NotImplementedError


class RuleJudge(PanelJudge):
    """The deterministic rule proxies of the module docstring, on ``dimensions``."""

    def __init__(
        self,
        name: str = "rules",
        dimensions: Sequence[str] = DIMENSIONS,
        banned: Sequence[str] = BANNED_STRINGS,
        length_tolerance: float = 0.1,
        repetition_tolerance: float = 0.05,
    ) -> None:
        unknown = set(dimensions) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"unknown dimensions {sorted(unknown)}; choose from {DIMENSIONS}")
        self.name, self.dimensions = name, tuple(dimensions)
        self.banned = tuple(b.lower() for b in banned)
        self.length_tolerance, self.repetition_tolerance = length_tolerance, repetition_tolerance

    def score(self, dimension: str, reply: Reply) -> float:
        """The per-reply score behind the dimensions compared by score (not conciseness)."""
        if dimension == "accuracy":
            return float(reply.correct)
        if dimension == "helpfulness":
            return 0.0 if not reply.correct else (2.0 if reply.explains else 1.0)
        if dimension == "harmlessness":
            text = reply.text.lower()
            return 0.0 if any(b in text for b in self.banned) else 1.0
        if dimension == "instruction_adherence":
            return float(reply.has_answer_line)
        if dimension == "coherence":  # higher is better: minus the repetition rate
            return -(repetition_rate(reply.text) if reply.text.strip() else 1.0)
        raise ValueError(f"no score for {dimension!r}")

    def vote(self, dimension: str, model: Reply, rival: Reply) -> Vote:
        if dimension == "conciseness":
            if model.correct != rival.correct:
                return 0
            a, b = len(model.text.strip()), len(rival.text.strip())
            if max(a, b) <= min(a, b) * (1 + self.length_tolerance):
                return 0
            return 1 if a < b else -1
        diff = self.score(dimension, model) - self.score(dimension, rival)
        if dimension == "coherence" and abs(diff) <= self.repetition_tolerance:
            return 0
        return _sign(diff)

    def votes(self, problem: Problem, model: Reply, rival: Reply) -> dict[str, Vote]:
        return {d: self.vote(d, model, rival) for d in self.dimensions}


class ModelJudge(PanelJudge):
    """``turbos.rl.judge.Judge`` (pairwise, both orders) on the replies' answers: its score for
    the model's reply (> 0.5 better, 0.5 tie, < 0.5 worse) is its vote on each of ``dimensions``;
    no verdict: it abstains."""

    def __init__(
        self,
        judge: Judge,
        name: str = "model-judge",
        dimensions: Sequence[str] = tuple(d for d in DIMENSIONS if d != "accuracy"),
    ) -> None:
        self.judge, self.name, self.dimensions = judge, name, tuple(dimensions)

    def votes(self, problem: Problem, model: Reply, rival: Reply) -> dict[str, Vote]:
        verdict = self.judge.compare(problem.question, model.content, rival.content)
        if verdict.score is None:
            return {}
        return {d: _sign(verdict.score - 0.5) for d in self.dimensions}


def consensus(
    votes: Sequence[tuple[str, Vote]],
    rule: Literal["majority", "weighted"] = "majority",
    judge_weights: Mapping[str, float] | None = None,
) -> Vote:
    """One dimension's consensus of ``(judge name, vote)`` pairs (see the module docstring)."""
    if rule not in CONSENSUS_RULES:
        raise ValueError(f"consensus rule must be one of {CONSENSUS_RULES}, got {rule!r}")
    if not votes:
        return 0
    if rule == "weighted":
        weights = judge_weights or {}
        return _sign(sum(weights.get(name, 1.0) * v for name, v in votes))
    counts = Counter(v for _, v in votes)
    top = max(counts.values())
    leaders = [v for v, c in counts.items() if c == top]
    return leaders[0] if len(leaders) == 1 else 0


def overall_outcome(dims: Mapping[str, Vote], dimension_weights: Mapping[str, float] | None = None) -> Vote:
    """The sign of the weighted sum of the per-dimension consensus votes."""
    weights = {**DEFAULT_DIMENSION_WEIGHTS, **(dimension_weights or {})}
    return _sign(sum(weights.get(d, 1.0) * v for d, v in dims.items()))


@dataclass
class Panel:
    judges: Sequence[PanelJudge] = field(default_factory=lambda: [RuleJudge()])
    rule: Literal["majority", "weighted"] = "majority"
    judge_weights: Mapping[str, float] | None = None
    dimension_weights: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.judges:
            raise ValueError("a panel needs at least one judge")
        if self.rule not in CONSENSUS_RULES:
            raise ValueError(f"consensus rule must be one of {CONSENSUS_RULES}, got {self.rule!r}")
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"judge names must be unique, got {names}")

    def compare(self, problem: Problem, model_text: str, rival_text: str) -> dict[str, Any]:
        """Votes, per-dimension consensus, the overall outcome and a margin (the weighted sum)."""
        model, rival = Reply.of(problem, model_text), Reply.of(problem, rival_text)
        by_judge = {j.name: j.votes(problem, model, rival) for j in self.judges}
        dims = {
            d: consensus(
                [(name, v[d]) for name, v in by_judge.items() if d in v], self.rule, self.judge_weights
            )
            for d in DIMENSIONS
        }
        weights = {**DEFAULT_DIMENSION_WEIGHTS, **(self.dimension_weights or {})}
        margin = sum(weights.get(d, 1.0) * v for d, v in dims.items())
        return {
            "votes": by_judge,
            "dimensions": dims,
            "outcome": _sign(margin),
            "margin": margin,
            "model_correct": model.correct,
            "rival_correct": rival.correct,
        }


# ---------------------------------------------------------------------------------------- profile
@dataclass
class PairResult:
    problem: Problem
    rival: str
    model_reply: str
    rival_reply: str
    verdict: dict[str, Any]

    @property
    def outcome(self) -> Vote:
        return self.verdict["outcome"]

    def row(self) -> dict[str, Any]:
        return {
            "uid": self.problem.uid,
            "category": category_of(self.problem),
            "question": self.problem.question,
            "answer": self.problem.answer,
            "rival": self.rival,
            "model_reply": self.model_reply,
            "rival_reply": self.rival_reply,
            **self.verdict,
        }


def compare_all(
    problems: Sequence[Problem],
    model_replies: Sequence[str],
    rival_replies: Mapping[str, Sequence[str]],
    panel: Panel,
) -> list[PairResult]:
    """Every (problem, rival) pair judged by the panel."""
    pairs = []
    for rival, replies in rival_replies.items():
        if len(replies) != len(problems) or len(model_replies) != len(problems):
            raise ValueError(f"{len(problems)} problems but {len(model_replies)}/{len(replies)} replies")
        for problem, mine, theirs in zip(problems, model_replies, replies, strict=True):
            pairs.append(PairResult(problem, rival, mine, theirs, panel.compare(problem, mine, theirs)))
    return pairs


def build_profile(pairs: Sequence[PairResult]) -> dict[str, Any]:
    """Per category: n prompts, the model's accuracy, per rival wins/ties/losses and rates, the
    overall score (wins - losses) / pairs; plus the weakest category and overall figures."""
    by_cat: dict[str, list[PairResult]] = defaultdict(list)
    for pair in pairs:
        by_cat[category_of(pair.problem)].append(pair)
    categories = {}
    for cat in sorted(by_cat):
        group = by_cat[cat]
        correct = {p.problem.uid: p.verdict["model_correct"] for p in group}
        rivals: dict[str, dict[str, Any]] = {}
        for rival in dict.fromkeys(p.rival for p in group):
            mine = [p for p in group if p.rival == rival]
            n = len(mine)
            wins, losses = sum(p.outcome > 0 for p in mine), sum(p.outcome < 0 for p in mine)
            rivals[rival] = {
                "n": n,
                "wins": wins,
                "ties": n - wins - losses,
                "losses": losses,
                "win_rate": wins / n,
                "loss_rate": losses / n,
                "rival_accuracy": sum(p.verdict["rival_correct"] for p in mine) / n,
            }
        wins = sum(r["wins"] for r in rivals.values())
        losses = sum(r["losses"] for r in rivals.values())
        n_pairs = len(group)
        categories[cat] = {
            "n": len(correct),
            "accuracy": sum(correct.values()) / len(correct),
            "win_rate": wins / n_pairs,
            "loss_rate": losses / n_pairs,
            "score": (wins - losses) / n_pairs,
            "rivals": rivals,
        }
    weakest = min(
        categories, key=lambda c: (categories[c]["score"], categories[c]["accuracy"], c), default=None
    )
    n_pairs = max(len(pairs), 1)
    uids = {p.problem.uid: p.verdict["model_correct"] for p in pairs}
    return {
        "categories": categories,
        "weakest": weakest,
        "overall": {
            "prompts": len(uids),
            "pairs": len(pairs),
            "accuracy": sum(uids.values()) / max(len(uids), 1),
            "win_rate": sum(p.outcome > 0 for p in pairs) / n_pairs,
            "loss_rate": sum(p.outcome < 0 for p in pairs) / n_pairs,
            "score": sum(p.outcome for p in pairs) / n_pairs,
        },
    }


def profile_markdown(profile: dict[str, Any]) -> str:
    """A markdown table: one row per category (the weakest marked), columns per rival."""
    cats = profile["categories"]
    rivals = list(dict.fromkeys(r for c in cats.values() for r in c["rivals"]))
    head = ["category", "n", "accuracy", "score", *(f"vs {r} W/T/L" for r in rivals)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in cats.items():
        cells = [
            f"**{name}** (weakest)" if name == profile["weakest"] else name,
            str(c["n"]),
            f"{c['accuracy'] * 100:.0f}%",
            f"{c['score']:+.2f}",
        ]
        for r in rivals:
            s = c["rivals"].get(r)
            cells.append(f"{s['wins']}/{s['ties']}/{s['losses']}" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    o = profile["overall"]
    lines.append(
        f"\noverall: accuracy {o['accuracy'] * 100:.0f}%, win rate {o['win_rate'] * 100:.0f}%, "
        f"loss rate {o['loss_rate'] * 100:.0f}% over {o['pairs']} pairs"
    )
    return "\n".join(lines) + "\n"


def plot_profile(profile: dict[str, Any], path: str | os.PathLike) -> Path:
    """Grouped bars per category: win rate, loss rate and accuracy of the model."""
    from turbos.train.plots import pyplot, save_figure

    plt = pyplot()
    cats = list(profile["categories"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(cats) + 2), 4))
    width = 0.27
    for k, (key, label) in enumerate(
        (("win_rate", "win rate"), ("loss_rate", "loss rate"), ("accuracy", "accuracy"))
    ):
        xs = [i + (k - 1) * width for i in range(len(cats))]
        ax.bar(xs, [profile["categories"][c][key] for c in cats], width, label=label)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(
        [f"{c}*" if c == profile["weakest"] else c for c in cats], rotation=45, ha="right", fontsize=8
    )
    ax.set_ylim(0, 1.05)
    ax.set_title("deliberation profile (* weakest)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return Path(path)


def write_profile(profile: dict[str, Any], directory: str | os.PathLike) -> dict[str, str]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "profile.json", "markdown": out / "profile.md", "png": out / "profile.png"}
    paths["json"].write_text(json.dumps(profile, indent=2) + "\n")
    paths["markdown"].write_text(profile_markdown(profile))
    plot_profile(profile, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# -------------------------------------------------------------------------------------- loss data
def teacher_target(problem: Problem) -> str:
    """The built-in teacher's step-by-step solution in the fused format, verified."""
    from turbos.post.cot_fusion import BuiltinTeacher, long_response

    target = long_response(problem, [], BuiltinTeacher().continue_reasoning(problem, []))
    if not verify(problem, target):
        raise ValueError(f"the built-in solution of {problem.uid} does not verify")
    return target


def _renders(question: str, reply: str) -> bool:
    """Whether the chat template accepts the conversation (no special-token text inside)."""
    from turbos.serve.chat_template import render_chat

    try:
        render_chat([{"role": "user", "content": question}, {"role": "assistant", "content": reply}])
    except ValueError:
        return False
    return True


def weakness_quotas(profile: dict[str, Any], available: Mapping[str, int], budget: int) -> dict[str, int]:
    """Per category, its share of ``budget`` by weakness ((1 - score) / 2; largest remainder),
    capped by ``available``."""
    weights = {c: (1 - profile["categories"][c]["score"]) / 2 for c in available if available[c] > 0}
    total = sum(weights.values())
    if budget <= 0 or total <= 0:
        return dict.fromkeys(available, 0)
    raw = {c: budget * w / total for c, w in weights.items()}
    quotas = {c: int(v) for c, v in raw.items()}
    for c in sorted(raw, key=lambda c: (-(raw[c] - quotas[c]), c))[: budget - sum(quotas.values())]:
        quotas[c] += 1
    return {c: min(quotas.get(c, 0), n) for c, n in available.items()}


def loss_data(
    pairs: Sequence[PairResult],
    profile: dict[str, Any],
    budget: int | None = None,
    keep_share: float = 0.25,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The SFT records of the module docstring (chat JSONL records with ``meta``)."""
    if not 0 <= keep_share <= 1:
        raise ValueError(f"keep_share must be in [0, 1], got {keep_share}")
    rng = random.Random(seed)
    by_uid: dict[str, list[PairResult]] = defaultdict(list)
    for pair in pairs:
        by_uid[pair.problem.uid].append(pair)
    losses: dict[str, list[dict[str, Any]]] = defaultdict(list)
    keeps: list[dict[str, Any]] = []
    for group in by_uid.values():
        problem = group[0].problem
        cat = category_of(problem)
        lost = any(p.outcome < 0 for p in group) or not group[0].verdict["model_correct"]
        if not lost:
            reply = house_reply(group[0].model_reply)
            if any(p.outcome > 0 for p in group) and _renders(problem.question, reply):
                keeps.append(_record(problem, reply, "self", "keep"))
            continue
        winners = sorted(
            (p for p in group if p.outcome < 0 and p.verdict["rival_correct"]),
            key=lambda p: p.verdict["margin"],
        )
        target, source = None, "teacher"
        for p in winners:
            candidate = house_reply(p.rival_reply)
            if verify(problem, split_reply(candidate)[1]) and _renders(problem.question, candidate):
                target, source = candidate, f"rival:{p.rival}"
                break
        losses[cat].append(_record(problem, target or teacher_target(problem), source, "loss"))
    available = {c: len(v) for c, v in losses.items()}
    quotas = weakness_quotas(profile, available, sum(available.values()) if budget is None else budget)
    records = []
    for cat in sorted(losses):
        records += rng.sample(losses[cat], quotas[cat])
    records += rng.sample(keeps, min(len(keeps), round(keep_share * len(records))))
    seen, unique = set(), []
    for record in records:
        key = json.dumps(record["messages"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


def _record(problem: Problem, reply: str, source: str, kind: str) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": problem.question}, {"role": "assistant", "content": reply}],
        "meta": {
            "category": category_of(problem),
            "family": problem.family,
            "level": problem.level,
            "uid": problem.uid,
            "source": source,
            "kind": kind,
        },
    }


# ---------------------------------------------------------------------------------------- rounds
def profile_round(
    model: Contestant,
    rivals: Sequence[Contestant],
    problems: Sequence[Problem],
    panel: Panel,
    out_dir: str | os.PathLike,
) -> tuple[dict[str, Any], list[PairResult]]:
    """Answer, judge, profile; writes pairs.jsonl and profile.{json,md,png} under ``out_dir``."""
    names = [r.name for r in rivals]
    if len(set(names)) != len(names) or model.name in names:
        raise ValueError(f"contestant names must be unique, got model {model.name!r} and rivals {names}")
    questions = [p.question for p in problems]
    mine = model.answer(questions)
    theirs = {r.name: r.answer(questions) for r in rivals}
    pairs = compare_all(problems, mine, theirs, panel)
    profile = build_profile(pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_records([p.row() for p in pairs], out / "pairs.jsonl")
    profile["files"] = write_profile(profile, out)
    return profile, pairs


def _sft_recipe(
    model_dir: str, data: Path, out: Path, steps: int, batch: int, lr: float, seed: int, device: str
):
    from turbos.post.sft import SFTRecipe

    config = json.loads((Path(model_dir) / "config.json").read_text())
    max_len = min(512, int(config.get("max_position_embeddings", 512)))
    return SFTRecipe(
        model=model_dir,
        data=[{"path": str(data)}],
        output_dir=str(out),
        max_len=max_len,
        batch_size=batch,
        steps=steps,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(max(1, steps // 20), steps - 1),
        seed=seed,
        device=device,
    )


def _improved(before: dict[str, Any], after: dict[str, Any], category: str | None) -> bool | None:
    if category is None or category not in after["categories"]:
        return None
    a, b = before["categories"][category], after["categories"][category]
    return (b["score"], b["accuracy"]) > (a["score"], a["accuracy"])


def deliberate(
    model_dir: str | os.PathLike,
    rivals: Sequence[str | Contestant],
    out_dir: str | os.PathLike,
    rounds: int = 1,
    prompts_per_category: int = 4,
    sft_steps: int = 20,
    seed: int = 0,
    families: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    panel: Panel | None = None,
    mode: str = "auto",
    max_tokens: int = 256,
    sft_batch: int = 8,
    sft_lr: float = 1e-4,
    keep_share: float = 0.25,
    budget: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """``rounds`` rounds of profile -> loss data -> SFT, then a final profile (module docstring).

    Writes ``out_dir/round-R/`` (pairs.jsonl, profile.*, loss_data.jsonl, sft/) and
    ``out_dir/final/`` and ``out_dir/summary.json``; returns the summary: each round's profile,
    loss-data size and SFT result, the final profile, round 0's weakest category and whether it
    improved (score, then accuracy) in the next profile."""
    from turbos.post.sft import run_sft

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    options = {"mode": mode, "max_tokens": max_tokens, "device": device}
    contestants = [contestant_from_spec(r, **options) for r in rivals]
    if not contestants:
        raise ValueError("deliberation needs at least one rival")
    taken = {"model"}
    for index, c in enumerate(contestants):  # rival directories are often all called "model"
        if c.name in taken:
            c.name = f"{c.name}-{index}"
        taken.add(c.name)
    panel = panel or Panel()
    out = Path(out_dir)
    current = str(model_dir)
    summary: dict[str, Any] = {"model": current, "rivals": [c.name for c in contestants], "rounds": []}
    for r in range(rounds + 1):
        final = r == rounds
        directory = out / ("final" if final else f"round-{r}")
        problems = deliberation_problems(prompts_per_category, families, levels, seed + r)
        model = ModelContestant(current, name="model", **options)
        profile, pairs = profile_round(model, contestants, problems, panel, directory)
        if final:
            summary["final"] = {"model": current, "profile": profile}
            break
        records = loss_data(pairs, profile, budget, keep_share, seed + r)
        data_path = directory / "loss_data.jsonl"  # profile_round made the directory
        write_records(records, data_path)
        entry: dict[str, Any] = {
            "round": r,
            "model": current,
            "profile": profile,
            "loss_data": str(data_path),
            "loss_records": len(records),
            "loss_by_category": dict(
                Counter(x["meta"]["category"] for x in records if x["meta"]["kind"] == "loss")
            ),
        }
        if any(x["meta"]["kind"] == "loss" for x in records):
            recipe = _sft_recipe(
                current, data_path, directory / "sft", sft_steps, sft_batch, sft_lr, seed, device
            )
            entry["sft"] = run_sft(recipe, progress=progress, overwrite=True)
            current = entry["sft"]["model_dir"]
        else:
            entry["sft"] = None  # nothing lost: the model goes on unchanged
        summary["rounds"].append(entry)
    profiles = [e["profile"] for e in summary["rounds"]] + [summary["final"]["profile"]]
    weakest = profiles[0]["weakest"]
    summary["weakest_round0"] = weakest
    summary["weakest_improved"] = _improved(profiles[0], profiles[1], weakest)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
