"""Instruction following (IFEval style, report §3.4): verifiable constraints on the form of a
reply, the prompts that state them, and a generated family of instruction prompts.

A constraint is a frozen dataclass with an exact ``check(response) -> bool``, ``describe()`` (the
instruction as it is put in a prompt) and ``to_dict()``, its JSON form
(``{"kind": "word_count", "relation": "at_most", "n": 50}``) that ``constraint_from_dict`` reads
back, with a ValueError naming the bad field for a malformed one. The checks, exactly:

- a word is a maximal run of letters, digits and apostrophes (`'`, `’`) holding a letter or a
  digit: `don't` is one word, `well-known` and `3.5` are two;
- ``RequiredWords`` / ``BannedWords`` compare whole words, case-insensitively, with apostrophes at
  a word's ends ignored (`'Cat'` is `cat`, `cat's` is not);
- ``JsonFormat``: the whole response, give or take surrounding whitespace, parses as strict JSON
  (no `NaN`); a code fence around it fails. With ``keys`` it must be an object holding them all;
- ``StartsWith`` / ``EndsWith``: the stripped response starts / ends with the stripped phrase,
  case and punctuation included;
- ``BulletCount``: lines whose first non-blank characters are `- ` or `* ` (so nested bullets
  count, `+ `, `•`, `-item`, `**bold**` and `---` do not);
- ``ParagraphCount``: non-blank blocks separated by blank (or whitespace-only) lines;
- ``Lowercase`` / ``Uppercase``: at least one letter and none of the other case
  (``str.islower`` / ``str.isupper``).

``generate_instructions`` draws a built-in family: base tasks from templates with slots, each with
one to three compatible constraints, and the train / test split of a prompt fixed by the hash of its
text (``turbos.data.tasks.split_of``).
"""

from __future__ import annotations

import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from turbos.data.tasks.generate import MAX_FRUITLESS_DRAWS
from turbos.data.tasks.problem import SPLITS, split_of

WORD = re.compile(r"['’]*[^\W_](?:[^\W_]|['’])*")
"""A word: a maximal run of letters, digits and apostrophes with at least one letter or digit."""
BULLET = re.compile(r"^[ \t]*[-*] ", re.MULTILINE)
RELATIONS = {"at_least": "at least", "at_most": "at most", "exactly": "exactly"}


def words(text: str) -> list[str]:
    """The words of `text` (see ``WORD``)."""
    return WORD.findall(text)


