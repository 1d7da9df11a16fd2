"""Remote rewards: a reward function served over HTTP, and a client reward function calling it.

The Hunyuan-TurboS report runs its many scorers as separate services; ``reward_app`` /
``serve_reward`` (``turbos reward serve``) put any reward function (TRL's signature,
``reward(prompts, completions, **meta) -> list[float]``) behind ``POST /v1/reward``, and
``remote_reward(url)`` (or the reward spec ``http://HOST:PORT/v1/reward``) calls it.

Protocol: the request body is ``{"prompts": [...], "completions": [...], "meta": {name: [one
value per sample]}}`` and the reply ``{"rewards": [one finite number per completion]}``. Errors
are JSON ``{"error": {"message", "type", "param", "code"}}`` (as in ``turbos serve``): 400 for a
malformed batch (invalid JSON, not lists, lengths that differ, a batch over ``max_batch``, meta
lists of the wrong length), 401 for a missing or wrong bearer key when one is set, 500 with the
reward function's error when it raises or returns something other than finite numbers. The
client never makes up a score: any failure raises ``RemoteRewardError``.
"""

from __future__ import annotations

import hmac
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from turbos.rl.rewards import RewardFn, call_reward
from turbos.serve.openai_format import error_body

_RESERVED = ("prompts", "completions")


class RemoteRewardError(RuntimeError):
    """A remote reward call failed: transport error, timeout, an error reply or a malformed reply."""


def _error(
    status: int, message: str, type: str = "invalid_request_error", param: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, type, param), status)


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _validate(body: Any, max_batch: int) -> tuple[list, list, dict[str, list]]:
    """(prompts, completions, meta) from a request body; ``_BadRequest`` when it is malformed."""
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    prompts, completions, meta = body.get("prompts"), body.get("completions"), body.get("meta", {})
    if not isinstance(prompts, list):
        raise _BadRequest("'prompts' must be a list", "prompts")
    if not isinstance(completions, list):
        raise _BadRequest("'completions' must be a list", "completions")
    if len(prompts) != len(completions):
        raise _BadRequest(
            f"'prompts' and 'completions' have different lengths ({len(prompts)} and {len(completions)})",
            "completions",
        )
    if len(completions) > max_batch:
        raise _BadRequest(f"batch of {len(completions)} samples is over the server's max_batch {max_batch}")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise _BadRequest("'meta' must be an object of per-sample lists", "meta")
    for name, values in meta.items():
        if name in _RESERVED:
            raise _BadRequest(f"meta name {name!r} is reserved", "meta")
        if not isinstance(values, list):
            raise _BadRequest(f"meta {name!r} must be a list with one value per sample", "meta")
        if len(values) != len(completions):
            message = f"meta {name!r} has {len(values)} values for {len(completions)} samples"
            raise _BadRequest(message, "meta")
    return prompts, completions, meta


