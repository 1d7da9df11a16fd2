"""Split a reply into reasoning and answer, whole or while it streams (format: chat_template.py).

In ``auto`` mode a reply that starts (after whitespace) with ``<think>`` has reasoning up to
``</think>``; any other reply is all answer. In ``think`` mode the prompt already opened the
block, so the reply starts in the reasoning; in ``no_think`` mode it is all answer. Reasoning is
returned without surrounding whitespace and the answer after a think block without leading
whitespace; a reply with no think block is returned unchanged. A reply cut off inside its
reasoning has an empty answer.
"""

from __future__ import annotations

from turbos.data.tokenizer import END_THINK_TOKEN, THINK_TOKEN


def parse_reasoning(text: str, mode: str = "auto") -> tuple[str | None, str]:
    """(reasoning, or None when the reply has no think block; answer)."""
    if mode == "no_think":
        return None, text
    body = text
    if mode == "auto":
        body = text.lstrip()
        if not body.startswith(THINK_TOKEN):
            return None, text
        body = body[len(THINK_TOKEN) :]
    reasoning, _, content = body.partition(END_THINK_TOKEN)
    return reasoning.strip(), content.lstrip()


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningStreamParser:
    """Incremental ``parse_reasoning``: ``feed`` text deltas, get (reasoning, answer) deltas.

    Text that may still turn into a tag or into whitespace to strip is held back until it is
    decided; ``finish`` releases it. Joining the deltas gives exactly what ``parse_reasoning`` gives
    for the joined text, whatever the split (tags may arrive across several deltas).
    """

    _START, _REASONING, _CONTENT = "start", "reasoning", "content"

    def __init__(self, mode: str = "auto") -> None:
        self._state = {"auto": self._START, "think": self._REASONING, "no_think": self._CONTENT}[mode]
        self.has_reasoning = mode == "think"
        """Whether the reply has a think block (``parse_reasoning`` gives a reasoning, not None)."""
        self._buffer = ""
        self._strip_leading = mode == "think"  # before the first reasoning or answer character

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning = content = ""
        if self._state == self._START:
            head = self._buffer.lstrip()
            if not head or (THINK_TOKEN.startswith(head) and head != THINK_TOKEN):
                return "", ""  # still whitespace, or could still become <think>
            if head.startswith(THINK_TOKEN):
                self._state, self.has_reasoning, self._strip_leading = self._REASONING, True, True
                self._buffer = head[len(THINK_TOKEN) :]
            else:
                self._state = self._CONTENT
        if self._state == self._REASONING:
            if self._strip_leading:
                self._buffer = self._buffer.lstrip()
            end = self._buffer.find(END_THINK_TOKEN)
            if end >= 0:
                reasoning = self._buffer[:end].rstrip()
                self._buffer = self._buffer[end + len(END_THINK_TOKEN) :]
                self._state, self._strip_leading = self._CONTENT, True
            else:
                undecided = self._buffer[: len(self._buffer) - _partial_tag(self._buffer, END_THINK_TOKEN)]
                cut = len(undecided.rstrip())
                reasoning, self._buffer = self._buffer[:cut], self._buffer[cut:]
                self._strip_leading = self._strip_leading and not reasoning
        if self._state == self._CONTENT:
            if self._strip_leading:
                self._buffer = self._buffer.lstrip()
                self._strip_leading = not self._buffer
            content, self._buffer = self._buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Release what was held back at the end of the reply."""
        rest, self._buffer = self._buffer, ""
        if self._state == self._START:
            return "", rest
        if self._state == self._REASONING:
            return (rest.lstrip() if self._strip_leading else rest).rstrip(), ""
        return "", ""
