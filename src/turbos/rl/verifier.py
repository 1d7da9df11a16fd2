"""Answer consistency (report §3.4, the reward system's verifier): whether a reply's final answer
means the same as the reference, up to presentation.

``final_answer`` reads a reply's final answer: the last `Answer:` line
(``turbos.data.tasks.answers``), else the last non-empty ``\\boxed{...}``. ``answers_match``
compares two answers after reducing each to a value:

- presentation: surrounding whitespace, a trailing period, markdown emphasis, `$...$`, `\\(...\\)`,
  `\\[...\\]`, quotes and backticks, ``\\boxed{}``, ``\\text{}`` / ``\\mathrm{}``, ``\\left`` /
  ``\\right``, LaTeX spacing, and a leading `x =` (one variable) are dropped;
- numbers compare by exact value (``fractions.Fraction``, no floats): signs (`-`, `−`, `+`,
  `minus`), grouping (`1,000` = `1 000` = `1\\,000` = `1000`), decimals, `a/b` and
  ``\\frac`` / ``\\dfrac`` / ``\\tfrac``, scientific forms (`1e3`, `1.5 \\times 10^3`, `10^{3}`)
  and percentages (`50%` = `0.5` = `1/2`; `1/3` ≠ `0.333`);
- a unit after a number (or a currency sign before it) may be on one side only (`12 cm` = `12`,
  `$5` = `5 dollars` = `5`); two different units never match (`10 cm` ≠ `10 m`; no conversion).
  Common abbreviations and plurals are one unit (`cm` = `centimeters`); an unknown unit is
  compared by its lower-cased singular text (`5 apples` = `5 apple` ≠ `5 pears`). A single
  letter after a number is a unit only when it is a known one (`5 m`, `5 s`; `5x` is text);
- collections (`{...}`, `[...]`, `(...)`, or items separated by `,` / `;` / `and`) compare item
  by item, in order, or as multisets (the outer level only) with ``unordered=True``; a
  one-item collection is its item (`{5}` = `5`);
- anything else compares as case-folded text with whitespace collapsed (none kept next to
  symbols), so symbolic answers must agree in form.

Ambiguous forms, decided:

- a comma is a thousands separator only in a number grouped exactly in threes and not inside
  brackets: `1,000` = `1000`, but `1,00` is the list `1, 0` (≠ `100`, ≠ `1`: no decimal commas),
  and `[1,000]` is the list `1, 0`;
- a percentage equals the number it denotes or its bare figure, a percent sign being a unit on
  one side: `50%` = `0.5` = `50`; `50%` ≠ `50 cm`;
- an empty answer matches nothing, not even another empty one; inputs that are not strings or
  longer than ``MAX_CHARS``, and unordered collections of more than ``MAX_ITEMS`` items, never
  match. Nothing raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from turbos.data.tasks.answers import ANSWER_LINE, normalize_answer

MAX_CHARS = 10_000
"""Longer answers never match (a guard on the cost of checking junk)."""
MAX_ITEMS = 256
"""Unordered collections of more items never match (the matching is quadratic)."""
MAX_DEPTH = 16
"""Nesting (of wrappers or of collections) deeper than this compares as text."""
MAX_EXPONENT = 1000
"""A power of ten beyond ``10^±MAX_EXPONENT`` is not read as a number."""


@dataclass(frozen=True)
class _Number:
    value: Fraction
    unit: str | None  # canonical unit name; None when there is none
    percent: bool


_Value = _Number | str | tuple["_Value", ...]

# --- final answers ----------------------------------------------------------------------------

_BOXED = re.compile(r"\\boxed\s*\{")
_BRACE = re.compile(r"\\[{}]|[{}]")  # an escaped brace (``\{``) is text, not a group


def _closing_braces(text: str) -> dict[int, int]:
    """The position of each group-opening ``{`` of `text` mapped to its matching ``}``."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for match in _BRACE.finditer(text):
        if match[0] == "{":
            stack.append(match.start())
        elif match[0] == "}" and stack:
            pairs[stack.pop()] = match.start()
    return pairs


