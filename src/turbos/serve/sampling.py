"""Sampling parameters of a request, and the sampler that applies them to a batch of logits.

Order of processing for each row, in float32: logit bias (OpenAI's ``logit_bias``, added to the
model's logits), repetition penalty (over prompt and output, as in Hugging Face and vLLM: positive
logits divided by it, negative multiplied), presence and frequency penalties (over the output, as
in OpenAI), banned tokens (and, for the first output token, the tokens banned there), then greedy
argmax when the temperature is below ``GREEDY_TEMPERATURE`` (0 included, as in vLLM), else
temperature, top-k, top-p and a draw. Before the temperature, logits are capped at float32's
largest value, and a row whose maximum dividing by the temperature takes out of float range is
shifted to a maximum of 0 first, so no valid parameters can make the probabilities infinite or
NaN. Reported log-probabilities are those of the model itself (log-softmax of the raw logits),
not of the processed distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


class SamplingParamsError(ValueError):
    """A sampling parameter is invalid; the message says which (``param``) and why."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


MAX_LOGPROBS = 20
MAX_N = 64
"""Samples per prompt at most (``SamplingParams.n``)."""
MAX_STOP_STRINGS = 16
GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily, as in vLLM (a draw there is all but the argmax)."""


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Validated on construction."""

    max_tokens: int | None = None
    """New tokens at most; None = up to the model's context length."""
    temperature: float = 1.0
    """In [0, 100]; below ``GREEDY_TEMPERATURE`` (0 included) is greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p, in (0, 1]."""
    repetition_penalty: float = 1.0
    """In [0.01, 100]; 1 disables. Applied to every token of the prompt and the output."""
    presence_penalty: float = 0.0
    """In [-2, 2]; subtracted once from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """In [-2, 2]; subtracted from a token's logit once per time it is in the output."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> a value in [-100, 100] added to its logit (OpenAI's ``logit_bias``)."""
    seed: int | None = None
    """Seeds this request's own generator, so its draws do not depend on the batch it runs in."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: the output ends before the first one (it is not included)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end the output, besides EOS (they are not part of the text)."""
    ignore_eos: bool = False
    """Keep going after EOS (benchmarks and tests)."""
    banned_token_ids: list[int] = field(default_factory=list)
    """Tokens never sampled (the no_think mode bans the think delimiters)."""
    banned_first_token_ids: list[int] = field(default_factory=list)
    """Tokens not sampled as the first output token (the think mode bans ``</think>`` and the
    stop tokens there, so the reply starts with reasoning)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely ones (<= 20)."""
    n: int = 1
    """Samples of the prompt, in [1, ``MAX_N``]; ``samples`` gives each one's parameters."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        def fail(param: str, message: str) -> None:
            raise SamplingParamsError(param, message)

        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            fail("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            fail("top_k", f"must be an integer >= 1, or 0 or -1 to disable, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not 0.01 <= self.repetition_penalty <= 100:
            fail("repetition_penalty", f"must be a number in [0.01, 100], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                fail(name, f"must be a number in [-2, 2], got {value!r}")
        if not isinstance(self.logit_bias, dict) or not all(
            _is_int(t) and t >= 0 and _is_number(v) and -100 <= v <= 100 for t, v in self.logit_bias.items()
        ):
            fail("logit_bias", f"must map token ids >= 0 to numbers in [-100, 100], got {self.logit_bias!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            fail("seed", f"must be a 64-bit integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            fail("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for name in ("stop_token_ids", "banned_token_ids", "banned_first_token_ids"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(_is_int(t) and t >= 0 for t in value):
                fail(name, f"must be a list of token ids >= 0, got {value!r}")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            fail("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            fail("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def samples(self) -> list[SamplingParams]:
        """The parameters of each of the n samples, each with n = 1: these when n = 1; else sample
        j is seeded with seed + j (wrapped into 64 bits, as torch takes seeds), if seeded at all."""
        if self.n == 1:
            return [self]
        return [
            replace(self, n=1, seed=None if self.seed is None else _wrap_seed(self.seed + j))
            for j in range(self.n)
        ]


def _wrap_seed(seed: int) -> int:
    """A seed in the valid range that torch takes as the same one (torch reads it modulo 2**64)."""
    return seed - 2**64 if seed >= 2**64 else seed


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token, and the top ones (id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    text_offset: int = 0
    """Where the token's text starts in the output text, in characters (set by the sequence)."""


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None


