"""The chat format and its thinking modes (report §3.2: adaptive long/short chain of thought).

A conversation renders as one string in which every marker is one special token of our tokenizer
(no newlines or spaces are added around them)::

    <|bos|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|><|user|>...

and a generation prompt appends ``<|assistant|>``. An assistant reply is either a direct answer,
``{answer}``, or reasoning first, ``<think>{reasoning}</think>{answer}``; generation stops at
``<|end|>`` (or ``<|eos|>``). Post-training data uses this exact format (``render_chat`` with
``add_generation_prompt=False``); the Jinja template ``CHAT_TEMPLATE``, saved into
``tokenizer_config.json`` by ``save_chat_template``, renders the same text in
``transformers``' ``apply_chat_template``.

Thinking modes decide how the generation prompt ends:

- ``auto`` (default; the report's adaptive CoT): ``<|assistant|>``, the model decides whether
  to open a ``<think>`` block.
- ``think``: ``<|assistant|><think>``, so the reply starts inside the reasoning; sampling also
  bans ``</think>`` and the stop tokens as the first token, so the reasoning is never empty.
- ``no_think``: ``<|assistant|><think></think>``, an empty, closed block; sampling also bans
  the ``<think>`` and ``</think>`` tokens, so the model cannot think.

``prepare_chat`` returns the prompt with those stop and banned tokens; the server, ``turbos
generate`` and ``turbos chat`` all go through it.

The mode comes from the request when it names one (``thinking``, ``enable_thinking``,
``reasoning_effort``); otherwise from the last ``/think`` or ``/no_think`` flag in a system or
user message (the later of the two within a message counts); otherwise ``auto``. A flag is the
word ``/think`` or ``/no_think`` with whitespace or the start or end of the message on each side
(so neither ``</think>`` nor a URL or path such as ``https://x.com/thinking`` holds one); every
flag is removed from a message that has one, and that message's surrounding whitespace is
stripped.

Message content may not smuggle in chat structure: the text of a special token (``<|end|>``,
``<|system|>``...) in a system or user message, or in an assistant message other than the
``<think>`` and ``</think>`` of its reasoning, is an error, not a control token.

History: assistant turns before the last user message keep only their answer (the reasoning is
dropped, as it was for the model when it answered the next question); turns after it keep
their reasoning, which is what a training target needs. A turn's reasoning is its
``reasoning_content`` field, or the ``<think>...</think>`` part of its content.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turbos.data.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    END_THINK_TOKEN,
    END_TOKEN,
    EOS_TOKEN,
    SPECIAL_TOKENS,
    SYSTEM_TOKEN,
    THINK_TOKEN,
    USER_TOKEN,
)

if TYPE_CHECKING:
    from turbos.serve.sampling import SamplingParams

THINKING_MODES = ("auto", "think", "no_think")
_FLAG = re.compile(r"(?<!\S)/(no_)?think(?!\S)")
_REASONING_TOKENS = (THINK_TOKEN, END_THINK_TOKEN)
_ROLE_TOKENS = {"system": SYSTEM_TOKEN, "user": USER_TOKEN, "assistant": ASSISTANT_TOKEN}
_GENERATION_SUFFIX = {"auto": "", "think": THINK_TOKEN, "no_think": THINK_TOKEN + END_THINK_TOKEN}

EOS_ID, END_ID, THINK_ID, END_THINK_ID = (
    SPECIAL_TOKENS.index(t) for t in (EOS_TOKEN, END_TOKEN, THINK_TOKEN, END_THINK_TOKEN)
)

Message = Mapping[str, Any]


def _check_mode(mode: str) -> str:
    if mode not in THINKING_MODES:
        raise ValueError(f"thinking mode must be one of {list(THINKING_MODES)}, got {mode!r}")
    return mode


def thinking_mode_from_request(
    thinking: str | None = None,
    enable_thinking: bool | None = None,
    reasoning_effort: str | None = None,
) -> str | None:
    """The mode a request names, or None when it names none.

    ``thinking`` wins over ``enable_thinking`` (vLLM/Qwen ``chat_template_kwargs``: True -> think,
    False -> no_think), which wins over OpenAI's ``reasoning_effort`` (none/minimal -> no_think,
    low/medium -> auto, high -> think).
    """
    if thinking is not None:
        return _check_mode(thinking)
    if enable_thinking is not None:
        return "think" if enable_thinking else "no_think"
    if reasoning_effort is not None:
        efforts = {
            "none": "no_think",
            "minimal": "no_think",
            "low": "auto",
            "medium": "auto",
            "high": "think",
        }
        if reasoning_effort not in efforts:
            raise ValueError(f"reasoning_effort must be one of {list(efforts)}, got {reasoning_effort!r}")
        return efforts[reasoning_effort]
    return None


def split_flag(text: str) -> tuple[str | None, str]:
    """(the mode flagged in ``text`` or None, the text without its flags; see the module docstring)."""
    flags = list(_FLAG.finditer(text))
    if not flags:
        return None, text
    return "no_think" if flags[-1].group(1) else "think", _FLAG.sub("", text).strip()


def _check_content(i: int, message: Message) -> None:
    """ValueError if the message's text holds a special token's text (see the module docstring)."""
    role = message["role"]
    if role == "assistant":
        texts, allowed = (message.get("content"), message.get("reasoning_content")), _REASONING_TOKENS
    else:
        texts, allowed = (message["content"],), ()
    for token in SPECIAL_TOKENS:
        if token not in allowed and any(token in text for text in texts if text):
            raise ValueError(
                f"message {i}: the text of the special token {token} is not allowed in a {role} message"
            )


def resolve_thinking_mode(messages: Sequence[Message], mode: str | None = None) -> str:
    """The mode that applies: the requested one, else the last flag in the messages, else auto."""
    if mode is not None:
        return _check_mode(mode)
    resolved = "auto"
    for message in messages:
        if message["role"] in ("system", "user"):
            flag, _ = split_flag(message["content"])
            resolved = flag or resolved
    return resolved


def assistant_parts(message: Message) -> tuple[str | None, str]:
    """(reasoning or None, answer) of an assistant message: its ``reasoning_content``, or the
    ``<think>...</think>`` part of its content."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content")
    if reasoning is None and END_THINK_TOKEN in content:
        before, _, content = content.partition(END_THINK_TOKEN)
        reasoning = before.split(THINK_TOKEN)[-1]
    return reasoning, content


