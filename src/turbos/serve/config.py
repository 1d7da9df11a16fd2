"""Settings of the engine and of the HTTP server, with their defaults.

These dataclasses are the one place the defaults live: ``LLMEngine``, ``create_app`` /
``run_server`` and the ``turbos serve / generate / chat`` flags all read them. The module
imports nothing heavy, so the CLI can read it to build its parser without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    """How ``LLMEngine`` batches and schedules requests. Validated on construction."""

    max_running: int = 16
    """Sequences holding a slot (decoded together, or being prefilled) at most."""
    max_waiting: int = 256
    """Requests in the waiting queue at most; more are refused (QueueFullError, HTTP 503)."""
    prefill_chunk: int = 512
    """Prompt tokens fed per forward pass; a longer prompt is interleaved with decode steps."""
    max_prefill_tokens: int = 4096
    """Padded tokens (rows x longest prompt) of one prefill group at most; its first prompt
    always fits, whatever its length."""
    seed: int | None = None
    """Seed of the sampler for requests without their own (None: a random one)."""
    cuda_graphs: bool | None = None
    """Replay decode steps as CUDA graphs; None: on when the model is on a CUDA device. False is
    vLLM's ``enforce_eager``."""

    def __post_init__(self) -> None:
        for name in ("max_running", "max_waiting", "prefill_chunk", "max_prefill_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"cuda_graphs must be True, False or None, got {self.cuda_graphs!r}")


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server listens, guards and shuts down. Validated on construction."""

    host: str = "127.0.0.1"
    """Address to bind (loopback only by default)."""
    port: int = 8000
    api_key: str | None = None
    """Require ``Authorization: Bearer KEY`` on /v1 routes; None: no key."""
    max_body_bytes: int = 1 << 20
    """Request bodies over this get 413."""
    drain_timeout: float = 10.0
    """Seconds requests in flight get to finish on shutdown before being cancelled."""
    header_timeout: float = 10.0
    """Seconds a connection gets to send a whole request head (from its start, or from the end
    of its previous response); a slower one gets 408 and is closed."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open after a response."""
    max_header_bytes: int = 16 * 1024
    """A request head over this is refused (h11's limit on an incomplete event)."""
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not _is_int(self.port) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        for name in ("max_body_bytes", "max_header_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("header_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0 seconds, got {self.drain_timeout!r}")