def reward_app(reward_fn: RewardFn, api_key: str | None = None, max_batch: int = 1024) -> FastAPI:
    """A FastAPI app serving ``reward_fn`` at ``POST /v1/reward`` (and ``GET /health``)."""
    app = FastAPI(title="turbos reward", docs_url=None, redoc_url=None, openapi_url=None)
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.post("/v1/reward")
    async def reward(request: Request) -> JSONResponse:
        if expected is not None:
            given = request.headers.get("authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(given, expected):
                return _error(401, "Incorrect or missing API key.")
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as err:
            return _error(400, f"invalid JSON body: {err}")
        try:
            prompts, completions, meta = _validate(body, max_batch)
        except _BadRequest as err:
            return _error(400, err.message, param=err.param)
        if not completions:
            return JSONResponse({"rewards": []})
        try:
            rewards = await run_in_threadpool(call_reward, reward_fn, prompts, completions, **meta)
            bad = [value for value in rewards if not math.isfinite(value)]
            if bad:
                raise ValueError(f"the reward function returned {bad[0]!r}; rewards must be finite numbers")
        except Exception as err:  # the scorer's failure goes back to the caller, never a made-up score
            return _error(500, f"reward function failed: {type(err).__name__}: {err}", "server_error")
        return JSONResponse({"rewards": rewards})

    return app


def serve_reward(
    reward_fn: RewardFn,
    host: str = "127.0.0.1",
    port: int = 8100,
    api_key: str | None = None,
    max_batch: int = 1024,
    log_level: str = "info",
) -> None:
    """Serve ``reward_fn`` with uvicorn until interrupted (loopback only by default)."""
    import uvicorn

    uvicorn.run(reward_app(reward_fn, api_key, max_batch), host=host, port=port, log_level=log_level)


def _per_sample(meta: dict[str, Any], n: int) -> dict[str, list]:
    """The per-sample lists of ``meta``; other keyword arguments (e.g. TRL's ``trainer_state``)
    stay local."""
    out = {}
    for name, values in meta.items():
        if hasattr(values, "tolist") and not isinstance(values, list | tuple):
            values = values.tolist()
        if not isinstance(values, list | tuple):
            continue
        if len(values) != n:
            raise RemoteRewardError(f"meta {name!r} has {len(values)} values for {n} samples")
        out[name] = list(values)
    return out


class RemoteReward:
    """A reward function scoring samples at a remote ``POST /v1/reward`` endpoint (see
    ``remote_reward``)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        batch_size: int = 256,
        max_retries: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        self.url, self.api_key, self.timeout = url, api_key, timeout
        self.batch_size, self.max_retries = batch_size, max_retries
        self.__name__ = "remote_reward"  # TRL names reward columns after the function

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **meta: Any) -> list[float]:
        """The remote rewards for the samples, in order (one request per ``batch_size`` samples)."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RemoteRewardError(f"{len(prompts)} prompts for {len(completions)} completions")
        lists = _per_sample(meta, len(completions))
        rewards: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            stop = start + self.batch_size
            batch = {
                "prompts": prompts[start:stop],
                "completions": completions[start:stop],
                "meta": {name: values[start:stop] for name, values in lists.items()},
            }
            rewards.extend(self._post(batch))
        return rewards

    def _post(self, batch: dict[str, Any]) -> list[float]:
        """One batch's rewards, retrying transport errors and 5xx replies ``max_retries`` times."""
        try:
            data = json.dumps(batch, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            raise RemoteRewardError(f"cannot send the samples to {self.url} as JSON: {err}") from err
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        failure = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(0.1 * 2**attempt, 2.0))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    status, raw = response.status, response.read()
            except urllib.error.HTTPError as err:
                failure = f"HTTP {err.code}: {_message(err.read())}"
                if err.code >= 500:
                    continue
                raise RemoteRewardError(f"remote reward {self.url} failed: {failure}") from err
            except TimeoutError as err:
                failure = f"timed out after {self.timeout} s ({err})"
                continue
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, TimeoutError):
                    failure = f"timed out after {self.timeout} s ({reason})"
                else:
                    failure = f"cannot reach it ({reason})"
                continue
            if status != 200:
                raise RemoteRewardError(f"remote reward {self.url} failed: HTTP {status}: {_message(raw)}")
            return _rewards(raw, len(batch["completions"]), self.url)
        tries = self.max_retries + 1
        raise RemoteRewardError(
            f"remote reward {self.url} failed after {tries} attempt{'s' * (tries > 1)}: {failure}"
        )


def _message(raw: bytes) -> str:
    """The error message of an error reply (its JSON ``error.message``, else its text)."""
    try:
        body = json.loads(raw)
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail")
        if message:
            return str(message)
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    return raw.decode("utf-8", "replace")[:500] or "(empty reply)"


def _rewards(raw: bytes, n: int, url: str) -> list[float]:
    """The rewards of a reply, checked: a JSON object with ``n`` finite numbers in ``rewards``."""
    try:
        rewards = json.loads(raw)["rewards"]
    except (ValueError, KeyError, TypeError) as err:
        raise RemoteRewardError(f"remote reward {url}: malformed reply ({raw[:200]!r})") from err
    if not isinstance(rewards, list) or len(rewards) != n:
        got = f"{len(rewards)} rewards" if isinstance(rewards, list) else type(rewards).__name__
        raise RemoteRewardError(f"remote reward {url}: malformed reply: {got} for {n} samples")
    out = []
    for value in rewards:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RemoteRewardError(f"remote reward {url}: malformed reply: {value!r} is not a finite number")
        out.append(float(value))
    return out


def remote_reward(
    url: str,
    api_key: str | None = None,
    timeout: float = 60.0,
    batch_size: int = 256,
    max_retries: int = 1,
) -> RewardFn:
    """A reward function that POSTs the samples to ``url`` (a ``reward_app`` endpoint) in batches
    of ``batch_size`` and returns the rewards in order; per-sample meta lists travel with them.
    Transport errors, timeouts and 5xx replies are retried ``max_retries`` times; then, and on
    any other error reply or a malformed reply, it raises ``RemoteRewardError`` (with the
    server's message), never a made-up score."""
    return RemoteReward(url, api_key, timeout, batch_size, max_retries)
