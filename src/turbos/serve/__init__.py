"""Serving: continuous-batching engine, sampling, chat format with thinking modes, HTTP server.

The names below load their module on first use, so that importing a light module of the
package (``turbos.serve.config``, which the CLI reads to build its parser) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULE_OF = {
    "EngineConfig": "config",
    "GenerationResult": "engine",
    "LLMEngine": "engine",
    "QueueFullError": "scheduler",
    "ReasoningStreamParser": "reasoning",
    "SamplingParams": "sampling",
    "ServerConfig": "config",
    "parse_reasoning": "reasoning",
    "render_chat": "chat_template",
    "resolve_thinking_mode": "chat_template",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
