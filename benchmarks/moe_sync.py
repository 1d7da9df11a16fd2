"""Training step of a preset with the pre-split MoE (tests/moe_reference.py) vs the current one.

The pre-split MoE reads routing counts on the host several times per layer and micro-batch (each a
device synchronisation on a GPU); the current one routes, dispatches, computes and combines with
no host read but the loop over experts where torch._grouped_mm has no kernel (CPU, fp32). One
step = forward with labels + backward + AdamW step in train mode (capacity and recycle routing on,
as in real training), the same starting weights and batch for both, one process, the two
alternating (each first in every other repetition); fp32 on CPU, bf16 autocast on CUDA.
Defaults: the `small` preset at the sequence length of recipes/small.yaml's first stage, batch 2
instead of its 16, so that a CPU step stays under ~2 s (benchmarks/train_step.py: 3.6 s at
batch 4 on 2 threads).

    python benchmarks/moe_sync.py [--preset small] [--batch 2] [--seq-len 512] [--steps 5] [--device auto]

Writes benchmarks/results/moe_sync.json: median step ms of each and the ratio pre-split / current.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see train_tiny.py); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import moe_reference as reference  # noqa: E402
from common import machine, write_json  # noqa: E402
from turbos.config import TurboSConfig  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.model.moe import MoE  # noqa: E402
from turbos.presets import get_preset  # noqa: E402


class PreSplitMoE(MoE):
    """An MoE layer (so the model treats it as one) running the pre-split router, experts and
    forward on the same parameter names."""

    forward = reference.MoE.forward

    def __init__(self, config: TurboSConfig) -> None:
        super().__init__(config)
        self.gate = reference.Router(config.hidden_size, config.num_experts)
        self.experts = reference.RoutedExperts(
            config.num_experts, config.hidden_size, config.expert_intermediate_size
        )


def with_pre_split_moe(model: TurboSForCausalLM) -> TurboSForCausalLM:
    """A copy of model whose MoE layers run the pre-split implementation, with the same weights."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                layer = PreSplitMoE(model.config).to(next(child.parameters()).device)
                layer.load_state_dict(child.state_dict(), strict=True)
                setattr(parent, name, layer.train(child.training))
    return model


def make_step(model: nn.Module, ids: torch.Tensor, device: torch.device) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each implementation")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    if min(args.batch, args.seq_len, args.steps) < 1:
        parser.error("--batch, --seq-len and --steps must be at least 1")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(0)

    config = get_preset(args.preset)
    ours = TurboSForCausalLM(config).to(device).train()
    pre_split = with_pre_split_moe(ours)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    steps = {"pre_split": make_step(pre_split, ids, device), "split": make_step(ours, ids, device)}
    for step in steps.values():  # warm-up: optimizer state, allocator, oneDNN / cuBLAS handles
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.steps):  # alternate the order so that background load hits both alike
        for name in sorted(steps, reverse=repeat % 2 == 1):
            times[name].append(1e3 * seconds(steps[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["pre_split"] / median["split"]
    print(
        f"{args.preset} train step, {args.batch} x {args.seq_len} tokens on {device.type}: "
        f"pre-split MoE {median['pre_split']:.1f} ms, split {median['split']:.1f} ms, "
        f"ratio {ratio:.2f}x"
    )
    path = write_json(
        "moe_sync.json",
        {
            "benchmark": "moe_sync",
            "preset": args.preset,
            "baseline": "pre-split MoE (tests/moe_reference.py) swapped into the same model, same weights",
            "step": "forward with labels + backward + AdamW, train mode, "
            + ("bf16 autocast" if device.type == "cuda" else "fp32"),
            "device": device.type,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "machine": machine(),
            "all_times_ms": times,
            "pre_split_ms": median["pre_split"],
            "split_ms": median["split"],
            "speedup": ratio,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
