"""Multi-round deliberation learning (turbos.rl.deliberate): consensus, rule judges, profile, loss
data, and one end-to-end round on tiny models."""

from __future__ import annotations

import json

import pytest

from turbos.data.tasks import Problem, verify
from turbos.post.sft import read_conversations
from turbos.rl.deliberate import (
    DIMENSIONS,
    ModelJudge,
    Panel,
    PanelJudge,
    Reply,
    RuleJudge,
    ScriptedContestant,
    category_of,
    consensus,
    deliberate,
    deliberation_problems,
    loss_data,
    overall_outcome,
    profile_round,
    teacher_target,
    weakness_quotas,
)
from turbos.rl.judge import Verdict

PROBLEM = Problem("add", 1, "What is 2 + 2?", "4", ("2+2=4",), "add-1-x")


def rule_vote(dimension: str, model: str, rival: str) -> int:
    return RuleJudge().vote(dimension, Reply.of(PROBLEM, model), Reply.of(PROBLEM, rival))


# --------------------------------------------------------------------------------------- consensus
def test_majority_consensus():
    assert consensus([("a", 1), ("b", 1), ("c", -1)], "majority") == 1
    assert consensus([("a", 1), ("b", -1)], "majority") == 0  # a tie between the top options
    assert consensus([("a", 1), ("b", 0), ("c", 0)], "majority") == 0  # "tie" has the most votes
    assert consensus([("a", -1), ("b", -1), ("c", 0), ("d", 1)], "majority") == -1
    assert consensus([], "majority") == 0


def test_weighted_consensus():
    votes = [("a", 1), ("b", -1), ("c", -1)]
    assert consensus(votes, "weighted") == -1  # default weight 1 each: 1 - 2
    assert consensus(votes, "weighted", {"a": 3.0}) == 1  # 3 - 2
    assert consensus(votes, "weighted", {"a": 2.0}) == 0  # 2 - 2
    assert consensus(votes, "weighted", {"b": 0.25, "c": 0.25}) == 1  # 1 - 0.5
    with pytest.raises(ValueError, match="consensus rule"):
        consensus(votes, "unanimous")  # type: ignore[arg-type]


def test_overall_outcome_weights_dimensions():
    dims = {"accuracy": -1, "conciseness": 1, "coherence": 1}
    assert overall_outcome(dims) == 0  # accuracy weighs 2 by default: -2 + 1 + 1
    assert overall_outcome(dims, {"accuracy": 3.0}) == -1
    assert overall_outcome(dims, {"accuracy": 1.0}) == 1


class Contrarian(PanelJudge):
    """Always prefers the rival on coherence, abstains on everything else."""

    name = "contrarian"

    def votes(self, problem, model, rival):
        return {"coherence": -1}


def test_panel_majority_and_weighted():
    model, rival = "Answer: 4", "a b c d a b c d a b c d\nAnswer: 4"  # the rival repeats itself
    two_rules = [RuleJudge("r1"), RuleJudge("r2")]
    majority = Panel([*two_rules, Contrarian()]).compare(PROBLEM, model, rival)
    assert majority["votes"]["contrarian"] == {"coherence": -1}
    assert majority["dimensions"]["coherence"] == 1  # two of three
    assert majority["dimensions"]["accuracy"] == 0
    weighted = Panel([*two_rules, Contrarian()], "weighted", {"contrarian": 3.0})
    assert weighted.compare(PROBLEM, model, rival)["dimensions"]["coherence"] == -1  # 1 + 1 - 3
    with pytest.raises(ValueError, match="unique"):
        Panel([RuleJudge(), RuleJudge()])


def test_model_judge_vote_and_abstention():
    class FakeJudge:
        def __init__(self, score):
            self.score = score

        def compare(self, question, candidate, reference):
            return Verdict(score=self.score)

    model, rival = Reply.of(PROBLEM, "Answer: 4"), Reply.of(PROBLEM, "Answer: 5")
    votes = ModelJudge(FakeJudge(0.75)).votes(PROBLEM, model, rival)
    assert "accuracy" not in votes and set(votes.values()) == {1} and len(votes) == len(DIMENSIONS) - 1
    assert set(
        ModelJudge(FakeJudge(0.25), dimensions=["helpfulness"]).votes(PROBLEM, model, rival).values()
    ) == {-1}
    assert ModelJudge(FakeJudge(0.5)).votes(PROBLEM, model, rival)["coherence"] == 0
    assert ModelJudge(FakeJudge(None)).votes(PROBLEM, model, rival) == {}


