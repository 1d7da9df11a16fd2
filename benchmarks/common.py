"""Shared helpers for benchmarks: timing, results files, and Hugging Face baselines of the same shape."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from turbos.config import TurboSConfig
from turbos.model import TurboSForCausalLM

RESULTS = Path(__file__).resolve().parent / "results"

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")


def nemotron_h_like(config: TurboSConfig):
    """A Hugging Face NemotronH causal LM with our dimensions: same layer order (A -> attention,
    M -> Mamba2, F -> MoE, or a dense MLP with ffn_type 'dense'), widths, heads, groups, state,
    chunk and experts; its config is what ``turbos.interop.nemotron_h`` writes for ``config`` with
    NemotronH's own design choices put in.

    Differences that remain are that design: its experts are non-gated ReLU^2 MLPs (2 matrices;
    ours are SwiGLU, 3), sigmoid routing, and no RoPE or QK-norm in attention.
    """
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from turbos.interop import nemotron_h

    letters = "".join(config.layer_types)
    as_nemotron = config.replace(
        layout=letters.replace("F", "D") if config.ffn_type == "dense" else letters,
        ffn_type="moe",
        use_rope=False,
        use_qk_norm=False,
        attention_bias=False,
        mlp_activation="relu2",
        expert_activation="relu2",
        router_score="sigmoid",
        router_correction_bias=True,
        num_shared_experts=1,
        shared_expert_intermediate_size=config.shared_intermediate_size * config.num_shared_experts,
        router_groups=1,
        router_topk_groups=1,
    )
    hf = nemotron_h.config_to_hf(as_nemotron)
    hf["time_step_limit"] = config.time_step_limit  # config.json's encoding of infinity is for files
    hf = NemotronHConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "dtype")})
    hf._attn_implementation = "sdpa"
    return NemotronHForCausalLM(hf).eval()


def identical_pair(config: TurboSConfig):
    """(turbos model, transformers NemotronH) holding the same weights: a NemotronH of ``config``'s
    dimensions (``nemotron_h_like``) with its Mamba2 and router parameters drawn as a trained
    model's might be, converted into turbos by ``turbos.interop.nemotron_h`` (so ours has
    NemotronH's ReLU^2 experts, sigmoid routing and attention without RoPE). Both in eval mode."""
    from turbos.interop import nemotron_h

    theirs = nemotron_h_like(config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(0, 2)
            elif name.endswith("dt_bias"):
                p.uniform_(-4, -2)
            elif "norm" not in name and p.dim() > 1:
                p.normal_(0, config.initializer_range)
    ours_config = nemotron_h.config_from_hf(theirs.config.to_dict())
    ours = TurboSForCausalLM(ours_config)
    ours.load_state_dict(nemotron_h.state_from_hf(theirs.state_dict(), ours_config))
    return ours.eval(), theirs


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, object]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def demo_answers(doc: str, name: str) -> tuple[argparse.Namespace, Path, list[dict]]:
    """For benchmarks of a finished `turbos demo`: the parsed ``--run`` / ``--name`` arguments,
    the run's ``eval/answers.jsonl`` and its rows (SystemExit when the run has none)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a finished turbos demo folder")
    parser.add_argument("--name", default=name, help="results file name (no extension)")
    args = parser.parse_args()
    answers = args.run / "eval" / "answers.jsonl"
    if not answers.is_file():
        raise SystemExit(f"{answers} not found: run `turbos demo --out {args.run}` first")
    return args, answers, [json.loads(line) for line in answers.read_text().splitlines()]
