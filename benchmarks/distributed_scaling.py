"""Scale-out on CPU with gloo: training tokens/s of `small` on 1, 2 and 4 processes (FSDP2, each
data-parallel rank 2 x 512 tokens a step), the same on 4 processes with expert parallelism (ep 2)
and with ep 2 x context parallelism 2 (each sequence split over 2 ranks), and the bytes context
parallelism's Mamba2 state passing sends per rank at 4K and 32K tokens (both forms).

The machine has 2 cores: threads per process = cores / processes, so more processes do not add
compute here; the figure shows what sharding and gloo's collectives cost, not a speed-up. On a
GPU machine, run it with torchrun on CUDA for the real scaling.

    python benchmarks/distributed_scaling.py [--worlds 1 2 4] [--layouts ep=2 ep=2,cp=2] [--steps 3]
        [--cp-lengths 4096 32768]

Writes benchmarks/results/distributed_scaling.json and .png.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_json  # noqa: E402
from turbos.distributed.context_parallel import MODES, context_parallel, context_parallel_loss, shard_sequence  # noqa: E402
from turbos.distributed.fsdp import parallelize  # noqa: E402
from turbos.distributed.parallel import ParallelConfig, ParallelDims  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.presets import get_preset  # noqa: E402
from turbos.train.evaluate import row_loss  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init(rank: int, world: int, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))


def _train(
    rank: int, world: int, port: int, threads: int, layout: dict, args: argparse.Namespace, out: dict
) -> None:
    _init(rank, world, port, threads)
    try:
        torch.manual_seed(0)
        model = TurboSForCausalLM(get_preset(args.preset)).train()
        config = ParallelConfig(**layout)
        dims = ParallelDims.resolve(config, world, model.config)
        if world > 1:
            parallelize(model, dims, config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(dims.data_rank(rank))  # a batch per data rank
        rows = torch.randint(3, model.config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
        shard = (dims.cp_rank(rank), dims.cp) if dims.cp > 1 else None

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            row_loss(model, rows, None, shard).loss.backward()
            optimizer.step()

        step()  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        dist.barrier()
        if rank == 0:
            out["seconds"] = time.perf_counter() - start
            out["data_parallel"] = dims.data_parallel
    finally:
        dist.destroy_process_group()


def _cp_bytes(rank: int, world: int, port: int, args: argparse.Namespace, out: dict) -> None:
    _init(rank, world, port, 1)
    try:
        config = get_preset("tiny").replace(capacity_factor=100.0)
        model = TurboSForCausalLM(config).train()
        for T in args.cp_lengths:
            ids = torch.randint(3, config.vocab_size, (1, T))
            for mode in MODES:
                cp = context_parallel(model, mode=mode)
                local, targets = shard_sequence(ids, ids)
                loss, _ = context_parallel_loss(model, local, targets)
                loss.backward()
                mamba = {i for i, kind in enumerate(config.layer_types) if kind == "M"}
                sent = sum(n for (layer, _), n in cp.sent.items() if layer in mamba)
                cp.remove()
                if rank == 0:
                    out[f"{mode} {T}"] = sent / len(mamba)
        dist.barrier()  # every rank done before any tears its connections down
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> dict:
    out = mp.Manager().dict()
    mp.spawn(fn, args=(world, _free_port(), *args, out), nprocs=world, join=True)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--layouts",
        nargs="*",
        default=["ep=2", "ep=2,cp=2"],
        help="parallel layouts run on the largest world",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cp-lengths", type=int, nargs="+", default=[4096, 32768])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    runs = [(world, {}) for world in args.worlds]
    for text in args.layouts:
        runs.append((max(args.worlds), {k: int(v) for k, v in (part.split("=") for part in text.split(","))}))
    rows = []
    for world, layout in runs:
        threads = max(1, cores // world)
        result = spawn(_train, world, threads, layout, args)
        tokens = result["data_parallel"] * args.batch * args.seq_len * args.steps
        name = ", ".join(f"{k} {v}" for k, v in layout.items()) or "FSDP2"
        row = {
            "processes": world,
            "layout": name,
            "threads_each": threads,
            "tokens_per_s": tokens / result["seconds"],
        }
        rows.append(row)
        print(
            f"{world} process(es) x {threads} thread(s), {name}: {row['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["relative"] = row["tokens_per_s"] / base
    cp = spawn(_cp_bytes, 2, args)
    for key, value in cp.items():
        print(f"CP, 2 ranks, {key} tokens: {value:.0f} bytes sent per rank per Mamba2 layer (fwd + bwd)")
    payload = {
        "benchmark": "distributed_scaling",
        "preset": args.preset,
        "step": f"forward + backward + AdamW, {args.batch} x {args.seq_len} tokens a data rank, gloo, CPU",
        "machine": machine(),
        "cores": cores,
        "rows": rows,
        "cp_state_bytes_per_rank_per_mamba_layer": cp,
    }
    path = write_json("distributed_scaling.json", payload)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    fsdp = [r for r in rows if r["layout"] == "FSDP2"]
    ax.plot([r["processes"] for r in fsdp], [r["tokens_per_s"] for r in fsdp], "o-", label="FSDP2")
    for r in rows:
        if r["layout"] != "FSDP2":
            ax.plot([r["processes"]], [r["tokens_per_s"]], "s", label=r["layout"])
    ax.legend()
    ax.set(
        xlabel="processes (gloo, CPU)", ylabel="training tokens/s", title=f"{args.preset} on {cores} cores"
    )
    save_figure(fig, RESULTS / "distributed_scaling.png")
    print(f"wrote {path} and distributed_scaling.png")


if __name__ == "__main__":
    main()