# ------------------------------------------------------------------------------------- rule judges
EXPLAINS = "2+2=4\nAnswer: 4"
BARE = "Answer: 4"
WRONG = "Answer: 5"
NO_LINE = "four"
REPEATS = "a b c d a b c d a b c d a b c d\nAnswer: 4"


def test_rule_accuracy_and_helpfulness():
    assert rule_vote("accuracy", BARE, WRONG) == 1
    assert rule_vote("accuracy", WRONG, BARE) == -1
    assert rule_vote("accuracy", BARE, EXPLAINS) == 0
    assert rule_vote("accuracy", "so \\boxed{4}", WRONG) == 1  # the verifier reads \boxed too
    assert rule_vote("helpfulness", EXPLAINS, BARE) == 1  # correct and explains > correct bare
    assert rule_vote("helpfulness", BARE, WRONG) == 1  # correct bare > wrong
    assert rule_vote("helpfulness", "5 because 2+3\nAnswer: 5", NO_LINE) == 0  # wrong is wrong
    assert rule_vote("helpfulness", "<think>\n2+2=4\n</think>\nAnswer: 4", BARE) == 1  # reasoning explains


def test_rule_conciseness_coherence_adherence_harmlessness():
    assert rule_vote("conciseness", BARE, EXPLAINS) == 1  # both correct: shorter wins
    assert rule_vote("conciseness", EXPLAINS, BARE) == -1
    assert rule_vote("conciseness", WRONG, EXPLAINS) == 0  # not equally accurate: no verdict
    assert rule_vote("conciseness", "So:\nAnswer: 4", "So:\nAnswer:  4") == 0  # within 10%
    assert rule_vote("coherence", BARE, REPEATS) == 1
    assert rule_vote("coherence", REPEATS, BARE) == -1
    assert rule_vote("coherence", BARE, EXPLAINS) == 0
    assert rule_vote("coherence", "", BARE) == -1  # an empty reply is incoherent
    assert rule_vote("instruction_adherence", BARE, NO_LINE) == 1
    assert rule_vote("instruction_adherence", "so \\boxed{4}", BARE) == -1  # boxed is not the format
    assert rule_vote("instruction_adherence", WRONG, BARE) == 0  # the line exists, right or wrong
    assert rule_vote("harmlessness", "Answer: 4 <SCRIPT>x</script>", BARE) == -1
    assert rule_vote("harmlessness", BARE, WRONG) == 0
    assert (
        RuleJudge(banned=["four"]).vote("harmlessness", Reply.of(PROBLEM, BARE), Reply.of(PROBLEM, NO_LINE))
        == 1
    )
    with pytest.raises(ValueError, match="unknown dimensions"):
        RuleJudge(dimensions=["style"])


# ------------------------------------------------------------------------------ profile, loss data
def scripted_setup(wrong_l1: int = 0):
    """add L1/L2, 4 prompts each. The model: bare answers, right on L1 (but the first
    ``wrong_l1``), wrong on L2. Rival "good": the teacher's solution everywhere; rival "sloppy":
    wrong on L1, right and bare on L2."""
    problems = deliberation_problems(4, ["add"], [1, 2], seed=3)
    l1 = [p for p in problems if p.level == 1]
    model = {
        p.question: "Answer: -1" if p.level == 2 or p in l1[:wrong_l1] else f"Answer: {p.answer}"
        for p in problems
    }
    good = {p.question: teacher_target(p) for p in problems}
    sloppy = {p.question: "Answer: -1" if p.level == 1 else f"Answer: {p.answer}" for p in problems}
    rivals = [ScriptedContestant("good", good), ScriptedContestant("sloppy", sloppy)]
    return problems, ScriptedContestant("model", model), rivals