def render_chat(
    messages: Sequence[Message], mode: str | None = None, add_generation_prompt: bool = True
) -> str:
    """The prompt text of a conversation (format in the module docstring).

    messages: dicts with ``role`` (system, user or assistant) and string ``content``
    (assistant messages may carry ``reasoning_content`` and a None content). ValueError for an
    unknown role or special-token text in a message.
    mode: auto / think / no_think, or None to take it from the /think and /no_think flags.
    """
    mode = resolve_thinking_mode(messages, mode)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    parts = [BOS_TOKEN]
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in _ROLE_TOKENS:
            raise ValueError(f"message {i}: role must be system, user or assistant, got {role!r}")
        _check_content(i, message)
        if role == "assistant":
            reasoning, text = assistant_parts(message)
            if reasoning is not None and i > last_user:
                text = THINK_TOKEN + reasoning + END_THINK_TOKEN + text
        else:
            text = split_flag(message["content"])[1]
        parts.append(_ROLE_TOKENS[role] + text + END_TOKEN)
    if add_generation_prompt:
        parts.append(ASSISTANT_TOKEN + _GENERATION_SUFFIX[mode])
    return "".join(parts)


@dataclass
class ChatPrompt:
    """A rendered conversation and what generating its reply needs."""

    text: str
    mode: str
    stop_token_ids: list[int]
    """``<|end|>`` closes the reply."""
    banned_token_ids: list[int]
    """The think delimiters in no_think mode, so the model cannot open a think block."""
    banned_first_token_ids: list[int]
    """In think mode, ``</think>`` and the stop tokens may not come first, so the reasoning
    cannot be empty."""

    def sampling_params(self, params: SamplingParams, **changes: Any) -> SamplingParams:
        """``params`` (plus ``changes``) with this prompt's stop and banned tokens added."""
        return dataclasses.replace(
            params,
            stop_token_ids=[*params.stop_token_ids, *self.stop_token_ids],
            banned_token_ids=[*params.banned_token_ids, *self.banned_token_ids],
            banned_first_token_ids=[*params.banned_first_token_ids, *self.banned_first_token_ids],
            **changes,
        )