def final_answer(text: str) -> str | None:
    """The final answer of a reply, as written: the value of its last `Answer:` line (see
    ``ANSWER_LINE``; emphasis around the label dropped), or, when it has none or a blank one,
    the content of its last non-empty, balanced ``\\boxed{...}``; None when neither exists."""
    lines = list(ANSWER_LINE.finditer(text))
    if lines:
        value = lines[-1]["value"].strip()
        opener = lines[-1]["open"]
        if opener and value.startswith(opener):
            value = value[len(opener) :].strip()
        if value:
            return value
    starts = [match.end() - 1 for match in _BOXED.finditer(text)]  # each at its `{`
    if not starts:
        return None
    first = starts[0]
    closing = _closing_braces(text[first:])
    for start in reversed(starts):
        end = closing.get(start - first)
        content = text[start + 1 : first + end].strip() if end is not None else ""
        if content:
            return content
    return None


# --- cleaning ---------------------------------------------------------------------------------

_COMMAND = re.compile(r"\\(?:boxed|fbox|text|textrm|textbf|textit|mathrm|mathbf|mathit|mbox)\s*\{")
_ASSIGNMENT = re.compile(r"[a-z](?:_\{?\w+\}?)?\s*=\s*(?=\S)", re.IGNORECASE)
_PAIRS = (("\\(", "\\)"), ("\\[", "\\]"), ('"', '"'), ("'", "'"), ("`", "`"), ("“", "”"))
_INLINE_COMMAND = re.compile(r"\\(?:text|textrm|textbf|textit|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")
_LATEX = (
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])|\\displaystyle|\\!"), ""),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\lbrace(?![a-zA-Z])|\\\{"), "{"),
    (re.compile(r"\\rbrace(?![a-zA-Z])|\\\}"), "}"),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\\$"), "$"),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])"), "°"),
    (re.compile(r"\\[,;: ]|~|[\u00a0\u2007\u2009\u202f]"), " "),
    (re.compile("[\u2212\u2013]"), "-"),
    (re.compile(r"\*\*(.+?)\*\*"), r"\1"),
)


def _closes_at_end(text: str, start: int) -> bool:
    """Whether the group opened by the ``{`` at `start` closes at the last character of `text`."""
    return _closing_braces(text[start:]).get(0) == len(text) - 1 - start


def _unwrap(text: str) -> str:
    """`text` without the presentation around it (see the module docstring), innermost last."""
    for _ in range(MAX_DEPTH):
        before = text
        text = normalize_answer(text)
        command = _COMMAND.match(text)
        if command and _closes_at_end(text, command.end() - 1):
            text = text[command.end() : -1]
        for opener, closer in _PAIRS:
            inside = text[len(opener) : -len(closer)]
            if (
                len(text) >= len(opener) + len(closer)
                and text.startswith(opener)
                and text.endswith(closer)
                and opener not in inside
                and closer not in inside
            ):
                text = inside
        assignment = _ASSIGNMENT.match(text)
        if assignment:
            text = text[assignment.end() :]
        if text == before:
            break
    return text.strip()


def _clean(text: str) -> str:
    """`text` unwrapped, with LaTeX spelling made plain (spacing, ``\\{``, ``\\%``, degrees...)."""
    text = _unwrap(text)
    text = _INLINE_COMMAND.sub(r" \1 ", text)
    for pattern, replacement in _LATEX:
        text = pattern.sub(replacement, text)
    return _unwrap(re.sub(r"\s+", " ", text))


# --- numbers ----------------------------------------------------------------------------------

_DECIMAL = r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d{1,3}(?: \d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d*)?|\.\d+)"
_SIGNED = rf"[+-]?\s*{_DECIMAL}"


def _exponent(name: str) -> str:
    """A power of ten's exponent, braced or not, in groups `name` / `name`2."""
    return rf"(?:\{{\s*(?P<{name}>[+-]?\d{{1,4}})\s*\}}|(?P<{name}2>[+-]?\d{{1,4}}))"