def _word_key(word: str) -> str:
    return word.replace("’", "'").strip("'").casefold()


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _quoted(items: Sequence[str]) -> str:
    quoted = [f'"{item}"' for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


@dataclass(frozen=True)
class Constraint(ABC):
    """A verifiable constraint on a response; ``kind`` names it in its dict form."""

    kind: ClassVar[str]

    @abstractmethod
    def check(self, response: str) -> bool:
        """Whether `response` meets the constraint."""

    @abstractmethod
    def describe(self) -> str:
        """The instruction, as put in a prompt."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able form, ``{"kind": ..., field: value, ...}`` (tuples as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    def _invalid(self, name: str, expected: str) -> ValueError:
        value = getattr(self, name)
        return ValueError(f"constraint {self.kind!r}: field {name!r} must be {expected}, got {value!r}")

    def _require_count(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._invalid(name, "a non-negative integer")

    def _require_phrase(self, name: str) -> None:
        value = getattr(self, name)
        if not isinstance(value, str) or not value.strip():
            raise self._invalid(name, "a non-blank string")

    def _require_strings(self, name: str, *, single_words: bool, allow_empty: bool) -> None:
        """Check a list of strings (stored as a tuple); with `single_words`, each one word."""
        value = getattr(self, name)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise self._invalid(name, "a list of strings")
        items = tuple(value)
        if not items and not allow_empty:
            raise self._invalid(name, "a non-empty list of strings")
        for item in items:
            if not isinstance(item, str) or (single_words and not (WORD.fullmatch(item) and _word_key(item))):
                raise self._invalid(name, "a list of single words" if single_words else "a list of strings")
        object.__setattr__(self, name, items)


@dataclass(frozen=True)
class WordCount(Constraint):
    """At least / at most / exactly ``n`` words."""

    kind: ClassVar[str] = "word_count"
    relation: str
    n: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise self._invalid("relation", f"one of {sorted(RELATIONS)}")
        self._require_count("n")

    def check(self, response: str) -> bool:
        count = len(words(response))
        if self.relation == "at_least":
            return count >= self.n
        if self.relation == "at_most":
            return count <= self.n
        return count == self.n

    def describe(self) -> str:
        return f"Answer with {RELATIONS[self.relation]} {_plural(self.n, 'word')}."


@dataclass(frozen=True)
class JsonFormat(Constraint):
    """The whole response is JSON; with ``keys``, an object holding each of them."""

    kind: ClassVar[str] = "json"
    keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self._require_strings("keys", single_words=False, allow_empty=True)

    def check(self, response: str) -> bool:
        try:
            value = json.loads(response, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return False
        return not self.keys or (isinstance(value, dict) and all(key in value for key in self.keys))

    def describe(self) -> str:
        text = "Your entire response must be valid JSON, with no code fences and no text around it."
        if self.keys:
            noun = "key" if len(self.keys) == 1 else "keys"
            text += f" It must be a JSON object with the {noun} {_quoted(self.keys)}."
        return text


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True)
class RequiredWords(Constraint):
    """Each of ``words`` appears as a whole word (case-insensitive)."""

    kind: ClassVar[str] = "required_words"
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        self._require_strings("words", single_words=True, allow_empty=False)

    def check(self, response: str) -> bool:
        present = {_word_key(word) for word in words(response)}
        return all(_word_key(word) in present for word in self.words)

    def describe(self) -> str:
        noun = "word" if len(self.words) == 1 else "words"
        return f"Include the {noun} {_quoted(self.words)}."


@dataclass(frozen=True)
class BannedWords(Constraint):
    """None of ``words`` appears as a whole word (case-insensitive)."""

    kind: ClassVar[str] = "banned_words"
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        self._require_strings("words", single_words=True, allow_empty=False)

    def check(self, response: str) -> bool:
        present = {_word_key(word) for word in words(response)}
        return not any(_word_key(word) in present for word in self.words)

    def describe(self) -> str:
        noun = "word" if len(self.words) == 1 else "words"
        return f"Do not use the {noun} {_quoted(self.words)}."


@dataclass(frozen=True)
class StartsWith(Constraint):
    """The response starts with ``phrase`` (surrounding whitespace ignored)."""

    kind: ClassVar[str] = "starts_with"
    phrase: str

    def __post_init__(self) -> None:
        self._require_phrase("phrase")

    def check(self, response: str) -> bool:
        return response.strip().startswith(self.phrase.strip())

    def describe(self) -> str:
        return f'Start your response with the exact phrase "{self.phrase.strip()}".'


@dataclass(frozen=True)
class EndsWith(Constraint):
    """The response ends with ``phrase`` (surrounding whitespace ignored)."""

    kind: ClassVar[str] = "ends_with"
    phrase: str

    def __post_init__(self) -> None:
        self._require_phrase("phrase")

    def check(self, response: str) -> bool:
        return response.strip().endswith(self.phrase.strip())

    def describe(self) -> str:
        return f'End your response with the exact phrase "{self.phrase.strip()}", with nothing after it.'


@dataclass(frozen=True)
class BulletCount(Constraint):
    """Exactly ``n`` bullet points (lines starting with `- ` or `* `)."""

    kind: ClassVar[str] = "bullets"
    n: int

    def __post_init__(self) -> None:
        self._require_count("n")

    def check(self, response: str) -> bool:
        return len(BULLET.findall(response)) == self.n

    def describe(self) -> str:
        return f'Use exactly {_plural(self.n, "bullet point")}, each on its own line starting with "- ".'


@dataclass(frozen=True)
class ParagraphCount(Constraint):
    """Exactly ``n`` paragraphs, separated by blank lines."""

    kind: ClassVar[str] = "paragraphs"
    n: int

    def __post_init__(self) -> None:
        self._require_count("n")

    def check(self, response: str) -> bool:
        text = response.replace("\r\n", "\n").replace("\r", "\n")
        return sum(1 for block in re.split(r"\n[ \t]*\n", text) if block.strip()) == self.n

    def describe(self) -> str:
        return f"Write exactly {_plural(self.n, 'paragraph')}, separated from each other by a blank line."


@dataclass(frozen=True)
class Lowercase(Constraint):
    """Letters, all lowercase."""

    kind: ClassVar[str] = "lowercase"

    def check(self, response: str) -> bool:
        return response.islower()

    def describe(self) -> str:
        return "Write your entire response in lowercase letters; no capital letters are allowed."


@dataclass(frozen=True)
class Uppercase(Constraint):
    """Letters, all uppercase."""

    kind: ClassVar[str] = "uppercase"

    def check(self, response: str) -> bool:
        return response.isupper()

    def describe(self) -> str:
        return "Write your entire response in capital letters; no lowercase letters are allowed."


CONSTRAINTS: dict[str, type[Constraint]] = {
    cls.kind: cls
    for cls in (
        WordCount,
        JsonFormat,
        RequiredWords,
        BannedWords,
        StartsWith,
        EndsWith,
        BulletCount,
        ParagraphCount,
        Lowercase,
        Uppercase,
    )
}


def constraint_from_dict(spec: Mapping[str, Any]) -> Constraint:
    """The constraint of a dict form (see ``Constraint.to_dict``); ValueError naming the bad field
    for a spec that is not a dict, lacks ``kind`` or a field, has an unknown one or a bad value."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a constraint spec must be a dict, got {type(spec).__name__}: {spec!r}")
    if "kind" not in spec:
        raise ValueError(f"constraint spec {dict(spec)!r}: missing field 'kind'")
    kind = spec["kind"]
    cls = CONSTRAINTS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"constraint spec: field 'kind' must be one of {sorted(CONSTRAINTS)}, got {kind!r}")
    names = [f.name for f in fields(cls)]
    given = {name: value for name, value in spec.items() if name != "kind"}
    unknown = sorted(str(name) for name in given if name not in names)
    if unknown:
        raise ValueError(f"constraint {kind!r}: unknown field {unknown[0]!r}; its fields are {names}")
    missing = [f.name for f in fields(cls) if f.name not in given and f.default is MISSING]
    if missing:
        raise ValueError(f"constraint {kind!r}: missing field {missing[0]!r}")
    return cls(**given)