def prepare_chat(messages: Sequence[Message], mode: str | None = None) -> ChatPrompt:
    """Render the generation prompt of ``messages`` in the resolved thinking mode."""
    mode = resolve_thinking_mode(messages, mode)
    banned = [THINK_ID, END_THINK_ID] if mode == "no_think" else []
    banned_first = [END_THINK_ID, END_ID, EOS_ID] if mode == "think" else []
    return ChatPrompt(render_chat(messages, mode), mode, [END_ID], banned, banned_first)


# The same rendering in Jinja, for transformers' apply_chat_template. Extra keyword arguments it
# understands: thinking ("auto" / "think" / "no_think") and enable_thinking (bool).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(mode='auto', last_user=-1, text='', out='') -%}"
    "{%- set specials = " + json.dumps(list(SPECIAL_TOKENS)) + " -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] in ['system', 'user'] -%}"
    "{%- for word in m['content'].split() -%}"
    "{%- if word == '/think' -%}{%- set ns.mode = 'think' -%}"
    "{%- elif word == '/no_think' -%}{%- set ns.mode = 'no_think' -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if thinking is defined and thinking is not none -%}{%- set ns.mode = thinking -%}"
    "{%- elif enable_thinking is defined and enable_thinking is not none -%}"
    "{%- set ns.mode = 'think' if enable_thinking else 'no_think' -%}"
    "{%- endif -%}"
    "{%- if ns.mode not in ['auto', 'think', 'no_think'] -%}"
    "{{- raise_exception('thinking mode must be auto, think or no_think') -}}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for m in messages -%}"
    "{%- set i = loop.index0 -%}"
    "{%- for t in specials -%}"
    "{%- if m['role'] in ['system', 'user'] and t in m['content'] or m['role'] == 'assistant'"
    " and t not in ['<think>', '</think>'] and (m['content'] is string and t in m['content']"
    " or m['reasoning_content'] is string and t in m['reasoning_content']) -%}"
    "{{- raise_exception('message ' ~ i ~ ': the text of the special token ' ~ t"
    " ~ ' is not allowed in a ' ~ m['role'] ~ ' message') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] if m['content'] is not none else '' -%}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined else none -%}"
    "{%- if reasoning is none and '</think>' in content -%}"
    "{%- set pieces = content.partition('</think>') -%}"
    "{%- set reasoning = pieces[0].split('<think>')[-1] -%}{%- set content = pieces[2] -%}"
    "{%- endif -%}"
    "<|assistant|>"
    "{%- if reasoning is not none and loop.index0 > ns.last_user -%}"
    "{{- '<think>' + reasoning + '</think>' -}}"
    "{%- endif -%}"
    "{{- content -}}<|end|>"
    "{%- elif m['role'] in ['system', 'user'] -%}"
    "{%- set ns.text = m['content'] -%}"
    "{%- if '/think' in ns.text.split() or '/no_think' in ns.text.split() -%}"
    "{%- for flag in ['/think', '/no_think'] -%}"
    "{%- set pieces = ns.text.split(flag) -%}{%- set ns.out = pieces[0] -%}"
    "{%- for right in pieces[1:] -%}"
    "{%- set left = pieces[loop.index0] -%}"
    "{%- set starts = left[-1:].isspace() or loop.first and not left -%}"
    "{%- set ends = right[:1].isspace() or loop.last and not right -%}"
    "{%- set ns.out = ns.out + ('' if starts and ends else flag) + right -%}"
    "{%- endfor -%}"
    "{%- set ns.text = ns.out -%}"
    "{%- endfor -%}"
    "{%- set ns.text = ns.text.strip() -%}"
    "{%- endif -%}"
    "{{- '<|system|>' if m['role'] == 'system' else '<|user|>' -}}{{- ns.text -}}<|end|>"
    "{%- else -%}"
    "{{- raise_exception('role must be system, user or assistant, got ' + m['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "<|assistant|>"
    "{%- if ns.mode == 'think' -%}<think>{%- elif ns.mode == 'no_think' -%}<think></think>{%- endif -%}"
    "{%- endif -%}"
)


def save_chat_template(directory: str | Path) -> Path:
    """Add ``chat_template`` to the ``tokenizer_config.json`` in ``directory``."""
    path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer_config.json in {str(directory)!r}")
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return path
