"""Interactive chat in the terminal (``turbos chat``): streamed replies, reasoning shown apart.

Commands: ``/think``, ``/no_think`` and ``/auto`` set the thinking mode for the next turns
(``/auto`` also lets ``/think`` and ``/no_think`` flags inside a message decide), ``/reset``
forgets the conversation, ``/exit`` (or end of input) leaves. Ctrl-C stops the current reply.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from turbos.serve.chat_template import prepare_chat
from turbos.serve.engine import LLMEngine
from turbos.serve.reasoning import ReasoningStreamParser
from turbos.serve.sampling import SamplingParams

DIM, RESET = "\x1b[2m", "\x1b[0m"
MODES = {"/think": "think", "/no_think": "no_think", "/auto": None}
HELP = "commands: /think /no_think /auto (thinking mode), /reset (new conversation), /exit"


class ChatSession:
    """A conversation with one model; ``reply`` streams the answer to ``out``."""

    def __init__(
        self, engine: LLMEngine, params: SamplingParams, out: TextIO, system: str | None = None
    ) -> None:
        self.engine, self.params, self.out = engine, params, out
        self.system = system
        self.mode: str | None = None
        """auto / think / no_think, or None: auto unless a message carries a flag."""
        self.messages: list[dict] = []
        self.reset()
        self.color = out.isatty()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def reply(self, user_text: str) -> None:
        messages = [*self.messages, {"role": "user", "content": user_text}]
        try:
            prompt = prepare_chat(messages, self.mode)
        except ValueError as err:  # special-token text typed in the message
            self.write(f"[{err}]\n")
            return
        room = self.engine.max_context - len(self.engine.encode(prompt.text))
        if room < 1:
            self.write("[the conversation no longer fits in the context; /reset to start over]\n")
            return
        params = prompt.sampling_params(self.params, max_tokens=min(self.params.max_tokens or room, room))
        request_id = self.engine.add_request(prompt.text, params)
        parser = ReasoningStreamParser(prompt.mode)
        reasoning, content, thinking = "", "", False
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    r, c = parser.feed(out.text)
                    if out.finished:
                        rest = parser.finish()
                        r, c = r + rest[0], c + rest[1]
                    if r:
                        if not thinking:
                            thinking = True
                            self.write(DIM + "thinking: " if self.color else "[thinking]\n")
                        self.write(r)
                    if c:
                        if thinking:
                            thinking = False
                            self.write(RESET + "\n" if self.color else "\n[answer]\n")
                        self.write(c)
                    reasoning, content = reasoning + r, content + c
        except KeyboardInterrupt:
            self.engine.abort(request_id)
            while self.engine.has_unfinished():
                self.engine.step()
            self.write(" [stopped]")
        self.write((RESET if self.color and thinking else "") + "\n")
        answer = {"role": "assistant", "content": content}
        if parser.has_reasoning:
            answer["reasoning_content"] = reasoning
        self.messages = [*messages, answer]


def chat_loop(session: ChatSession, read: Callable[[str], str] = input) -> None:
    """Read lines until /exit or end of input; commands change the session, text is sent."""
    session.write(HELP + "\n")
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            session.write("\n")
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command in MODES:
            session.mode = MODES[command]
            session.write(f"[thinking mode: {session.mode or 'auto'}]\n")
        elif command == "/reset":
            session.reset()
            session.write("[new conversation]\n")
        elif command:
            session.reply(line)


def run_chat(
    engine: LLMEngine, params: SamplingParams, system: str | None = None, mode: str | None = None
) -> None:
    session = ChatSession(engine, params, sys.stdout, system)
    session.mode = mode
    chat_loop(session)
