"""Load test of `turbos serve`: concurrent streaming chat clients over loopback for a while.

Starts the server in this process (uvicorn in a thread, 127.0.0.1, a free port) for a model
directory, or for a randomly initialised preset with a tokenizer trained on built-in text, and
runs `--clients` clients back to back for `--duration` seconds with the official `openai`
client. Reports completed / failed requests, throughput, and latency and time-to-first-token
percentiles. `--url` targets a server that is already running instead.

    python benchmarks/serve_load.py [--model DIR | --preset tiny] [--clients 32] [--duration 20]

Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from turbos.serve import LLMEngine  # noqa: E402
from turbos.serve.loadtest import run_load, summarize  # noqa: E402


def build_engine(args: argparse.Namespace) -> LLMEngine:
    if args.model:
        return LLMEngine.from_pretrained(args.model, max_running=args.max_running, max_waiting=args.max_queue)
    from turbos.data.tasks import generate_problems, render_document
    from turbos.data.tokenizer import train_tokenizer
    from turbos.model import TurboSForCausalLM
    from turbos.presets import get_preset

    torch.manual_seed(0)
    config = get_preset(args.preset)
    tokenizer = train_tokenizer(
        [render_document(p) for p in generate_problems(400)], vocab_size=config.vocab_size
    )
    model = TurboSForCausalLM(config).eval()
    return LLMEngine(model, tokenizer, max_running=args.max_running, max_waiting=args.max_queue)


def serve_in_thread(engine: LLMEngine, name: str):
    import uvicorn

    from turbos.serve.async_engine import AsyncLLMEngine
    from turbos.serve.server import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(AsyncLLMEngine(engine), name), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--served-model-name", default="bench")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    server = thread = None
    url, name = args.url, args.served_model_name
    if url is None:
        url, server, thread = serve_in_thread(build_engine(args), name)
    records, wall = asyncio.run(
        run_load(url, name, clients=args.clients, duration_s=args.duration, max_tokens=args.max_tokens)
    )
    if server is not None:
        server.should_exit = True
        thread.join(30)
    stats = summarize(records, wall)
    print(
        f"{args.clients} clients, {wall:.1f} s: {stats['completed']}/{stats['requests']} completed, "
        f"{stats['failed']} failed; {stats['requests_per_s']:.1f} req/s, {stats['tokens_per_s']:.0f} tok/s; "
        f"latency p50 {stats['latency_p50_s']:.3f} s p99 {stats['latency_p99_s']:.3f} s; "
        f"TTFT p50 {stats['ttft_p50_s']:.3f} s p99 {stats['ttft_p99_s']:.3f} s"
    )
    payload = {
        "benchmark": "serve_load",
        "model": args.model or f"random {args.preset}",
        "clients": args.clients,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "max_running": args.max_running,
        "machine": machine(),
        **stats,
    }
    print(f"wrote {write_json('serve_load.json', payload)}")


if __name__ == "__main__":
    main()
