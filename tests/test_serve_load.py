"""Load on `turbos serve` over loopback: concurrent streaming clients, every request completes."""

from __future__ import annotations

import asyncio

import pytest

from serve_helpers import running_server, tiny_model, tiny_tokenizer
from turbos.serve import LLMEngine
from turbos.serve.loadtest import run_load, summarize


def load(clients: int, max_running: int, **kwargs) -> dict:
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer.get_vocab_size())
    engine = LLMEngine(model, tokenizer, max_running=max_running, max_waiting=256)
    with running_server(engine) as (url, async_engine):
        records, wall = asyncio.run(run_load(url, "tiny", clients=clients, max_tokens=16, **kwargs))
        assert async_engine.num_running == 0 and not async_engine.engine.has_unfinished()
    stats = summarize(records, wall)
    print(
        f"\n{clients} clients: {stats['completed']}/{stats['requests']} requests in {wall:.1f} s, "
        f"{stats['requests_per_s']:.1f} req/s, {stats['tokens_per_s']:.0f} tok/s, latency p50 "
        f"{stats['latency_p50_s']:.3f} s p99 {stats['latency_p99_s']:.3f} s"
    )
    return stats


def test_concurrent_clients_all_complete() -> None:
    stats = load(clients=12, max_running=8, requests_per_client=3)
    assert stats["requests"] == 36 and stats["completed"] == 36, stats["errors"]


@pytest.mark.slow
def test_32_clients_for_20_seconds_lose_nothing() -> None:
    stats = load(clients=32, max_running=16, duration_s=20)
    assert stats["failed"] == 0 and stats["completed"] >= 32, stats["errors"]