def check_all(response: str, constraints: Sequence[Constraint]) -> list[bool]:
    """Whether `response` meets each of `constraints`, in order."""
    return [constraint.check(response) for constraint in constraints]


def instruction_prompt(base: str, constraints: Sequence[Constraint]) -> str:
    """The user prompt: the base task, then a blank line and one instruction a line."""
    if not constraints:
        return base.strip()
    return f"{base.strip()}\n\n" + "\n".join(constraint.describe() for constraint in constraints)


@dataclass(frozen=True)
class Instruction:
    """A base task and the constraints its reply must meet."""

    base: str
    constraints: tuple[Constraint, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "constraints", tuple(self.constraints))

    @property
    def prompt(self) -> str:
        """The user prompt (``instruction_prompt``)."""
        return instruction_prompt(self.base, self.constraints)

    def to_dict(self) -> dict[str, Any]:
        """``prompt``, ``base`` and the constraints' dict forms (a dataset row; reward meta)."""
        return {
            "prompt": self.prompt,
            "base": self.base,
            "constraints": [constraint.to_dict() for constraint in self.constraints],
        }


# --- the built-in family ----------------------------------------------------------------------

_SLOTS: dict[str, tuple[str, ...]] = {
    "animal": ("a cat", "a dog", "an owl", "a horse", "a dolphin", "a fox", "a bee", "a turtle"),
    "things": ("fruits", "colors", "musical instruments", "board games", "trees", "tools", "sports"),
    "topic": (
        "the weather",
        "a weekend trip",
        "learning to cook",
        "the ocean",
        "city parks",
        "public libraries",
        "winter mornings",
        "a first job",
    ),
    "place": ("a small village", "a busy train station", "a mountain lake", "a night market", "a museum"),
    "object": ("a bicycle", "an umbrella", "a teapot", "a backpack", "a desk lamp", "a pair of boots"),
    "activity": ("walking", "reading", "gardening", "swimming", "drawing", "playing chess"),
    "person": ("a new student", "a tired parent", "a young athlete", "a retired teacher", "a traveller"),
}
_TEMPLATES = (
    "Describe {animal}.",
    "List three {things}.",
    "Write a short note about {topic}.",
    "Describe {place} at dawn.",
    "Write a product description for {object}.",
    "Explain why people enjoy {activity}.",
    "Give some advice to {person}.",
    "Write a short story about {animal} in {place}.",
    "Compare {animal} and {object}.",
    "Write a poem about {topic}.",
    "Summarize the benefits of {activity}.",
    "Write a diary entry from {person} about {topic}.",
    "Write a letter to {person} about {activity}.",
    "Name five {things} and say one thing about each.",
    "Describe a day spent {activity}.",
    "Explain how to take care of {animal}.",
    "Write a review of {object}.",
    "Describe the sounds of {place}.",
    "Write a travel tip for visiting {place}.",
    "Explain {topic} to a child.",
    "Write a short speech about {topic}.",
    "Persuade {person} to try {activity}.",
    "Write a riddle about {object}.",
    "Tell a joke about {animal}.",
    "Describe your favourite among {things}.",
    "Write an advertisement for {place}.",
    "Explain what {person} might need for {activity}.",
    "Write a short dialogue between {person} and {animal}.",
    "Give three facts about {things}.",
    "Describe how {object} is used.",
    "Write a weather report for {place}.",
    "Explain the rules of a game played with {object}.",
)
_REQUIRED = ("light", "river", "friend", "morning", "simple", "green", "music", "window", "quiet", "journey")
_BANNED = ("very", "really", "good", "nice", "thing", "just", "always", "beautiful", "amazing", "great")
_OPENINGS = ("Here is my answer:", "Sure.", "In short,", "Dear reader,", "Once upon a time")
_CLOSINGS = ("That is all.", "Thank you for reading.", "Any questions?", "The end.")
_JSON_KEYS = ((), ("title", "text"), ("answer",), ("name", "description"), ("summary", "details"))
# Kinds never drawn together: their constraints could not both be met (or barely).
_CONFLICTS = {
    frozenset(pair)
    for pair in (
        ("lowercase", "uppercase"),
        ("bullets", "paragraphs"),
        *(("json", kind) for kind in ("starts_with", "ends_with", "bullets", "paragraphs")),
        *(("json", case) for case in ("lowercase", "uppercase")),
        *((kind, case) for kind in ("starts_with", "ends_with") for case in ("lowercase", "uppercase")),
    )
}


