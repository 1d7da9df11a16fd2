"""Who runs next: a bounded first-come-first-served queue feeding a bounded set of running slots.

Continuous batching: at every engine step finished sequences leave the running batch and waiting
ones are admitted, as a prefill group, into the free slots. A group takes prompts in arrival
order while the padded group (rows x longest prompt) stays within ``max_prefill_tokens``; the
first prompt always fits, whatever its length, so nothing starves.
"""

from __future__ import annotations

from collections import deque

from turbos.serve.sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class Scheduler:
    """The limits come from ``EngineConfig`` (serve/config.py), which checks them."""

    def __init__(self, max_running: int, max_waiting: int, max_prefill_tokens: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> bool:
        """Take a sequence out of the queue (cancelled); False if it is not waiting."""
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    def next_prefill_group(self, num_busy: int) -> list[Sequence]:
        """The waiting sequences to prefill now, given ``num_busy`` slots already taken."""
        group: list[Sequence] = []
        longest = 0
        while self.waiting and num_busy + len(group) < self.max_running:
            longest_with_next = max(longest, len(self.waiting[0].prompt_ids))
            if group and (len(group) + 1) * longest_with_next > self.max_prefill_tokens:
                break
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.PREFILLING
            group.append(seq)
            longest = longest_with_next
        return group
