"""The built-in ``code`` family: small Python functions to write, five levels, hidden unit tests.

Each problem asks for one function (name and parameters given) and carries a reference solution
(source text) and hidden tests, pairs of arguments and the expected value, computed from the
reference solution here, in our own process (it is our code, not a model's). Replies are scored
by running them with the tests in the sandbox (``turbos.rl.sandbox``; ``turbos.rl.rewards``'s
``code`` reward). Levels:

1. one arithmetic expression of the argument (``x * 3 + 2``);
2. a branch (clamp to a range, sign word, parity word, the larger of two);
3. a loop over a list (sum / count / product of the items that pass a test);
4. string handling (vowel count, Caesar shift, reversed words, character removal, run length);
5. a small algorithm (n-th Fibonacci number mod m, gcd, primality, digital root, running max).

The train / test split is fixed by the hash of the problem's specification (template and
parameters, not its wording), as for the other families (``turbos.data.tasks.problem.split_of``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from turbos.data.tasks.problem import SPLITS, split_of

LEVELS = (1, 2, 3, 4, 5)
TESTS_PER_PROBLEM = 6
MAX_FRUITLESS_DRAWS = 2_000


@dataclass(frozen=True)
class CodeProblem:
    """A function to write, its reference solution and hidden tests."""

    uid: str
    level: int
    question: str
    function: str
    """The function's name."""
    solution: str
    """Reference solution (Python source defining ``function``)."""
    tests: tuple[tuple[tuple[Any, ...], Any], ...]
    """(arguments, expected value) pairs, hidden from the model."""
    family: str = "code"

    def test_source(self) -> str:
        """Python asserts for the hidden tests (appended to a candidate's code to check it)."""
        return "".join(
            f"assert {self.function}(*{args!r}) == {expected!r}\n" for args, expected in self.tests
        )


@dataclass(frozen=True)
class _Spec:
    key: str
    """Template and parameters: what the split hashes."""
    question: str
    function: str
    solution: str
    inputs: list[tuple[Any, ...]]


def _ints(rng: random.Random, n: int, low: int = -20, high: int = 20) -> list[int]:
    return [rng.randint(low, high) for _ in range(n)]


def _lists(rng: random.Random) -> list[tuple[list[int]]]:
    return [([rng.randint(-9, 9) for _ in range(rng.randint(0, 7))],) for _ in range(TESTS_PER_PROBLEM)]


def _words(rng: random.Random) -> list[tuple[str]]:
    pool = ["apple", "sky", "river", "Otter", "queue", "mind", "eel", "box", "idea", "tree", "Yes"]
    return [(" ".join(rng.choice(pool) for _ in range(rng.randint(0, 4))),) for _ in range(TESTS_PER_PROBLEM)]


def _level1(rng: random.Random) -> _Spec:
    a, b = rng.randint(2, 9), rng.randint(-9, 9)
    name = rng.choice(["scale", "affine", "transform"])
    sign = "plus" if b >= 0 else "minus"
    return _Spec(
        f"affine/{a}/{b}",
        f"Write a Python function `{name}(x)` that returns x times {a} {sign} {abs(b)}.",
        name,
        f"def {name}(x):\n    return x * {a} + ({b})\n",
        [(x,) for x in _ints(rng, TESTS_PER_PROBLEM)],
    )


