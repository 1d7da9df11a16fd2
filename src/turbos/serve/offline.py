"""Batched generation over a list of prompts or chats (``turbos generate``).

Input: JSON lines, each an object with ``prompt`` (a string) or ``messages`` (a chat, as in the
OpenAI API), and optionally ``id``. Output: one JSON object per input line, in order, with
``text`` (the raw reply), for chats also ``reasoning_content`` and ``content``, and
``finish_reason``, ``prompt_tokens``, ``completion_tokens``.
"""

from __future__ import annotations

from pathlib import Path

from turbos.data.jsonl import JsonlError, read_jsonl
from turbos.serve.chat_template import prepare_chat
from turbos.serve.engine import LLMEngine
from turbos.serve.reasoning import parse_reasoning
from turbos.serve.sampling import SamplingParams


def read_requests(path: str | Path) -> list[dict]:
    """The requests of a JSONL file, checked: each line holds a ``prompt`` or ``messages``."""
    requests = []
    for number, record in read_jsonl(path, "requests"):
        if not (isinstance(record.get("prompt"), str) or isinstance(record.get("messages"), list)):
            raise JsonlError(path, number, "need a string 'prompt' or a list 'messages'")
        problem = _messages_problem(record.get("messages"))
        if problem:
            raise JsonlError(path, number, problem)
        requests.append(record)
    return requests


def _messages_problem(messages: object) -> str | None:
    """What is wrong with a record's ``messages`` (None when absent or fine): a non-empty list of
    objects with a string ``role`` and a string ``content`` (an assistant's may be null)."""
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i}: need an object with a string 'role'"
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message["role"] == "assistant")):
            return f"message {i}: 'content' must be a string, got {content!r}"
        if not isinstance(message.get("reasoning_content", ""), str | None):
            return f"message {i}: 'reasoning_content' must be a string"
    return None


def generate_records(
    engine: LLMEngine,
    requests: list[dict],
    params: SamplingParams,
    chat: bool = False,
    thinking: str | None = None,
) -> list[dict]:
    """Run every request (a chat when it has ``messages`` or when ``chat`` is set); one record each."""
    prompts, per_request, modes = [], [], []
    for record in requests:
        messages = record.get("messages")
        if messages is None and chat:
            messages = [{"role": "user", "content": record["prompt"]}]
        if messages is None:
            prompts.append(record["prompt"])
            per_request.append(params)
            modes.append(None)
            continue
        prompt = prepare_chat(messages, thinking)
        prompts.append(prompt.text)
        per_request.append(prompt.sampling_params(params))
        modes.append(prompt.mode)
    results = engine.generate(prompts, per_request)
    out = []
    for i, (record, result, mode) in enumerate(zip(requests, results, modes, strict=True)):
        row = {"id": record.get("id", i), "text": result.text}
        if mode is not None:
            row["reasoning_content"], row["content"] = parse_reasoning(result.text, mode)
        row.update(
            finish_reason=result.finish_reason,
            prompt_tokens=len(result.prompt_ids),
            completion_tokens=len(result.token_ids),
        )
        out.append(row)
    return out
