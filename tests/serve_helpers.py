"""Shared pieces of the serving tests: a tiny tokenizer and model built in seconds, and a plain
greedy decoder (model + HybridCache, no engine) as the reference."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn

from conftest import small_config
from turbos.data.tasks import generate_problems, render_document
from turbos.data.tokenizer import save_tokenizer, train_tokenizer
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.serve import LLMEngine
from turbos.serve.async_engine import AsyncLLMEngine
from turbos.serve.chat_template import save_chat_template
from turbos.serve.config import ServerConfig
from turbos.serve.http_protocol import uvicorn_options
from turbos.serve.server import create_app


def tiny_tokenizer():
    """A byte-level BPE trained on a few KB of task text."""
    texts = [render_document(p) for p in generate_problems(60, seed=0)]
    return train_tokenizer(texts, vocab_size=320)


def tiny_model(vocab_size: int, **overrides) -> TurboSForCausalLM:
    torch.manual_seed(0)
    config = small_config(vocab_size=vocab_size, max_position_embeddings=256, **overrides)
    return TurboSForCausalLM(config).eval()


def save_model_dir(directory: Path) -> Path:
    """A self-contained model directory (config, weights, tokenizer with chat template)."""
    tokenizer = tiny_tokenizer()
    tiny_model(tokenizer.get_vocab_size()).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    save_chat_template(directory)
    return directory


@torch.no_grad()
def greedy_alone(model: TurboSForCausalLM, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy decoding of one prompt on its own: prefill, then one token at a time."""
    cache = HybridCache(model.config, 1)
    logits = model(torch.tensor([prompt_ids]), past_key_values=cache, logits_to_keep=1).logits[0, -1]
    out = []
    for _ in range(num_tokens):
        out.append(int(logits.argmax()))
        logits = model(torch.tensor([[out[-1]]]), past_key_values=cache).logits[0, -1]
    return out


@contextmanager
def serving(app, **options) -> Iterator[str]:
    """``app`` under uvicorn (``options``: ``uvicorn.Config`` fields) on 127.0.0.1 and a free
    port, in a thread; yields the base URL and checks on exit that the server shut down."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", **options}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        assert not thread.is_alive(), "the server did not shut down"


@contextmanager
def running_server(
    engine: LLMEngine, model_name: str = "tiny", **settings
) -> Iterator[tuple[str, AsyncLLMEngine]]:
    """`turbos serve`'s app and uvicorn settings on 127.0.0.1 and a free port, in a thread;
    ``settings`` are ServerConfig fields. Yields (base URL, engine)."""
    config = ServerConfig(**{"log_level": "warning", **settings})
    async_engine = AsyncLLMEngine(engine)
    app = create_app(async_engine, model_name, config)
    with serving(app, **uvicorn_options(config)) as url:
        yield url, async_engine


def post_raw(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST raw bytes; returns (status, parsed JSON body)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        conn.request(
            "POST", parsed.path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
