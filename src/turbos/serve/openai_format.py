"""OpenAI response shapes: completions, chat completions, their stream chunks, log-probabilities,
usage and error bodies. ``reasoning_content`` sits beside ``content`` in chat messages and deltas,
as in vLLM and DeepSeek."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from turbos.serve.sampling import TokenLogprobs


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: {...}`` (or ``data: [DONE]``) and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class Formatter:
    """Builds the response objects of one request (shared id, creation time and model name)."""

    def __init__(self, request_id: str, model: str, token_bytes: Sequence[bytes]) -> None:
        self.id = request_id
        self.model = model
        self.created = int(time.time())
        self._token_bytes = token_bytes

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        raw = self._token_bytes[token_id]
        return raw.decode("utf-8", errors="replace"), list(raw)

    # ----------------------------------------------------------------------------- chat
    def chat_logprobs(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        content = []
        for lp in logprobs:
            text, raw = self._token(lp.token_id)
            top = []
            for token_id, value in lp.top:
                t, b = self._token(token_id)
                top.append({"token": t, "logprob": value, "bytes": b})
            content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}

    def chat_choice(
        self,
        index: int,
        reasoning: str | None,
        content: str,
        finish_reason: str | None,
        logprobs: dict | None,
    ) -> dict:
        message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}

    def chat_response(self, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def chat_chunk(
        self, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None, index: int = 0
    ) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            ],
        }

    def chat_usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }

    # ------------------------------------------------------------------------ completions
    def completion_logprobs(self, logprobs: Sequence[TokenLogprobs]) -> dict:
        return {
            "tokens": [self._token(lp.token_id)[0] for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self._token(t)[0]: v for t, v in lp.top} for lp in logprobs],
            "text_offset": [lp.text_offset for lp in logprobs],
        }

    def completion_choice(
        self, index: int, text: str, finish_reason: str | None, logprobs: dict | None
    ) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def completion(self, choices: list[dict], prompt_tokens: int, completion_tokens: int | None) -> dict:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if completion_tokens is not None:
            body["usage"] = usage(prompt_tokens, completion_tokens)
        return body