def _draw_constraint(kind: str, rng: random.Random) -> Constraint:
    if kind == "word_count":
        relation = rng.choice(sorted(RELATIONS))
        sizes = {"at_least": (20, 30, 50, 80), "at_most": (30, 50, 80, 120), "exactly": (10, 15, 20)}
        return WordCount(relation, rng.choice(sizes[relation]))
    if kind == "json":
        return JsonFormat(rng.choice(_JSON_KEYS))
    if kind == "required_words":
        return RequiredWords(tuple(rng.sample(_REQUIRED, rng.randint(1, 3))))
    if kind == "banned_words":
        return BannedWords(tuple(rng.sample(_BANNED, rng.randint(1, 3))))
    if kind == "starts_with":
        return StartsWith(rng.choice(_OPENINGS))
    if kind == "ends_with":
        return EndsWith(rng.choice(_CLOSINGS))
    if kind == "bullets":
        return BulletCount(rng.randint(2, 6))
    if kind == "paragraphs":
        return ParagraphCount(rng.randint(2, 4))
    return CONSTRAINTS[kind]()


def _draw_instruction(rng: random.Random) -> Instruction:
    base = rng.choice(_TEMPLATES).format(**{slot: rng.choice(values) for slot, values in _SLOTS.items()})
    count, kinds = rng.randint(1, 3), []
    for kind in rng.sample(sorted(CONSTRAINTS), len(CONSTRAINTS)):
        if len(kinds) < count and all(frozenset((kind, k)) not in _CONFLICTS for k in kinds):
            kinds.append(kind)
    return Instruction(base, tuple(_draw_constraint(kind, rng) for kind in kinds))


def generate_instructions(n: int, seed: int = 0, split: str = "train") -> list[Instruction]:
    """`n` distinct instruction prompts of `split`, the same for the same arguments: a templated
    base task with one to three compatible constraints. A prompt belongs to the train or the test
    split forever, by the hash of its text (``split_of``), so the splits never overlap. Raises
    ValueError for a bad `n` or `split`, or when no new prompt turns up in many draws."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of instructions must be a non-negative integer, got {n!r}")
    rng = random.Random(f"{seed}/{split}/instructions")
    found: dict[str, Instruction] = {}
    fruitless = 0
    while len(found) < n:
        instruction = _draw_instruction(rng)
        prompt = instruction.prompt
        if split_of(prompt) == split and prompt not in found:
            found[prompt] = instruction
            fruitless = 0
        else:
            fruitless += 1
            if fruitless > MAX_FRUITLESS_DRAWS:
                raise ValueError(f"found only {len(found)} distinct {split} instructions, not {n}")
    return list(found.values())
