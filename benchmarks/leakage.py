"""Held-out problems of a finished `turbos demo` that the training data holds in another form.

The split hashes question text, so a commuted sum ("5 + 1" held out, "1 + 5" trained) or the same
sum asked as an expression ("Evaluate: 5 + 3" vs "What is 5 + 3?") can sit on both sides
(`turbos.data.tasks.equivalence`). This counts, per family and level, the evaluation problems
with an equivalent in any training set of the demo (pre-training's built-in reasoning documents,
the short-CoT SFT problems, the fusion problems), then recomputes the demo's table and its three
targets on the problems without one.

    python benchmarks/leakage.py [--run runs/demo] [--name leakage]

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_answers, write_json  # noqa: E402
from turbos.data.builtin import ReasoningDocs  # noqa: E402
from turbos.data.tasks import generate_problems  # noqa: E402
from turbos.data.tasks.equivalence import equivalence_key  # noqa: E402
from turbos.post.demo import DemoSettings, check_targets  # noqa: E402
from turbos.post.evaluate import Answer, builtin_problems, format_table, summarize  # noqa: E402


def main() -> None:
    args, answers_file, rows = demo_answers(__doc__, "leakage")
    run = args.run
    settings = DemoSettings.load(run / "settings.json")
    if settings.pretrain_overrides:
        raise SystemExit("this run overrides the pre-training recipe; its training data is not the default")
    fams, levels = list(settings.families), list(settings.levels)
    docs = ReasoningDocs()
    training = [
        *generate_problems(docs.n, seed=docs.seed),  # recipes/tiny.yaml: builtin:reasoning, defaults
        *generate_problems(settings.short_problems, families=fams, levels=levels, seed=settings.seed + 1),
        *generate_problems(settings.fusion_problems, families=fams, levels=levels, seed=settings.seed + 2),
    ]
    trained = {equivalence_key(p) for p in training}
    held_out = builtin_problems(
        settings.eval_per_level * len(fams) * len(levels), fams, levels, settings.seed
    )
    by_uid = {p.uid: p for p in held_out}
    if {r["uid"] for r in rows} != set(by_uid):
        raise SystemExit(f"{answers_file} is not this run's held-out set")
    leaked = {uid for uid, p in by_uid.items() if equivalence_key(p) in trained}

    counts: dict[str, dict[str, int]] = {}
    for p in held_out:
        entry = counts.setdefault(f"{p.family} {p.level}", {"problems": 0, "equivalent_in_training": 0})
        entry["problems"] += 1
        entry["equivalent_in_training"] += p.uid in leaked
    answers = [
        Answer(by_uid[r["uid"]], r["mode"], r["text"], r["correct"], r["tokens"], r["thought"]) for r in rows
    ]

    def results(keep) -> dict:
        return {
            mode: summarize([a for a in answers if a.mode == mode and keep(a.problem.uid)])
            for mode in ("no_think", "think", "auto")
        }

    subsets = {"all": results(lambda uid: True), "clean": results(lambda uid: uid not in leaked)}
    print(f"{len(leaked)} of {len(held_out)} held-out problems have an equivalent in the training data")
    for key, entry in counts.items():
        print(f"  {key}: {entry['equivalent_in_training']} / {entry['problems']}")
    payload = {"run": str(run), "leaked": len(leaked), "problems": len(held_out), "by_family_level": counts}
    for name, result in subsets.items():
        targets = check_targets(result)
        print(f"\n{name} problems ({result['auto']['overall']['n']}):\n{format_table(result)}")
        for target, value in targets.items():
            print(f"{'met ' if value['met'] else 'MISS'}  {target}: {value['measured']}")
        payload[name] = {"results": result, "targets": targets}
    write_json(f"{args.name}.json", payload)


if __name__ == "__main__":
    main()