_TIMES = r"(?:\\times|×|\\cdot|·|\*|x)"
_FRACTION = re.compile(
    rf"\\frac\s*(?:\{{\s*(?P<n>{_SIGNED})\s*\}}|(?P<n2>\d))\s*(?:\{{\s*(?P<d>{_SIGNED})\s*\}}|(?P<d2>\d))"
)
_RATIO = re.compile(rf"(?P<n>{_DECIMAL})\s*/\s*(?P<d>{_DECIMAL})")
_POWER = re.compile(r"10\s*\^\s*" + _exponent("p"))
_SCIENTIFIC = re.compile(
    rf"(?P<m>{_DECIMAL})(?:[eE](?P<e>[+-]?\d{{1,4}})|\s*{_TIMES}\s*10\s*\^\s*{_exponent('x')})?"
)
_PREFIX = re.compile(
    r"(?:(?P<word>minus|negative)\s+)?(?P<sign>[+-]?)\s*(?P<currency>[$€£¥])?\s*(?P<sign2>[+-]?)\s*",
    re.IGNORECASE,
)
_PERCENT = re.compile(r"%|percent|per\s*cent", re.IGNORECASE)
_UNIT_TOKEN = r"(?:[^\W\d_]+|°[cf]?|[$€£¥¢])(?:\^\{?-?\d\}?|\d)?"
_UNIT = re.compile(rf"{_UNIT_TOKEN}(?:(?:\s*[/·*]\s*|\s+){_UNIT_TOKEN}){{0,3}}")
_UNIT_WORD = re.compile(r"[^\W\d_]+|°[cf]?|[$€£¥¢]")
_UNIT_NAMES = {
    "meter": ("m", "metre"),
    "centimeter": ("cm", "centimetre"),
    "millimeter": ("mm", "millimetre"),
    "kilometer": ("km", "kilometre"),
    "gram": ("g", "gm"),
    "kilogram": ("kg", "kilo"),
    "milligram": ("mg",),
    "second": ("s", "sec"),
    "minute": ("min",),
    "hour": ("h", "hr"),
    "liter": ("l", "litre"),
    "milliliter": ("ml", "millilitre"),
    "foot": ("ft", "feet"),
    "inch": ("in",),
    "yard": ("yd",),
    "mile": ("mi",),
    "pound": ("lb", "£"),
    "ounce": ("oz",),
    "dollar": ("$", "usd", "buck"),
    "cent": ("¢",),
    "euro": ("€", "eur"),
    "yen": ("¥", "jpy"),
    "degree": ("°", "deg"),
    "celsius": ("°c",),
    "fahrenheit": ("°f",),
    "mile/hour": ("mph",),
    "/": ("per",),
}
_UNITS = {alias: name for name, aliases in _UNIT_NAMES.items() for alias in (name, *aliases)}


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "xes", "sses")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _unit_word(word: str) -> str:
    return _UNITS.get(word) or _UNITS.get(_singular(word), _singular(word))


def _unit(text: str) -> str | None:
    """The canonical name of the unit `text`, or None when it is not one."""
    text = text.lower()
    if not _UNIT.fullmatch(text):
        return None
    if any(len(word) == 1 and word.isalpha() and word not in _UNITS for word in _UNIT_WORD.findall(text)):
        return None
    canonical = _UNIT_WORD.sub(lambda match: _unit_word(match[0]), text)
    return re.sub(r"\s*/\s*", "/", re.sub(r"\s+", " ", canonical)).strip()


def _decimal(text: str) -> Fraction | None:
    """The exact value of a (signed, grouped) decimal, canonicalised by ``normalize_answer``."""
    try:
        return Fraction(normalize_answer(text.replace(" ", "")))
    except ValueError:  # too many digits for int()
        return None


def _power(exponent: str | None) -> Fraction | None:
    if exponent is None:
        return Fraction(1)
    power = int(exponent)
    return Fraction(10) ** power if abs(power) <= MAX_EXPONENT else None


def _magnitude(text: str) -> tuple[Fraction, str] | None:
    """The value of the unsigned number at the start of `text`, with the rest of `text`."""
    for pattern in (_FRACTION, _RATIO, _POWER, _SCIENTIFIC):
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        if pattern is _POWER:
            value = _power(groups["p"] or groups["p2"])
        elif pattern is _SCIENTIFIC:
            mantissa, power = _decimal(groups["m"]), _power(groups["e"] or groups["x"] or groups["x2"])
            value = mantissa * power if mantissa is not None and power is not None else None
        else:
            numerator = _decimal(groups["n"] or groups["n2"])
            denominator = _decimal(groups["d"] or groups["d2"])
            value = numerator / denominator if numerator is not None and denominator else None
        if value is not None:
            return value, text[match.end() :].strip()
    return None


