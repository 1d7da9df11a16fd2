"""A load generator for an OpenAI-compatible server: many concurrent streaming chat clients.

Every client sends requests back to back (for a number of requests, or until a deadline) with
the official ``openai`` client and records, per request, the latency, the time to the first
token, the tokens received and whether it completed. ``summarize`` turns that into throughput
and latency percentiles. Used by benchmarks/serve_load.py and tests/test_serve_load.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass


@dataclass
class RequestRecord:
    client: int
    ok: bool
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    finish_reason: str | None
    error: str | None = None


async def _one_request(client, model: str, index: int, prompt: str, max_tokens: int) -> RequestRecord:
    import openai

    start, first, tokens, finish = time.monotonic(), None, 0, None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"thinking": "no_think"},
        )
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                if first is None and (delta.content or getattr(delta, "reasoning_content", None)):
                    first = time.monotonic() - start
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.OpenAIError as err:
        return RequestRecord(index, False, time.monotonic() - start, first, tokens, finish, repr(err))
    ok = finish in ("stop", "length")
    error = None if ok else "no finish reason"
    return RequestRecord(index, ok, time.monotonic() - start, first, tokens, finish, error)


async def run_load(
    base_url: str,
    model: str,
    clients: int = 32,
    requests_per_client: int | None = None,
    duration_s: float | None = None,
    max_tokens: int = 32,
    api_key: str = "unused",
    prompt: str = "Question: 12+34\nAnswer step by step.",
) -> tuple[list[RequestRecord], float]:
    """Run the clients; returns every request's record and the wall time in seconds."""
    import openai

    if (requests_per_client is None) == (duration_s is None):
        raise ValueError("give exactly one of requests_per_client and duration_s")
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=300)
    records: list[RequestRecord] = []
    start = time.monotonic()

    async def worker(index: int) -> None:
        sent = 0
        while True:
            if requests_per_client is not None and sent >= requests_per_client:
                return
            if duration_s is not None and time.monotonic() - start >= duration_s:
                return
            records.append(await _one_request(client, model, index, f"{prompt} #{index}.{sent}", max_tokens))
            sent += 1

    try:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        await client.close()
    return records, time.monotonic() - start


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(records: list[RequestRecord], wall_s: float) -> dict:
    ok = [r for r in records if r.ok]
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s,
        "tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p99_s": _percentile(latencies, 0.99),
        "ttft_p50_s": _percentile(ttfts, 0.5),
        "ttft_p99_s": _percentile(ttfts, 0.99),
    }