def test_profile_and_weakest_category(tmp_path):
    problems, model, rivals = scripted_setup()
    assert all(p.uid for p in problems) and {category_of(p) for p in problems} == {"add L1", "add L2"}
    profile, pairs = profile_round(model, rivals, problems, Panel(), tmp_path)
    assert len(pairs) == 16
    l1, l2 = profile["categories"]["add L1"], profile["categories"]["add L2"]
    # L1: a tie with "good" (accuracy equal, helpfulness -1, conciseness +1), a win over "sloppy"
    good = l1["rivals"]["good"]
    assert (good["wins"], good["ties"], good["losses"], good["rival_accuracy"]) == (0, 4, 0, 1.0)
    assert (l1["rivals"]["sloppy"]["wins"], l1["accuracy"], l1["score"]) == (4, 1.0, 0.5)
    assert (l2["rivals"]["good"]["losses"], l2["rivals"]["sloppy"]["losses"]) == (4, 4)
    assert (l2["accuracy"], l2["score"], l2["loss_rate"]) == (0.0, -1.0, 1.0)
    assert profile["weakest"] == "add L2"
    assert profile["overall"]["accuracy"] == 0.5
    assert json.loads((tmp_path / "profile.json").read_text())["weakest"] == "add L2"
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert "**add L2** (weakest)" in (tmp_path / "profile.md").read_text()
    assert len((tmp_path / "pairs.jsonl").read_text().splitlines()) == 16


def test_weakest_tie_breaks_on_accuracy(tmp_path):
    problems = deliberation_problems(2, ["add"], [1, 2], seed=1)
    # the model and the rival give the same replies: all ties, scores 0; L1 right, L2 wrong
    same = {p.question: f"Answer: {p.answer}" if p.level == 1 else "Answer: -1" for p in problems}
    profile, _ = profile_round(
        ScriptedContestant("model", same), [ScriptedContestant("twin", same)], problems, Panel(), tmp_path
    )
    assert {c["score"] for c in profile["categories"].values()} == {0.0}
    assert profile["weakest"] == "add L2"


def test_weakness_quotas():
    profile = {"categories": {"A": {"score": -1.0}, "B": {"score": 0.0}, "C": {"score": 1.0}}}
    assert weakness_quotas(profile, {"A": 10, "B": 10, "C": 10}, 6) == {"A": 4, "B": 2, "C": 0}
    assert weakness_quotas(profile, {"A": 2, "B": 10, "C": 10}, 6) == {"A": 2, "B": 2, "C": 0}  # capped
    assert weakness_quotas(profile, {"A": 10, "B": 0}, 0) == {"A": 0, "B": 0}


def test_loss_data_toward_weak_category(tmp_path):
    problems, model, rivals = scripted_setup(wrong_l1=2)
    profile, pairs = profile_round(model, rivals, problems, Panel(), tmp_path)
    # L1: the 2 wrong lose to "good" and tie "sloppy"; the 2 right tie "good" and beat "sloppy"
    assert profile["categories"]["add L1"]["score"] == 0.0
    everything = loss_data(pairs, profile, keep_share=0.0)
    assert sorted(r["meta"]["category"] for r in everything) == ["add L1"] * 2 + ["add L2"] * 4
    # budget 3 by weakness 0.5 : 1 -> L1 1, L2 2; one kept own reply (3 x 0.25)
    records = loss_data(pairs, profile, budget=3, keep_share=0.25, seed=0)
    losses = [r for r in records if r["meta"]["kind"] == "loss"]
    keeps = [r for r in records if r["meta"]["kind"] == "keep"]
    assert sorted(r["meta"]["category"] for r in losses) == ["add L1", "add L2", "add L2"]
    assert (
        len(keeps) == 1 and keeps[0]["meta"]["category"] == "add L1" and keeps[0]["meta"]["source"] == "self"
    )
    by_uid = {p.uid: p for p in problems}
    for r in records:
        reply = r["messages"][1]["content"]
        assert reply.startswith("<think>") and verify(by_uid[r["meta"]["uid"]], reply)
        assert r["meta"]["source"] in ("rival:good", "self")  # the first correct winner
    assert len({json.dumps(r["messages"]) for r in records}) == len(records)
    path = tmp_path / "loss.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [c[1]["content"] for c in read_conversations(path)] == [
        r["messages"][1]["content"] for r in records
    ]


