"""Server metrics in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            cumulative += n
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.count}",
        ]
        return out


class ServerMetrics:
    """Counters of finished requests and tokens, latency histograms; gauges come from the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = Histogram()
        self.time_to_first_token = Histogram()

    def record(
        self,
        endpoint: str,
        outcome: str,
        prompt_tokens: int,
        generation_tokens: int,
        latency: float,
        ttft: float | None,
    ) -> None:
        """One finished request; ``outcome`` is its finish reason, or an HTTP error status."""
        with self._lock:
            self.requests[(endpoint, outcome)] += 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generation_tokens
            self.latency.observe(latency)
            if ttft is not None:
                self.time_to_first_token.observe(ttft)

    def record_rejected(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, str(status))] += 1

    def render(self, running: int, waiting: int, cache_bytes: int) -> str:
        with self._lock:
            lines = [
                "# HELP turbos_requests_total Requests by endpoint and outcome (finish reason or HTTP code).",
                "# TYPE turbos_requests_total counter",
            ]
            for (endpoint, outcome), n in sorted(self.requests.items()):
                lines.append(f'turbos_requests_total{{endpoint="{endpoint}",outcome="{outcome}"}} {n}')
            lines += [
                "# HELP turbos_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE turbos_prompt_tokens_total counter",
                f"turbos_prompt_tokens_total {self.prompt_tokens}",
                "# HELP turbos_generation_tokens_total Generated tokens of finished requests.",
                "# TYPE turbos_generation_tokens_total counter",
                f"turbos_generation_tokens_total {self.generation_tokens}",
                "# HELP turbos_requests_running Requests holding a slot (prefilling or decoding).",
                "# TYPE turbos_requests_running gauge",
                f"turbos_requests_running {running}",
                "# HELP turbos_requests_waiting Requests in the waiting queue.",
                "# TYPE turbos_requests_waiting gauge",
                f"turbos_requests_waiting {waiting}",
                "# HELP turbos_cache_bytes Decoding state held by the running batch.",
                "# TYPE turbos_cache_bytes gauge",
                f"turbos_cache_bytes {cache_bytes}",
                "# HELP turbos_request_latency_seconds Time from arrival to the last token.",
                "# TYPE turbos_request_latency_seconds histogram",
                *self.latency.lines("turbos_request_latency_seconds"),
                "# HELP turbos_time_to_first_token_seconds Time from arrival to the first token.",
                "# TYPE turbos_time_to_first_token_seconds histogram",
                *self.time_to_first_token.lines("turbos_time_to_first_token_seconds"),
            ]
        return "\n".join(lines) + "\n"