def _level2(rng: random.Random) -> _Spec:
    kind = rng.choice(["clamp", "sign", "parity", "larger"])
    if kind == "clamp":
        low = rng.randint(-10, 0)
        high = low + rng.randint(1, 15)
        return _Spec(
            f"clamp/{low}/{high}",
            f"Write a Python function `clamp(x)` that returns x limited to the range [{low}, {high}]: "
            f"{low} if x is below it, {high} if x is above it, else x.",
            "clamp",
            f"def clamp(x):\n    return max({low}, min({high}, x))\n",
            [(x,) for x in _ints(rng, TESTS_PER_PROBLEM)],
        )
    if kind == "sign":
        words = rng.choice([("negative", "zero", "positive"), ("neg", "nil", "pos")])
        return _Spec(
            f"sign/{'/'.join(words)}",
            f"Write a Python function `sign_word(x)` that returns '{words[0]}' for x < 0, '{words[1]}' "
            f"for x == 0 and '{words[2]}' for x > 0.",
            "sign_word",
            f"def sign_word(x):\n    if x < 0:\n        return {words[0]!r}\n    if x == 0:\n"
            f"        return {words[1]!r}\n    return {words[2]!r}\n",
            [(x,) for x in [0, *_ints(rng, TESTS_PER_PROBLEM - 1)]],
        )
    if kind == "parity":
        k = rng.randint(2, 5)
        return _Spec(
            f"divisible/{k}",
            f"Write a Python function `divisible(x)` that returns 'yes' if x is divisible by {k}, else 'no'.",
            "divisible",
            f"def divisible(x):\n    return 'yes' if x % {k} == 0 else 'no'\n",
            [(x,) for x in _ints(rng, TESTS_PER_PROBLEM)],
        )
    tie = rng.randint(-5, 5)
    return _Spec(
        f"larger/{tie}",
        f"Write a Python function `larger(a, b)` that returns the larger of a and b, or {tie} if they "
        "are equal.",
        "larger",
        f"def larger(a, b):\n    if a == b:\n        return {tie}\n    return max(a, b)\n",
        [(a, b) for a, b in zip(_ints(rng, 5, -5, 5), _ints(rng, 5, -5, 5), strict=True)] + [(3, 3)],
    )


def _level3(rng: random.Random) -> _Spec:
    op = rng.choice(["sum", "count", "product"])
    k = rng.randint(-3, 5)
    test = rng.choice(["greater", "even", "odd"])
    words = {"greater": f"greater than {k}", "even": "even", "odd": "odd"}[test]
    cond = {"greater": f"v > {k}", "even": "v % 2 == 0", "odd": "v % 2 != 0"}[test]
    key = f"{op}/{test}/{k if test == 'greater' else ''}"
    what = {
        "sum": ("the sum of", "0"),
        "count": ("how many are", "0"),
        "product": ("the product of", "1"),
    }[op]
    step = {"sum": "total += v", "count": "total += 1", "product": "total *= v"}[op]
    question = (
        f"Write a Python function `{op}_items(values)` that, given a list of integers, returns "
        f"{what[0]} the items that are {words} ({what[1]} when there are none)."
    )
    if op == "count":
        question = (
            f"Write a Python function `count_items(values)` that, given a list of integers, returns how "
            f"many of its items are {words}."
        )
    return _Spec(
        key,
        question,
        f"{op}_items",
        f"def {op}_items(values):\n    total = {what[1]}\n    for v in values:\n        if {cond}:\n"
        f"            {step}\n    return total\n",
        _lists(rng),
    )


def _level4(rng: random.Random) -> _Spec:
    kind = rng.choice(["vowels", "caesar", "reverse", "remove", "runs"])
    if kind == "vowels":
        return _Spec(
            "vowels",
            "Write a Python function `count_vowels(text)` that returns how many characters of text are "
            "vowels (a, e, i, o, u, in either case).",
            "count_vowels",
            "def count_vowels(text):\n    return sum(c in 'aeiouAEIOU' for c in text)\n",
            _words(rng),
        )
    if kind == "caesar":
        k = rng.randint(1, 25)
        return _Spec(
            f"caesar/{k}",
            f"Write a Python function `shift(text)` that shifts every lowercase letter a-z of text {k} "
            "places forward in the alphabet (wrapping from z to a) and leaves every other character as "
            "it is.",
            "shift",
            "def shift(text):\n    return ''.join(\n"
            f"        chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in text\n    )\n",
            _words(rng),
        )
    if kind == "reverse":
        return _Spec(
            "reverse-words",
            "Write a Python function `reverse_words(text)` that returns the words of text (separated by "
            "single spaces) in reverse order, joined by single spaces.",
            "reverse_words",
            "def reverse_words(text):\n    return ' '.join(reversed(text.split(' '))) if text else ''\n",
            _words(rng),
        )
    if kind == "remove":
        ch = rng.choice("aeiorst")
        return _Spec(
            f"remove/{ch}",
            f"Write a Python function `remove_char(text)` that returns text without any '{ch}' characters.",
            "remove_char",
            f"def remove_char(text):\n    return text.replace({ch!r}, '')\n",
            _words(rng),
        )
    return _Spec(
        "runs",
        "Write a Python function `longest_run(text)` that returns the length of the longest run of one "
        "repeated character in text (0 for an empty text).",
        "longest_run",
        "def longest_run(text):\n    best = run = 0\n    for i, c in enumerate(text):\n"
        "        run = run + 1 if i and text[i - 1] == c else 1\n        best = max(best, run)\n"
        "    return best\n",
        [(t,) for t in ["", "aab", "abbbc", "zzzz", "abc", "aabbaaa"]],
    )


