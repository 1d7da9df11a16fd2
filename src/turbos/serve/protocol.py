"""OpenAI-compatible request bodies, validated strictly (a wrong type is an error, never coerced).

Fields we do not know are ignored, as OpenAI clients send many optional ones; an explicit
``null`` means the default. Fields we know but do not support (structured output, tools) are
parsed so that the server can reject them rather than ignore them. Extensions, as in vLLM:
``top_k``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, and the thinking mode:
``thinking`` ("auto" | "think" | "no_think"), ``chat_template_kwargs.enable_thinking`` or
``reasoning_effort`` (see chat_template.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from turbos.serve.sampling import SamplingParams, SamplingParamsError


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None

    def to_dict(self) -> dict:
        """The message as chat_template.py takes it: text content, developer as system."""
        if isinstance(self.content, list):
            if any(part.type != "text" or part.text is None for part in self.content):
                raise ValueError("only text content parts are supported")
            content: str | None = "".join(part.text for part in self.content)
        else:
            content = self.content
        if content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool | None = None


class ResponseFormat(_Strict):
    type: str


class _SamplingFields(_Strict):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        extra_stop_token_ids: list[int] | None = None,
        banned_token_ids: list[int] | None = None,
        banned_first_token_ids: list[int] | None = None,
    ) -> SamplingParams:
        """SamplingParams from the request (raises SamplingParamsError on a bad value)."""
        given = {
            name: getattr(self, name)
            for name in (
                "temperature",
                "top_p",
                "top_k",
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
                "seed",
                "n",
            )
            if getattr(self, name) is not None
        }
        return SamplingParams(
            max_tokens=max_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=[*(self.stop_token_ids or []), *(extra_stop_token_ids or [])],
            banned_token_ids=list(banned_token_ids or []),
            banned_first_token_ids=list(banned_first_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            logit_bias=self._logit_bias(),
            **given,
        )

    def _logit_bias(self) -> dict[int, float]:
        """``logit_bias`` with its keys, token ids written as decimal strings, as integers."""
        bias = self.logit_bias or {}
        for key in bias:
            if not (key.isascii() and key.isdigit()):
                raise SamplingParamsError("logit_bias", f"keys must be token ids, got {key!r}")
        return {int(key): value for key, value in bias.items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    thinking: Literal["auto", "think", "no_think"] | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None

    def unsupported(self) -> str | None:
        """The first field asking for what this server cannot do (structured output, tools)."""
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name
        return None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
