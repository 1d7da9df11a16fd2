"""The `turbos` command: one entry point with sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
import time

from turbos.config import ConfigError


def _cmd_params(args: argparse.Namespace) -> int:
    from turbos.params import count_parameters, format_count
    from turbos.presets import get_preset

    config = get_preset(args.preset)
    counts = count_parameters(config)
    if args.json:
        print(
            json.dumps(
                {"preset": args.preset, "layers": _layer_summary(config), "parameters": counts}, indent=2
            )
        )
        return 0
    print(f"preset {args.preset}: layout {config.layout!r} -> {_layer_summary(config)}")
    print(f"{'component':<16}{'total':>12}{'activated':>12}")
    for name, row in counts.items():
        if name == "total":
            print("-" * 40)
        print(f"{name:<16}{format_count(row['total']):>12}{format_count(row['activated']):>12}")
    return 0


def _layer_summary(config) -> dict[str, int]:
    kinds = config.layer_types
    return {"layers": len(kinds), "A": kinds.count("A"), "M": kinds.count("M"), "F": kinds.count("F")}


def _cmd_demo(args: argparse.Namespace) -> int:
    """Until the full pipeline lands: build `tiny`, show its parameters and run a forward pass."""
    import torch

    from turbos.model import HybridCache, TurboSForCausalLM
    from turbos.params import format_count
    from turbos.presets import get_preset

    torch.manual_seed(args.seed)
    config = get_preset("tiny")
    _cmd_params(argparse.Namespace(preset="tiny", json=False))
    model = TurboSForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, labels=ids)
        prefill = time.perf_counter() - start
        cache = HybridCache(config, 2)
        model(ids[:, :-1], past_key_values=cache)
        last = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
    gap = (last - out.logits[:, -1]).abs().max().item()
    print(f"\nforward: batch 2 x 64 tokens in {prefill * 1000:.1f} ms, logits {tuple(out.logits.shape)}")
    chance = torch.tensor(float(config.vocab_size)).log().item()
    print(f"loss of the untrained model {out.lm_loss.item():.3f} (ln vocab = {chance:.3f})")
    print(f"cached decode vs full forward, max |diff| of last logits: {gap:.2e}")
    print(f"cache holds {format_count(cache.nbytes())} bytes for 2 x 64 tokens")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbos", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="total and activated parameters per component of a preset")
    p.add_argument("--preset", default="turbos-560b")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("demo", help="the TurboS pipeline in miniature on built-in data")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"turbos {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
