"""When does auto think? Auto's choice against the best possible one, on a finished `turbos demo`.

Reads the demo's held-out answers (``eval/answers.jsonl``: every problem in no_think, think and
auto) and its adaptive model, then compares, as (accuracy, tokens as a share of think's):

- think (always) and no_think (never);
- auto, as measured, and auto re-played from the model's greedy first token (must agree);
- thresholds on the model's probability of skipping thought: think unless p(</think>) >= tau;
- the fusion rule applied perfectly: think exactly where the direct answer is wrong;
- difficulty rules: think exactly on the problems of level >= k;
- the oracle frontier (``routing_analysis``): per problem the cheaper answer, then the
  cheapest switches to the right one; no router of these two answers does better;
- the same oracle held to the thinking-rate target (>= 80% of the hardest level, <= 20% of the
  easiest), so that it could meet all three targets at once;
- the informed frontier, held to the same target: the best router that knows each problem's
  family, level and whether its direct answer is right, but not whether thinking is (what
  fusion's labels carry), with its best accuracy at 60% of think's tokens.

    python benchmarks/routing.py [--run runs/demo] [--name routing]

Writes benchmarks/results/<name>.json and <name>.png (the frontier, the thresholds, the modes and
the demo's target region: within 3 points of think at <= 60% of its tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_answers, write_json  # noqa: E402
from routing_analysis import (  # noqa: E402
    describe_bounds,
    frontier_summary,
    skip_probabilities,
    target_think_bounds,
)
from turbos.data.tokenizer import load_tokenizer  # noqa: E402
from turbos.model import TurboSForCausalLM  # noqa: E402
from turbos.post.demo import MAX_DROP, MAX_TOKEN_RATIO  # noqa: E402
from turbos.post.routing import outcome_counts, paired, routed  # noqa: E402
from turbos.train.plots import pyplot, save_figure  # noqa: E402

TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def main() -> None:
    args, answers, rows = demo_answers(__doc__, "routing")
    run = args.run
    choices = paired(rows)
    auto_rows = {r["uid"]: r for r in rows if r["mode"] == "auto"}
    n = len(choices)
    bounds = target_think_bounds(c.level for c in choices)
    summary = frontier_summary(choices, MAX_DROP, bounds, MAX_TOKEN_RATIO)
    think_tokens, think_accuracy = summary["think_tokens"], summary["think_accuracy"]

    model_dir = run / "sft-adaptive" / "model"
    model = TurboSForCausalLM.from_pretrained(model_dir).eval()
    p_skip, greedy_skip = skip_probabilities(model, load_tokenizer(model_dir), [c.question for c in choices])

    def point(accuracy: float, tokens: float) -> dict[str, float]:
        return {"accuracy": accuracy, "token_ratio": tokens / think_tokens}

    auto_measured = point(
        sum(auto_rows[c.uid]["correct"] for c in choices) / n,
        sum(auto_rows[c.uid]["tokens"] for c in choices) / n,
    )
    replayed = point(*routed(choices, [not s for s in greedy_skip]))
    agree = sum((not s) == auto_rows[c.uid]["thought"] for c, s in zip(choices, greedy_skip, strict=True)) / n
    fusion_rule = summary["fusion_rule"]
    thresholds = {tau: point(*routed(choices, [p < tau for p in p_skip])) for tau in TAUS}
    frontier = [point(*p) for p in summary["oracle_frontier"]]
    bounded_frontier = [point(*p) for p in summary.get("bounded_oracle_frontier", [])]
    informed_frontier = [point(*p) for p in summary["informed_frontier"]]
    informed = summary["informed_accuracy"]
    in_target = [
        tau
        for tau, p in thresholds.items()
        if p["accuracy"] >= think_accuracy - MAX_DROP and p["token_ratio"] <= MAX_TOKEN_RATIO
    ]

    print(f"{n} problems from {answers}")
    print(f"outcomes (which modes are right): {summary['counts']}")
    by_level = {
        level: outcome_counts([c for c in choices if c.level == level])
        for level in sorted({c.level for c in choices})
    }
    for level, counts in by_level.items():
        print(f"  level {level}: {counts}")
    print(f"think     accuracy {think_accuracy:6.1%}  tokens 100%")
    print(f"auto      accuracy {auto_measured['accuracy']:6.1%}  tokens {auto_measured['token_ratio']:4.0%}")
    print(
        f"replayed  accuracy {replayed['accuracy']:6.1%}  tokens {replayed['token_ratio']:4.0%}"
        f"  (greedy first token; agrees with auto on {agree:.1%} of problems)"
    )
    print(
        f"fusion rule accuracy {fusion_rule['accuracy']:6.1%}  tokens {fusion_rule['token_ratio']:4.0%}"
        "  (think exactly where the direct answer is wrong)"
    )
    for rule in summary["level_rules"]:
        print(
            f"level >= {rule['from_level']}  accuracy {rule['accuracy']:6.1%}  "
            f"tokens {rule['token_ratio']:4.0%}  (think exactly from this level up)"
        )
    for tau, p in thresholds.items():
        print(f"p(skip) >= {tau:<4}  accuracy {p['accuracy']:6.1%}  tokens {p['token_ratio']:4.0%}")
    oracle = summary["oracle_token_ratio"]
    print(
        f"oracle: within {MAX_DROP:.0%} of think at "
        + ("(out of reach)" if oracle is None else f"{oracle:.0%} of its tokens")
    )
    if bounds:
        bounded = summary["bounded_oracle_token_ratio"]
        print(
            f"oracle {describe_bounds(bounds)}: within {MAX_DROP:.0%} of think at "
            + ("(out of reach)" if bounded is None else f"{bounded:.0%} of its tokens")
        )
    print(
        f"informed router, {describe_bounds(bounds) if bounds else 'unbounded'}: at {MAX_TOKEN_RATIO:.0%} of "
        "think's tokens "
        + (
            "(out of reach)"
            if informed is None
            else f"accuracy {informed:6.1%} ({(informed - think_accuracy) * 100:+.1f} points)"
        )
    )
    print(f"thresholds inside the target region: {in_target or 'none'}")

    payload = {
        "run": str(run),
        "problems": n,
        "outcomes": summary["counts"],
        "outcomes_by_level": {str(k): v for k, v in by_level.items()},
        "think": point(think_accuracy, think_tokens),
        "no_think": point(
            sum(c.direct_correct for c in choices) / n, sum(c.direct_tokens for c in choices) / n
        ),
        "auto": auto_measured,
        "auto_replayed": replayed,
        "replay_agreement": agree,
        "fusion_rule": fusion_rule,
        "level_rules": summary["level_rules"],
        "thresholds": {str(tau): p for tau, p in thresholds.items()},
        "oracle_token_ratio_within_3_points": oracle,
        "think_bounds": summary.get("think_bounds"),
        "bounded_oracle_token_ratio_within_3_points": summary.get("bounded_oracle_token_ratio"),
        "thresholds_in_target": in_target,
        "informed_accuracy_at_max_token_ratio": informed,
        "oracle_frontier": frontier,
        "bounded_oracle_frontier": bounded_frontier,
        "informed_frontier": informed_frontier,
    }
    write_json(f"{args.name}.json", payload)
    plot(payload, RESULTS / f"{args.name}.png")


def plot(payload: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    think = payload["think"]
    ax.axvspan(0, MAX_TOKEN_RATIO * 100, color="tab:green", alpha=0.06)
    ax.axhline((think["accuracy"] - MAX_DROP) * 100, color="tab:green", lw=0.8, ls=":")
    ax.text(2, (think["accuracy"] - MAX_DROP) * 100 + 1, "target: within 3 points, <= 60% tokens", fontsize=8)
    curves = (  # (payload key, format, colour, label)
        ("oracle_frontier", "-", "tab:gray", "oracle router (best possible)"),
        (
            "bounded_oracle_frontier",
            "--",
            "tab:olive",
            "oracle, thinking on >= 80% of hardest, <= 20% of easiest",
        ),
        ("informed_frontier", "-.", "tab:cyan", "knows where the direct answer fails (same thinking rates)"),
        ("thresholds", "o--", "tab:purple", "think unless p(skip) >= tau"),
        ("level_rules", "x:", "tab:brown", "think on level >= k (k = 1 at right)"),
    )
    for key, fmt, color, label in curves:
        points = payload[key].values() if isinstance(payload[key], dict) else payload[key]
        if points:
            xs, ys = zip(*((p["token_ratio"] * 100, p["accuracy"] * 100) for p in points), strict=True)
            ax.plot(xs, ys, fmt, ms=3, color=color, label=label)
    for name, marker in (("no_think", "s"), ("think", "^"), ("auto", "o"), ("fusion_rule", "D")):
        p = payload[name]
        ax.scatter(p["token_ratio"] * 100, p["accuracy"] * 100, s=80, marker=marker, zorder=3, label=name)
    ax.set_xlabel("mean generated tokens (% of think)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("When to think: auto vs the best per-problem choice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)


if __name__ == "__main__":
    main()
