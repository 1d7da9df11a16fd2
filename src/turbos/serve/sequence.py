"""One request's state as it moves through the engine, and what the engine reports about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from turbos.serve.detokenizer import IncrementalDetokenizer
from turbos.serve.sampling import SamplingParams, SamplingRow, TokenLogprobs


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # in the queue
    PREFILLING = "prefilling"  # its prompt is being fed, chunk by chunk
    RUNNING = "running"  # in the decode batch
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the new tokens and text since last time."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    """'stop' (EOS, a stop token or a stop string), 'length', 'abort' or 'error'."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Sequence:
    """A request: prompt, sampling parameters, and everything generated so far."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    """New tokens at most, after the context limit is applied."""
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # what has not been reported yet
    _new_ids: list[int] = field(default_factory=list)
    _new_text: list[str] = field(default_factory=list)
    _new_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def sampling_row(self) -> SamplingRow:
        return SamplingRow(self.params, self.prompt_ids, self.output_ids, self.generator)

    def append(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        """Record a sampled token; finish the sequence on a stop token, a stop string or the length."""
        self.output_ids.append(token_id)
        self._new_ids.append(token_id)
        if logprobs is not None:
            logprobs.text_offset = len(self.detokenizer.text)
            self._new_logprobs.append(logprobs)
        if token_id in self.stop_token_ids:
            self.finish("stop")
            return
        self._new_text.append(self.detokenizer.add(token_id))
        if self.detokenizer.stopped:
            self.finish("stop")
        elif len(self.output_ids) >= self.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self._new_text.append(self.detokenizer.finish())

    def take_output(self, error: str | None = None) -> RequestOutput:
        """What is new since the last call."""
        out = RequestOutput(
            request_id=self.request_id,
            token_ids=self._new_ids,
            text="".join(self._new_text),
            logprobs=self._new_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.output_ids),
            error=error,
        )
        self._new_ids, self._new_text, self._new_logprobs = [], [], []
        return out


def stop_ids_for(params: SamplingParams, eos_token_id: int) -> frozenset[int]:
    """The tokens that end a request: EOS (unless ignored) and the request's own stop tokens."""
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.add(eos_token_id)
    return frozenset(ids)