def _level5(rng: random.Random) -> _Spec:
    kind = rng.choice(["fib", "gcd", "prime", "root", "runmax"])
    if kind == "fib":
        m = rng.choice([7, 10, 13, 100, 1000])
        return _Spec(
            f"fib/{m}",
            f"Write a Python function `fib_mod(n)` that returns the n-th Fibonacci number modulo {m}, "
            "with fib(0) = 0 and fib(1) = 1.",
            "fib_mod",
            f"def fib_mod(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, (a + b) % {m}\n"
            "    return a\n",
            [(n,) for n in [0, 1, *sorted(rng.sample(range(2, 60), TESTS_PER_PROBLEM - 2))]],
        )
    if kind == "gcd":
        return _Spec(
            "gcd",
            "Write a Python function `gcd(a, b)` that returns the greatest common divisor of two positive "
            "integers, without importing anything.",
            "gcd",
            "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n",
            [(rng.randint(1, 200), rng.randint(1, 200)) for _ in range(TESTS_PER_PROBLEM)],
        )
    if kind == "prime":
        return _Spec(
            "prime",
            "Write a Python function `is_prime(n)` that returns True if the integer n is a prime number, "
            "else False.",
            "is_prime",
            "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
            "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
            [(n,) for n in [1, 2, *rng.sample(range(3, 200), TESTS_PER_PROBLEM - 2)]],
        )
    if kind == "root":
        return _Spec(
            "digital-root",
            "Write a Python function `digital_root(n)` that repeatedly sums the decimal digits of the "
            "non-negative integer n until one digit is left, and returns it.",
            "digital_root",
            "def digital_root(n):\n    while n >= 10:\n        n = sum(int(d) for d in str(n))\n"
            "    return n\n",
            [(n,) for n in [0, *rng.sample(range(1, 10**6), TESTS_PER_PROBLEM - 1)]],
        )
    return _Spec(
        "running-max",
        "Write a Python function `running_max(values)` that returns a list whose i-th item is the largest "
        "of values[0..i].",
        "running_max",
        "def running_max(values):\n    out = []\n    for v in values:\n        out.append(v if not out else "
        "max(out[-1], v))\n    return out\n",
        _lists(rng),
    )


_LEVEL_DRAWS: dict[int, Callable[[random.Random], _Spec]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
}


def _problem(spec: _Spec, level: int) -> CodeProblem:
    """The problem with its expected values, computed by running the reference solution here."""
    namespace: dict[str, Any] = {}
    exec(spec.solution, {}, namespace)  # our own reference code, not a model's
    function = namespace[spec.function]
    tests = tuple((args, function(*args)) for args in spec.inputs)
    return CodeProblem(f"code-{level}-{spec.key}", level, spec.question, spec.function, spec.solution, tests)


def generate_code_problems(
    n: int, *, levels: tuple[int, ...] | None = None, split: str = "train", seed: int = 0
) -> list[CodeProblem]:
    """Up to ``n`` distinct problems of ``split``, spread evenly over ``levels`` (default all five);
    the same arguments give the same list; train and test never share a specification. A level
    with fewer specifications than its share (level 5 has 9 in all) gives what it has."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    levels = LEVELS if levels is None else tuple(dict.fromkeys(levels))
    unknown = [level for level in levels if level not in LEVELS]
    if unknown:
        raise ValueError(f"the code family has no level {unknown[0]}; levels are {LEVELS}")
    problems: list[CodeProblem] = []
    for i, level in enumerate(levels):
        want = n // len(levels) + (i < n % len(levels))
        rng = random.Random(f"{seed}/{split}/code/{level}")
        found: dict[str, CodeProblem] = {}
        fruitless = 0
        while len(found) < want:
            spec = _LEVEL_DRAWS[level](rng)
            key = f"code-{level}-{spec.key}"
            if split_of(key) == split and key not in found:
                found[key] = _problem(spec, level)
                fruitless = 0
            else:
                fruitless += 1
                if fruitless > MAX_FRUITLESS_DRAWS:
                    break  # a small level gives what it has
        problems += found.values()
    random.Random(f"{seed}/{split}/code").shuffle(problems)
    return problems[:n]