def _penalize(logits: torch.Tensor, row: SamplingRow) -> None:
    """Logit bias, then repetition, presence and frequency penalties on one row of logits, in place."""
    p = row.params
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=logits.device)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype, device=logits.device)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor([*row.prompt_ids, *row.output_ids], dtype=torch.long, device=logits.device)
        if len(seen):
            values = logits[seen]
            logits[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
    if (p.presence_penalty or p.frequency_penalty) and len(row.output_ids):
        out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[-1]).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) all but each row's top-k and top-p tokens. logits (n, V); top_k, top_p (n,)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass before it is < top_p
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


class Sampler:
    """Picks one next token per row of a batch of logits, each row with its own parameters."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator
        """Used by rows that carry no generator of their own (no seed)."""

    @torch.no_grad()
    def __call__(
        self, logits: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits (n, vocab) for the next token of each row -> (token ids, log-probabilities)."""
        raw = logits.float()
        logits = raw.clone()
        for i, row in enumerate(rows):
            _penalize(logits[i], row)
            if row.params.banned_token_ids:
                logits[i, row.params.banned_token_ids] = float("-inf")
            if row.params.banned_first_token_ids and not row.output_ids:
                logits[i, row.params.banned_first_token_ids] = float("-inf")
        tokens = logits.argmax(-1)
        sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            params = [rows[i].params for i in sampled]
            vocab = logits.shape[-1]
            top_k = torch.tensor(
                [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=logits.device
            )
            top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
            temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
            # capped (a penalty can overflow to +inf); a row whose maximum the temperature takes
            # out of float range is shifted to a maximum of 0 first, so the softmax has a finite one
            # (only then: the shift changes the rounding, and with it seeded draws)
            chosen = logits[idx].clamp(max=torch.finfo(logits.dtype).max)
            scaled = chosen / temps[:, None]
            overflow = ~torch.isfinite(scaled.amax(-1))
            if overflow.any():
                shifted = chosen[overflow] - chosen[overflow].amax(-1, keepdim=True)
                scaled[overflow] = shifted / temps[overflow, None]
            probs = _filter_top_k_top_p(scaled, top_k, top_p).softmax(-1)
            for j, i in enumerate(sampled):
                generator = rows[i].generator or self.generator
                tokens[i] = torch.multinomial(probs[j], 1, generator=generator)[0]
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, token_list, rows)

    @staticmethod
    def _logprobs(
        raw: torch.Tensor, tokens: list[int], rows: Sequence[SamplingRow]
    ) -> list[TokenLogprobs | None]:
        """The model's log-probabilities (log-softmax of ``raw``) of each chosen token and of the
        k most likely ones, for the rows that ask for them: one gather for all the chosen tokens,
        one top-k per distinct k (a top-k of the largest k, cut, could order ties differently)."""
        wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(rows)
        if not wanted:
            return out
        logp = raw[wanted].log_softmax(-1)
        chosen_ids = torch.tensor([tokens[i] for i in wanted], device=logp.device)
        chosen = logp.gather(-1, chosen_ids[:, None])[:, 0].tolist()
        ks = [rows[i].params.logprobs for i in wanted]
        top: list[list[tuple[int, float]]] = [[] for _ in wanted]
        for k in sorted(set(ks) - {0}):
            group = [j for j, k_j in enumerate(ks) if k_j == k]
            values, ids = logp[group].topk(k)
            for j, row_ids, row_values in zip(group, ids.tolist(), values.tolist(), strict=True):
                top[j] = list(zip(row_ids, row_values, strict=True))
        for j, i in enumerate(wanted):
            out[i] = TokenLogprobs(token_id=tokens[i], logprob=chosen[j], top=top[j])
        return out
