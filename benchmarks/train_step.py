"""Training throughput of turbos `small` vs a Hugging Face NemotronH of the same dimensions.

One step = forward with labels + backward + AdamW step, in train mode (ours with MoE capacity and
recycle routing on, as in real training), fp32 on CPU, same batch for both, alternating the two
models in one process.

    python benchmarks/train_step.py [--batch 4] [--seq-len 512] [--steps 3]

Writes benchmarks/results/train_step.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, nemotron_h_like, time_call, write_json  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.presets import get_preset  # noqa: E402


def make_step(model: torch.nn.Module, ids: torch.Tensor):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = get_preset(args.preset)
    ours = TurboSForCausalLM(config).train()
    theirs = nemotron_h_like(config).train()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len))
    step_ours, step_theirs = make_step(ours, ids), make_step(theirs, ids)
    step_ours(), step_theirs()  # warm-up: optimizer state allocation, oneDNN primitives
    t_ours, t_theirs = [], []
    for _ in range(args.steps):  # alternate so background load hits both alike
        t_ours.append(time_call(step_ours, 1, warmup=0))
        t_theirs.append(time_call(step_theirs, 1, warmup=0))
    tokens = args.batch * args.seq_len
    row = {
        "turbos_s": min(t_ours),
        "nemotron_h_s": min(t_theirs),
        "turbos_tok_s": tokens / min(t_ours),
        "nemotron_h_tok_s": tokens / min(t_theirs),
        "speedup": min(t_theirs) / min(t_ours),
    }
    print(
        f"train step, {args.batch} x {args.seq_len} tokens: turbos {row['turbos_tok_s']:.0f} tok/s, "
        f"NemotronH {row['nemotron_h_tok_s']:.0f} tok/s, ratio {row['speedup']:.2f}x"
    )
    path = write_json(
        "train_step.json",
        {
            "benchmark": "train_step",
            "preset": args.preset,
            "baseline": "transformers NemotronHForCausalLM, same dimensions, PyTorch path, sdpa attention",
            "step": "forward with labels + backward + AdamW, fp32, train mode",
            "batch": args.batch,
            "seq_len": args.seq_len,
            "machine": machine(),
            "parameters": {
                "turbos": ours.num_parameters(),
                "nemotron_h": sum(p.numel() for p in theirs.parameters()),
            },
            "all_times_s": {"turbos": t_ours, "nemotron_h": t_theirs},
            **row,
            "target": 1.0,
            "met": row["speedup"] >= 1.0,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
