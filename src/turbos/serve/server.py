"""OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the engine thread.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming as server-sent
events ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus text). Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``:
400 for a bad request (invalid JSON, wrong types, bad sampling values, prompt + max_tokens beyond
the context, special-token text in chat messages, structured output or tools, more sequences
(prompts times ``n``) than the waiting queue holds), 401 for a missing or wrong API key (when one
is set), 404 for an unknown model, 413 for a body over the limit, 503 when the waiting queue is
full or the server is shutting down.
A client that disconnects cancels its request, which frees its slot at the next engine step.
``n`` samples of each prompt are n engine requests, answered as choices prompt_index * n + j
(sample j of a seeded request is seeded with seed + j, ``SamplingParams.samples``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbos.serve.async_engine import AsyncLLMEngine, EngineStoppedError
from turbos.serve.chat_template import prepare_chat, thinking_mode_from_request
from turbos.serve.config import ServerConfig
from turbos.serve.engine import ContextLengthError, GenerationResult
from turbos.serve.http_protocol import uvicorn_options
from turbos.serve.metrics import ServerMetrics
from turbos.serve.openai_format import Formatter, error_body, sse
from turbos.serve.protocol import ChatCompletionRequest, CompletionRequest
from turbos.serve.reasoning import ReasoningStreamParser, parse_reasoning
from turbos.serve.sampling import SamplingParams, SamplingParamsError
from turbos.serve.scheduler import QueueFullError
from turbos.serve.sequence import RequestOutput

Body = TypeVar("Body", bound=BaseModel)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, headers)


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


class _Sample(NamedTuple):
    """One engine request of an HTTP request: one sample of one of its prompts."""

    request_id: str
    queue: asyncio.Queue[RequestOutput]
    prompt_ids: list[int]


class GuardMiddleware:
    """API key check on /v1 routes and the request body size limit, before any handler runs."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = APIError(
                    401, "Incorrect or missing API key.", "invalid_request_error", code="invalid_api_key"
                )
                return await error.response()(scope, receive, send)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body_bytes:
            return await self._too_large().response()(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> APIError:
        return APIError(
            413, f"The request body is over {self.max_body_bytes} bytes.", code="request_too_large"
        )


async def _parse(request: Request, model: type[Body]) -> Body:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"The body is not valid JSON: {first['msg']}", code="invalid_json") from None
        param = ".".join(str(part) for part in first["loc"]) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        raise APIError(400, message, param=param, code="invalid_value") from None


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, cancelling it if the client goes away meanwhile (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _ClientGone


class Server:
    """Request handling: turns HTTP requests into engine requests and engine outputs into
    OpenAI responses."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.token_bytes = engine.token_bytes

    def check_common(self, body: ChatCompletionRequest | CompletionRequest) -> None:
        if body.model != self.model_name:
            raise APIError(
                404,
                f"The model {body.model!r} does not exist; this server has {self.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def check_queue_room(self, num_prompts: int, n: int) -> None:
        """400 for a request of more sequences (prompts times n) than the waiting queue holds."""
        max_waiting = self.engine.max_waiting
        if num_prompts * n > max_waiting:
            raise APIError(
                400,
                f"{num_prompts * n} sequences in one request ({num_prompts} prompts, n={n}); this "
                f"server queues at most {max_waiting}.",
                param="prompt" if num_prompts > max_waiting else "n",
                code="invalid_value",
            )

    def params(self, body: ChatCompletionRequest | CompletionRequest, **kwargs: Any) -> SamplingParams:
        try:
            return body.sampling_params(**kwargs)
        except SamplingParamsError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_value") from None

    def submit(self, prompt: str | list[int], params: SamplingParams, request_id: str):
        try:
            return self.engine.add_request(prompt, params, request_id)
        except ContextLengthError as err:
            raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
        except QueueFullError as err:
            raise APIError(503, str(err), "server_overloaded", code="queue_full") from None
        except EngineStoppedError as err:
            raise APIError(503, str(err), "server_unavailable", code="shutting_down") from None
        except SamplingParamsError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_value") from None
        except ValueError as err:
            raise APIError(400, str(err), param="prompt", code="invalid_value") from None

    def submit_samples(self, prompts: list[list[int]], params: SamplingParams, base: str) -> list[_Sample]:
        """Queue ``params.n`` samples of each prompt, in choice order (prompt_index * n + j), with
        ids ``base-<choice>`` (``base`` when there is one); all or none: on an error, those queued
        are aborted."""
        per_prompt = params.samples()
        count = len(prompts) * len(per_prompt)
        samples: list[_Sample] = []
        try:
            for ids in prompts:
                for sample_params in per_prompt:
                    request_id = f"{base}-{len(samples)}" if count > 1 else base
                    samples.append(_Sample(*self.submit(ids, sample_params, request_id), ids))
        except APIError:
            for sample in samples:
                self.engine.abort(sample.request_id)
            raise
        return samples

    def record(self, endpoint: str, started: float, result: GenerationResult, first: float | None) -> None:
        self.metrics.record(
            endpoint,
            result.finish_reason or "cancelled",
            len(result.prompt_ids),
            len(result.token_ids),
            time.monotonic() - started,
            None if first is None else first - started,
        )

    async def _gather(self, sample: _Sample) -> tuple[GenerationResult, float | None]:
        """A sample's whole result, and when its first token came."""
        result, first = GenerationResult(sample.request_id, sample.prompt_ids), None
        async with contextlib.aclosing(self.engine.stream(sample.request_id, sample.queue)) as outputs:
            async for out in outputs:
                first = first or (time.monotonic() if out.token_ids else None)
                result.add(out)
                if out.error:
                    raise APIError(500, out.error, "internal_error", code="engine_error")
        return result, first

    async def _gather_all(self, samples: list[_Sample]) -> list[tuple[GenerationResult, float | None]]:
        """``_gather`` of each sample, in order; cancelling it cancels the requests not finished."""
        return await asyncio.gather(*(self._gather(sample) for sample in samples))

    async def _outputs(self, samples: list[_Sample]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The samples' outputs merged as they come, each with its sample's place in ``samples``;
        closing it early cancels the requests not finished."""
        merged: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

        async def pump(index: int, sample: _Sample) -> None:
            async with contextlib.aclosing(self.engine.stream(sample.request_id, sample.queue)) as outputs:
                async for out in outputs:
                    await merged.put((index, out))
            await merged.put((index, None))

        tasks = [asyncio.create_task(pump(i, sample)) for i, sample in enumerate(samples)]
        try:
            remaining = len(tasks)
            while remaining:
                index, out = await merged.get()
                if out is None:
                    remaining -= 1
                else:
                    yield index, out
        finally:
            for task in tasks:
                task.cancel()

    # ----------------------------------------------------------------------------- chat
    async def chat(self, request: Request) -> Response:
        started = time.monotonic()
        body = await _parse(request, ChatCompletionRequest)
        self.check_common(body)
        if unsupported := body.unsupported():
            raise APIError(
                400,
                f"{unsupported} is not supported by this server (no structured output or tool calls).",
                param=unsupported,
                code="unsupported_parameter",
            )
        try:
            messages = [m.to_dict() for m in body.messages]
            kwargs = body.chat_template_kwargs
            requested = thinking_mode_from_request(
                body.thinking, kwargs.enable_thinking if kwargs else None, body.reasoning_effort
            )
            chat = prepare_chat(messages, requested)
        except ValueError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(
                400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value"
            )
        params = self.params(
            body,
            max_tokens=body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            extra_stop_token_ids=chat.stop_token_ids,
            banned_token_ids=chat.banned_token_ids,
            banned_first_token_ids=chat.banned_first_token_ids,
        )
        self.check_queue_room(1, params.n)
        prompt_ids = await self.engine.encode(chat.text)
        base = f"chatcmpl-{uuid.uuid4().hex}"
        samples = self.submit_samples([prompt_ids], params, base)
        fmt = Formatter(base, self.model_name, self.token_bytes)
        if body.stream:
            events = self._chat_events(
                fmt, samples, chat.mode, bool(body.logprobs), body.include_usage, started
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        gathered = await _unless_disconnected(request, self._gather_all(samples))
        choices = []
        for index, (result, first) in enumerate(gathered):
            self.record("/v1/chat/completions", started, result, first)
            reasoning, content = parse_reasoning(result.text, chat.mode)
            logprobs = fmt.chat_logprobs(result.logprobs) if body.logprobs else None
            choices.append(fmt.chat_choice(index, reasoning, content, result.finish_reason, logprobs))
        completion_tokens = sum(len(result.token_ids) for result, _ in gathered)
        return JSONResponse(fmt.chat_response(choices, len(prompt_ids), completion_tokens))

    async def _chat_events(
        self,
        fmt: Formatter,
        samples: list[_Sample],
        mode: str,
        logprobs: bool,
        include_usage: bool,
        started: float,
    ) -> AsyncIterator[str]:
        parsers = [ReasoningStreamParser(mode) for _ in samples]
        results = [GenerationResult(sample.request_id, sample.prompt_ids) for sample in samples]
        firsts: list[float | None] = [None] * len(samples)
        try:
            for index in range(len(samples)):
                yield sse(fmt.chat_chunk({"role": "assistant", "content": ""}, index=index))
            async with contextlib.aclosing(self._outputs(samples)) as outputs:
                async for index, out in outputs:
                    firsts[index] = firsts[index] or (time.monotonic() if out.token_ids else None)
                    results[index].add(out)
                    if out.error:
                        yield sse(error_body(out.error, "internal_error", code="engine_error"))
                        break
                    reasoning, content = parsers[index].feed(out.text)
                    if out.finished:
                        rest = parsers[index].finish()
                        reasoning, content = reasoning + rest[0], content + rest[1]
                    delta = {
                        key: value
                        for key, value in (("reasoning_content", reasoning), ("content", content))
                        if value
                    }
                    lp = fmt.chat_logprobs(out.logprobs) if logprobs and out.logprobs else None
                    if delta or lp:
                        yield sse(fmt.chat_chunk(delta, logprobs=lp, index=index))
                    if out.finished:
                        yield sse(fmt.chat_chunk({}, finish_reason=out.finish_reason, index=index))
            if include_usage:
                completion_tokens = sum(len(result.token_ids) for result in results)
                yield sse(fmt.chat_usage_chunk(len(samples[0].prompt_ids), completion_tokens))
            yield sse("[DONE]")
        finally:
            for result, first in zip(results, firsts, strict=True):
                self.record("/v1/chat/completions", started, result, first)

    # ----------------------------------------------------------------------- completions
    async def completions(self, request: Request) -> Response:
        started = time.monotonic()
        body = await _parse(request, CompletionRequest)
        self.check_common(body)
        if body.echo or body.suffix is not None:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        params = self.params(body, max_tokens=body.max_tokens, logprobs=body.logprobs)
        self.check_queue_room(len(prompts), params.n)
        encoded = [await self.engine.encode(p) if isinstance(p, str) else p for p in prompts]
        base = f"cmpl-{uuid.uuid4().hex}"
        samples = self.submit_samples(encoded, params, base)
        fmt = Formatter(base, self.model_name, self.token_bytes)
        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            events = self._completion_events(
                fmt, samples, prompt_tokens, body.logprobs is not None, body.include_usage, started
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        gathered = await _unless_disconnected(request, self._gather_all(samples))
        choices = []
        for i, (result, first) in enumerate(gathered):
            self.record("/v1/completions", started, result, first)
            lp = fmt.completion_logprobs(result.logprobs) if body.logprobs is not None else None
            choices.append(fmt.completion_choice(i, result.text, result.finish_reason, lp))
        completion_tokens = sum(len(r.token_ids) for r, _ in gathered)
        return JSONResponse(fmt.completion(choices, prompt_tokens, completion_tokens))

    async def _completion_events(
        self,
        fmt: Formatter,
        samples: list[_Sample],
        prompt_tokens: int,
        logprobs: bool,
        include_usage: bool,
        started: float,
    ) -> AsyncIterator[str]:
        results = [GenerationResult(sample.request_id, sample.prompt_ids) for sample in samples]
        firsts: list[float | None] = [None] * len(samples)
        try:
            async with contextlib.aclosing(self._outputs(samples)) as outputs:
                async for index, out in outputs:
                    firsts[index] = firsts[index] or (time.monotonic() if out.token_ids else None)
                    results[index].add(out)
                    if out.error:
                        yield sse(error_body(out.error, "internal_error", code="engine_error"))
                        break
                    lp = fmt.completion_logprobs(out.logprobs) if logprobs else None
                    if out.text or lp or out.finished:
                        choice = fmt.completion_choice(index, out.text, out.finish_reason, lp)
                        yield sse(fmt.completion([choice], 0, None))
            if include_usage:
                yield sse(fmt.completion([], prompt_tokens, sum(len(r.token_ids) for r in results)))
            yield sse("[DONE]")
        finally:
            for result, first in zip(results, firsts, strict=True):
                self.record("/v1/completions", started, result, first)

    # ---------------------------------------------------------------------------- other
    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "turbos",
                    "max_model_len": self.engine.max_context,
                }
            ],
        }

    def metrics_text(self) -> str:
        engine = self.engine
        return self.metrics.render(engine.num_running, engine.num_waiting, engine.cache_bytes())


def create_app(engine: AsyncLLMEngine, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine thread on startup and stops it on shutdown, giving
    requests in flight ``config.drain_timeout`` seconds to finish before cancelling them."""
    config = config or ServerConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown, config.drain_timeout)

    app = FastAPI(title="turbos", lifespan=lifespan)
    server = Server(engine, model_name, ServerMetrics())
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        server.metrics.record_rejected(request.url.path, err.status)
        return err.response()

    @app.exception_handler(_ClientGone)
    async def client_gone(request: Request, err: _ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), kind), err.status_code)

    app.post("/v1/chat/completions")(server.chat)
    app.post("/v1/completions")(server.completions)
    app.get("/v1/models")(server.models)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    return app


def run_server(engine: AsyncLLMEngine, model_name: str, config: ServerConfig | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then finish (or, after ``config.drain_timeout`` s, cancel)
    requests in flight."""
    import uvicorn

    config = config or ServerConfig()
    uvicorn.run(create_app(engine, model_name, config), **uvicorn_options(config))