def _number(text: str) -> _Number | None:
    """`text` as a number with an optional unit or percent sign, or None when it is not one."""
    prefix = _PREFIX.match(text)
    assert prefix is not None  # every part of it is optional
    signs = [s for s in ("-" if prefix["word"] else "", prefix["sign"], prefix["sign2"]) if s]
    parsed = _magnitude(text[prefix.end() :])
    if parsed is None or len(signs) > 1:
        return None
    value, rest = parsed
    value = -value if signs == ["-"] else value
    currency = _UNITS[prefix["currency"]] if prefix["currency"] else None
    if not rest:
        return _Number(value, currency, False)
    if _PERCENT.fullmatch(rest):
        return None if currency else _Number(value, None, True)
    unit = _unit(rest)
    if unit is None or (currency and unit != currency):
        return None
    return _Number(value, unit, False)


def _numbers_equal(a: _Number, b: _Number) -> bool:
    if a.percent != b.percent:
        percent, other = (a, b) if a.percent else (b, a)
        return other.unit is None and other.value in (percent.value, percent.value / 100)
    return a.value == b.value and (a.unit is None or b.unit is None or a.unit == b.unit)


# --- collections and text ---------------------------------------------------------------------

_OPENERS, _CLOSERS = "([{", ")]}"
_GROUPED = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d|,\d)")
_AND = re.compile(r"\s+and\s+|^and\s+", re.IGNORECASE)


def _bracketed(text: str) -> str | None:
    """The inside of `text` when one pair of brackets encloses all of it (any kinds: `(1, 2]`)."""
    if len(text) < 2 or text[0] not in _OPENERS or text[-1] not in _CLOSERS:
        return None
    depth = 0
    for i, char in enumerate(text):
        depth += (char in _OPENERS) - (char in _CLOSERS)
        if depth == 0:
            return text[1:-1] if i == len(text) - 1 else None
    return None


def _items(text: str, *, bracketed: bool) -> list[str]:
    """The top-level items of `text`, split at `,` (not a thousands comma outside brackets), `;`
    and `and`; empty items dropped."""
    grouped = [] if bracketed else _GROUPED.finditer(text)
    grouping = {i for match in grouped for i in range(match.start(), match.end())}
    ands = {m.start(): m.end() for m in _AND.finditer(text)}
    items, depth, start, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        depth = max(depth + (char in _OPENERS) - (char in _CLOSERS), 0)
        if depth == 0 and ((char in ",;" and i not in grouping) or i in ands):
            items.append(text[start:i])
            start = i = ands.get(i, i + 1)
            continue
        i += 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _text(text: str) -> str:
    text = re.sub(r"\s+", " ", text.casefold()).strip()
    return re.sub(r" ?([^\w ]) ?", r"\1", text)


def _value(text: str, depth: int = 0) -> _Value:
    """What `text` denotes: a number, a tuple of values, or canonical text."""
    text = _clean(text)
    if not text or depth >= MAX_DEPTH:
        return _text(text)
    inside = _bracketed(text)
    if inside is None:
        number = _number(text)
        if number is not None:
            return number
    items = _items(inside if inside is not None else text, bracketed=inside is not None)
    if inside is None and items == [text]:
        return _text(text)
    values = tuple(_value(item, depth + 1) for item in items)
    return values[0] if len(values) == 1 else values


def _matches_in_any_order(a: tuple[_Value, ...], b: tuple[_Value, ...]) -> bool:
    """Whether the items of `a` and `b` pair up one to one (a perfect bipartite matching)."""
    if len(a) > MAX_ITEMS:
        return False
    partners = [[j for j, y in enumerate(b) if _equal(x, y, unordered=False)] for x in a]
    owner = [-1] * len(b)

    def place(i: int, seen: set[int]) -> bool:
        for j in partners[i]:
            if j not in seen:
                seen.add(j)
                if owner[j] < 0 or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(a)))


def _equal(a: _Value, b: _Value, *, unordered: bool) -> bool:
    if isinstance(a, _Number) and isinstance(b, _Number):
        return _numbers_equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b):
            return False
        if unordered:
            return _matches_in_any_order(a, b)
        return all(_equal(x, y, unordered=False) for x, y in zip(a, b, strict=True))
    return isinstance(a, str) and a == b


def answers_match(candidate: str, reference: str, *, unordered: bool = False) -> bool:
    """Whether `candidate` and `reference` are the same answer (see the module docstring);
    ``unordered`` compares collections as multisets. False, never an exception, for junk."""
    if not isinstance(candidate, str) or not isinstance(reference, str):
        return False
    if len(candidate) > MAX_CHARS or len(reference) > MAX_CHARS:
        return False
    a, b = _value(candidate), _value(reference)
    if a == "" or b == "":
        return False
    return _equal(a, b, unordered=unordered)