def test_loss_data_falls_back_to_the_teacher(tmp_path):
    problems = deliberation_problems(2, ["add"], [2], seed=0)
    wrong = ScriptedContestant("model", {}, default="Answer: -1")
    profile, pairs = profile_round(
        wrong, [ScriptedContestant("bad", {}, default="no idea")], problems, Panel(), tmp_path
    )
    records = loss_data(pairs, profile)
    assert len(records) == 2 and {r["meta"]["source"] for r in records} == {"teacher"}
    p = problems[0]
    target = next(r for r in records if r["meta"]["uid"] == p.uid)["messages"][1]["content"]
    assert target == "<think>\n" + "\n".join(p.steps) + f"\n</think>\nAnswer: {p.answer}"


def test_contestant_names_must_differ(tmp_path):
    problems = deliberation_problems(1, ["add"], [1])
    same = ScriptedContestant("x", {})
    with pytest.raises(ValueError, match="unique"):
        profile_round(same, [ScriptedContestant("x", {})], problems, Panel(), tmp_path)


def test_cli_parses_deliberate():
    from turbos.cli import _cmd_deliberate, build_parser

    args = build_parser().parse_args(
        ["deliberate", "--model", "m", "--rival", "r1", "--rival", "http://h:1/v1#x", "--rounds", "2"]
    )
    assert args.func is _cmd_deliberate and args.rival == ["r1", "http://h:1/v1#x"] and args.rounds == 2
    assert (args.out, args.per_category, args.sft_steps) == ("runs/deliberate", 4, 20)


# ---------------------------------------------------------------------------------- end to end
def test_one_round_end_to_end(tmp_path):
    from serve_helpers import save_model_dir

    model = save_model_dir(tmp_path / "model")
    rival = save_model_dir(tmp_path / "rival")
    summary = deliberate(
        model,
        [str(rival)],
        tmp_path / "out",
        rounds=1,
        prompts_per_category=2,
        sft_steps=2,
        families=["add"],
        levels=[1, 2],
        max_tokens=8,
        sft_batch=2,
        device="cpu",
    )
    out = tmp_path / "out"
    for name in ("profile.json", "profile.md", "profile.png", "pairs.jsonl", "loss_data.jsonl"):
        assert (out / "round-0" / name).is_file(), name
    assert (out / "final" / "profile.json").is_file() and (out / "summary.json").is_file()
    (round0,) = summary["rounds"]
    assert (
        round0["loss_records"] == len(read_conversations(round0["loss_data"])) > 0
    )  # random model: all wrong
    assert round0["sft"]["steps"] == 2 and summary["final"]["model"] == round0["sft"]["model_dir"]
    assert summary["weakest_round0"] in round0["profile"]["categories"]
    assert isinstance(summary["weakest_improved"], bool)
    assert json.loads((out / "summary.json").read_text())["weakest_round0"] == summary["weakest_round0"]


def test_an_endpoint_rival_answers_through_the_shared_chat_endpoint() -> None:
    from fastapi import FastAPI

    from serve_helpers import serving
    from turbos.rl.deliberate import EndpointContestant

    app, seen = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        seen.append(body)
        message = {"content": "Answer: 4", "reasoning_content": "2 + 2 = 4"}
        return {"choices": [{"index": 0, "message": message}]}

    with serving(app) as url:
        rival = EndpointContestant(url, "judge-model", name="rival", max_tokens=16)
        assert rival.answer(["What is 2 + 2?"]) == ["<think>\n2 + 2 = 4\n</think>\nAnswer: 4"]
    assert seen[0]["model"] == "judge-model" and seen[0]["max_tokens"] == 16
    closed = EndpointContestant(url, "m", name="gone", timeout=2)
    with pytest.raises(ConnectionError, match="contestant gone"):
        closed.answer(["q"])
