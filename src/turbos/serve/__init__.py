"""Serving: continuous-batching engine, sampling, chat format with thinking modes, HTTP server."""

from turbos.serve.chat_template import render_chat, resolve_thinking_mode
from turbos.serve.engine import GenerationResult, LLMEngine
from turbos.serve.reasoning import ReasoningStreamParser, parse_reasoning
from turbos.serve.sampling import SamplingParams
from turbos.serve.scheduler import QueueFullError

__all__ = [
    "GenerationResult",
    "LLMEngine",
    "QueueFullError",
    "ReasoningStreamParser",
    "SamplingParams",
    "parse_reasoning",
    "render_chat",
    "resolve_thinking_mode",
]
