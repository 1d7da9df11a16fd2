"""Adaptive long-short CoT fusion builds its data as the report says (§3.2.1)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from serve_helpers import save_model_dir
from turbos.cli import main
from turbos.data.tasks import extract_answer, generate_problems, render_short, verify
from turbos.post.cot_fusion import (
    CHECK,
    REFLECTION,
    BuiltinTeacher,
    EndpointTeacher,
    FusedExample,
    ModelTeacher,
    TeacherError,
    check_output,
    fuse_dataset,
    fuse_example,
    house_style,
    teacher_prompt,
    write_jsonl,
)


class ScriptedTeacher:
    """Gets it wrong `wrong_rounds` times, then continues with the right derivation."""

    def __init__(self, wrong_rounds: int) -> None:
        self.wrong_rounds, self.calls = wrong_rounds, []

    def continue_reasoning(self, problem, attempts):
        self.calls.append(list(attempts))
        if len(self.calls) <= self.wrong_rounds:
            return f"Hmm, guessing again.\nAnswer: {int(problem.answer) + 1}"
        return BuiltinTeacher().continue_reasoning(problem, attempts)


def problems(n=12):
    return generate_problems(n, families=["add", "expr"], levels=[3, 4], seed=3)


def test_correct_short_answer_is_kept_as_is() -> None:
    p = problems(1)[0]
    ex = fuse_example(p, render_short(p), ScriptedTeacher(0))
    assert ex.response == "<think></think>" + render_short(p), "short answers sit behind an empty think block"
    assert not ex.thought and ex.teacher_rounds == 0


def test_wrong_answer_becomes_attempt_plus_teacher_continuation() -> None:
    p = problems(1)[0]
    wrong = f"Answer: {int(p.answer) + 7}"
    ex = fuse_example(p, wrong, ScriptedTeacher(0))
    assert ex.thought and ex.teacher_rounds == 1
    think, final = ex.response.split("</think>")
    assert think.startswith("<think>\n" + wrong + "\n" + REFLECTION)
    assert all(step in think for step in p.steps), "the whole derivation is inside <think>"
    assert final.strip() == render_short(p) and verify(p, ex.response)
    assert extract_answer(think) == extract_answer(wrong), "the only answer line in <think> is the attempt's"


def test_teacher_is_asked_again_with_every_failed_attempt() -> None:
    p = problems(1)[0]
    teacher = ScriptedTeacher(wrong_rounds=2)
    ex = fuse_example(p, "Answer: 0", teacher, max_rounds=3)
    assert ex.teacher_rounds == 3 and len(teacher.calls) == 3
    assert [len(c) for c in teacher.calls] == [1, 2, 3], "each round sees all failed attempts so far"
    assert ex.response.count("Hmm, guessing again.") == 2 and verify(p, ex.response)


def test_example_is_dropped_when_the_teacher_never_succeeds() -> None:
    p = problems(1)[0]
    assert fuse_example(p, "Answer: 0", ScriptedTeacher(wrong_rounds=5), max_rounds=3) is None


def test_dataset_counts_and_records_carry_no_mode_prompt() -> None:
    ps = problems(12)
    short = [render_short(p) if i % 3 else "Answer: -1" for i, p in enumerate(ps)]
    examples, stats = fuse_dataset(ps, short, BuiltinTeacher())
    assert (stats.short, stats.long, stats.dropped) == (8, 4, 0) and len(examples) == 12
    for ex in examples:
        record = ex.to_record()
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][0]["content"] == ex.problem.question, "plain problem, no /think flag"
        assert verify(ex.problem, record["messages"][1]["content"])


def test_house_style_keeps_one_final_answer_line() -> None:
    text = "<think>\nfirst 2+2=5?\n\nAnswer: 5\nno, 2+2=4\n</think>\n\nAnswer: 4."
    assert house_style(text) == "first 2+2=5?\nno, 2+2=4\nAnswer: 4"


def test_several_answers_count_as_solved_only_when_all_are_right() -> None:
    p = problems(1)[0]
    right, wrong = render_short(p), f"Answer: {int(p.answer) + 3}"
    ex = fuse_example(p, [right, right, right], ScriptedTeacher(0))
    assert not ex.thought and ex.response == "<think></think>" + right
    ex = fuse_example(p, [right, wrong, f"Answer: {int(p.answer) + 5}"], ScriptedTeacher(0))
    assert ex.thought, "a lucky greedy answer is not a reliable skill"
    assert ex.response.startswith("<think>\n" + wrong + "\n" + REFLECTION), (
        "the first wrong answer is the attempt"
    )
    examples, stats = fuse_dataset([p, p], [[right, right], [right, wrong]], BuiltinTeacher())
    assert (stats.short, stats.long) == (1, 1)


def test_checked_example_confirms_the_right_attempt_in_a_think_block() -> None:
    p = problems(1)[0]
    right = render_short(p)
    ex = fuse_example(p, [right, right], ScriptedTeacher(0), check=True)
    assert ex.checked and ex.thought and ex.teacher_rounds == 1
    think, final = ex.response.split("</think>")
    assert think.startswith("<think>\n" + right + "\n" + CHECK + "\n"), "the attempt, then the check line"
    assert REFLECTION not in think, "a right attempt is not called wrong"
    assert all(step in think for step in p.steps) and final.strip() == right
    assert ex.to_record()["meta"]["checked"] is True
    wrong = fuse_example(p, f"Answer: {int(p.answer) + 1}", ScriptedTeacher(0), check=True)
    assert not wrong.checked and REFLECTION in wrong.response, "check only applies to solved problems"


def test_check_falls_back_to_the_short_answer_when_the_derivation_is_wrong() -> None:
    p = problems(1)[0]
    ex = fuse_example(p, render_short(p), ScriptedTeacher(wrong_rounds=1), check=True)
    assert not ex.checked and ex.response == "<think></think>" + render_short(p)


def test_check_share_picks_a_reproducible_share_of_the_solved_problems() -> None:
    ps = generate_problems(200, families=["add"], levels=[1, 2], seed=5)
    short = [render_short(p) if i % 4 else "Answer: -1" for i, p in enumerate(ps)]
    _, stats0 = fuse_dataset(ps, short, BuiltinTeacher(), check_share=0.0)
    _, stats1 = fuse_dataset(ps, short, BuiltinTeacher(), check_share=1.0)
    assert (stats0.checked, stats0.short) == (0, 150) and (stats1.checked, stats1.short) == (150, 0)
    assert stats0.long == stats1.long == 50
    some, stats = fuse_dataset(ps, short, BuiltinTeacher(), check_share=0.2, seed=1)
    again, _ = fuse_dataset(ps, short, BuiltinTeacher(), check_share=0.2, seed=1)
    assert 15 <= stats.checked <= 45 and stats.short + stats.checked == 150
    assert [e.response for e in some] == [e.response for e in again]
    assert stats.to_dict()["checked"] == stats.checked
    with pytest.raises(ValueError, match="check_share"):
        fuse_dataset(ps, short, BuiltinTeacher(), check_share=1.5)


def test_teachers_reason_from_scratch_when_there_is_no_attempt() -> None:
    p = problems(1)[0]
    assert BuiltinTeacher().continue_reasoning(p, []) == "\n".join((*p.steps, render_short(p)))
    prompt = teacher_prompt(p, [])
    assert prompt.startswith(p.question) and "attempt" not in prompt.lower()
    engine = ScriptedEngine("7+0+0=7\n</think>\nAnswer: 1357")
    ModelTeacher(engine).continue_reasoning(p, [])
    assert engine.prompts[0].endswith("<|assistant|><think>") and p.question in engine.prompts[0]


class ScriptedEngine:
    """Stands in for LLMEngine.generate: records prompts and parameters, returns a fixed text.
    One token per byte of a prompt, in a context of ``max_context`` tokens."""

    def __init__(self, text: str, max_context: int = 4096) -> None:
        self.text, self.prompts, self.params = text, [], []
        self.max_context = max_context

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def generate(self, prompts, params):
        self.prompts += prompts
        self.params += params
        return [SimpleNamespace(text=self.text, token_ids=[]) for _ in prompts]


def test_model_teacher_thinks_on_the_failed_attempts_and_answers_in_house_style() -> None:
    p = problems(1)[0]
    thought = f"Attempt 1 was wrong.\n\n{p.steps[0]}\n</think>\n"
    engine = ScriptedEngine(f"{thought}The answer is {p.answer}.\nAnswer: {p.answer}")
    reply = ModelTeacher(engine, max_tokens=77).continue_reasoning(p, ["Answer: 7", "Answer: 8"])
    assert reply == f"Attempt 1 was wrong.\n{p.steps[0]}\nThe answer is {p.answer}.\nAnswer: {p.answer}"
    (prompt,), (params,) = engine.prompts, engine.params
    assert prompt.endswith("<|assistant|><think>"), "think mode: the reply starts inside the reasoning"
    assert "Attempt 1:\nAnswer: 7" in prompt and "Attempt 2:\nAnswer: 8" in prompt
    assert params.temperature == 0.0 and params.max_tokens == 77
    assert params.banned_first_token_ids, "think mode: the reasoning may not be empty"
    assert verify(p, reply)


def test_model_teacher_replies_within_the_context_and_fails_a_round_with_no_room() -> None:
    """The prompt grows with every failed attempt; max_tokens used to stay fixed, and a prompt
    near the context's end raised ContextLengthError, which ended the whole run."""
    p, attempts = problems(1)[0], ["Answer: 7"]
    engine = ScriptedEngine(f"{p.steps[0]}\n</think>\nAnswer: {p.answer}")
    ModelTeacher(engine).continue_reasoning(p, attempts)
    prompt_tokens = len(engine.prompts[0].encode())
    engine.max_context = prompt_tokens + 10
    assert ModelTeacher(engine, max_tokens=77).continue_reasoning(p, attempts)
    assert engine.params[-1].max_tokens == 10, "capped at the room left in the context"
    engine.max_context = prompt_tokens
    assert ModelTeacher(engine, max_tokens=77).continue_reasoning(p, attempts) == "", "a failed round"
    assert len(engine.prompts) == 2, "nothing generated without room"


def test_turbos_fuse_cot_writes_the_fused_data(tmp_path, capsys) -> None:
    directory = save_model_dir(tmp_path / "model")
    output = tmp_path / "fused.jsonl"
    args = ["fuse-cot", "--model", str(directory), "--output", str(output), "--n", "4", "--levels", "2"]
    assert main([*args, "--max-tokens", "4", "--check-share", "0.5"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert stats["total"] == 4 and stats["short"] + stats["checked"] + stats["long"] == 4
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["messages"][1]["content"].splitlines()[-1].startswith("Answer:"), record
    assert main([*args, "--max-tokens", "4", "--check-share", "2"]) != 0
    assert "check_share must be in [0, 1]" in capsys.readouterr().err
    # A turbos model directory as the teacher (this random one never reaches the answer: dropped).
    # --teacher-dir alone picks the model teacher (it was ignored, and the builtin one ran).
    teacher = ["--teacher-max-tokens", "8", "--max-rounds", "1"]
    assert main([*args, "--max-tokens", "4", "--teacher", "model", *teacher]) == 2
    assert "needs --teacher-dir" in capsys.readouterr().err
    assert main([*args, "--max-tokens", "4", *teacher, "--teacher-dir", str(directory)]) == 1
    printed = capsys.readouterr()
    stats = json.loads(printed.out.split("\nwrote")[0])
    assert (stats["total"], stats["dropped"]) == (4, 4), "the model teacher, not the builtin one"
    assert "warning: no examples kept (4 dropped)" in printed.err, "zero examples: a warning, exit 1"
    assert output.read_text() == ""


def test_answer_lines_are_one_anchored_definition_in_house_style() -> None:
    comment = "Adding.\nAnswer: 42\n(Double-check: my answer: correct)"
    assert house_style(None, comment) == "Adding.\n(Double-check: my answer: correct)\nAnswer: 42"
    assert house_style(None, "Let me add them.\n**Answer:** 42") == "Let me add them.\nAnswer: 42"
    assert house_style("So the final answer: 42", "Answer: 42") == "So the final answer: 42\nAnswer: 42"


def test_a_short_reply_with_its_own_think_block_is_judged_and_kept_by_its_answer() -> None:
    p = problems(1)[0]
    right = f"<think>\n7 plus 5...\n</think>\nAnswer: {p.answer}"
    ex = fuse_example(p, [right, render_short(p)], BuiltinTeacher())
    assert ex.response == "<think></think>" + render_short(p), "no nested think blocks"
    wrong = "<think>\nhmm\n</think>\nAnswer: 1"
    ex = fuse_example(p, wrong, BuiltinTeacher())
    assert ex.response.startswith("<think>\nAnswer: 1\n" + REFLECTION)
    assert "hmm" not in ex.response, "a failed attempt's own reasoning is not carried"
    assert ex.response.count("<think>") == ex.response.count("</think>") == 1
    inside = "<think>\nAnswer: " + p.answer + "\n</think>\n"  # right only inside the reasoning
    assert fuse_example(p, inside, BuiltinTeacher()).thought, "the answer after </think> is what counts"


def completion(content: str | None) -> tuple[int, dict]:
    message = {"role": "assistant", "content": content}
    choice = {"index": 0, "finish_reason": "stop", "message": message}
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "t", "choices": [choice]}


@contextmanager
def fake_endpoint(reply: Callable[[str], tuple[int, dict]]) -> Iterator[str]:
    """An OpenAI-compatible chat endpoint on loopback answering ``reply(prompt)`` = (status, JSON)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, payload = reply(body["messages"][0]["content"])
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_empty_or_malformed_endpoint_reply_is_a_failed_round() -> None:
    p = problems(1)[0]
    no_choices = completion(None)
    no_choices[1]["choices"] = []
    for status, payload in (no_choices, completion(None), completion("   ")):
        with fake_endpoint(lambda prompt, reply=(status, payload): reply) as url:
            teacher = EndpointTeacher(url, "t")
            assert fuse_example(p, "Answer: 0", teacher, max_rounds=2) is None, payload
            assert teacher.empty_replies == 2
    with fake_endpoint(lambda prompt: completion(f"Let me add.\n**Answer:** {p.answer}")) as url:
        ex = fuse_example(p, "Answer: 0", EndpointTeacher(url, "t"))
    assert ex.teacher_rounds == 1 and ex.response.endswith("Let me add.\n</think>\n" + render_short(p))
    with fake_endpoint(lambda prompt: completion("Answer: " + "7" * 5000)) as url:
        assert fuse_example(p, "Answer: 0", EndpointTeacher(url, "t"), max_rounds=1) is None, "no crash"


def test_an_unreachable_or_failing_endpoint_raises_a_one_line_teacher_error() -> None:
    p = problems(1)[0]
    with pytest.raises(TeacherError, match="APIConnectionError"):
        EndpointTeacher(f"http://127.0.0.1:{free_port()}/v1", "t").probe(p)
    failing = fake_endpoint(lambda prompt: (500, {"error": {"message": "oops\nmore"}}))
    with failing as url, pytest.raises(TeacherError, match="InternalServerError") as caught:
        fuse_example(p, "Answer: 0", EndpointTeacher(url, "t"))
    assert "\n" not in str(caught.value)


def test_turbos_fuse_cot_checks_the_output_and_the_teacher_before_loading_the_model(tmp_path, capsys) -> None:
    # --model names no model: each error below comes before it is loaded.
    args = ["fuse-cot", "--model", str(tmp_path / "absent"), "--n", "2", "--levels", "2"]
    output = tmp_path / "fused.jsonl"
    assert main([*args, "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"turbos fuse-cot: error: output {str(tmp_path)!r} is a directory\n"
    assert main([*args, "--output", str(tmp_path / "no" / "fused.jsonl")]) == 2
    assert "no directory" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main([*args, "--output", str(output), "--teacher-url", url]) == 2, (
        "--teacher-url picks the endpoint"
    )
    err = capsys.readouterr().err
    assert (
        err.startswith(f"turbos fuse-cot: error: teacher endpoint {url}: APIConnectionError")
        and err.count("\n") == 1
    )
    for bad, message in (
        (["--teacher", "builtin", "--teacher-url", url], "--teacher-url is for --teacher endpoint"),
        (["--teacher", "endpoint", "--teacher-dir", str(tmp_path)], "--teacher-dir is for --teacher model"),
        (["--teacher-url", url, "--teacher-dir", str(tmp_path)], "not both"),
    ):
        assert main([*args, "--output", str(output), *bad]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--output", str(output), "--samples", "-1"])
    assert "--samples: must be at least 0, got -1" in capsys.readouterr().err
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_fused_data_is_written_atomically(tmp_path) -> None:
    p = problems(1)[0]
    path = tmp_path / "fused.jsonl"
    path.write_text("earlier\n")
    broken = SimpleNamespace(to_record=lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_jsonl([FusedExample(p, render_short(p), False, 0), broken], path)
    assert path.read_text() == "earlier\n" and list(tmp_path.iterdir()) == [path], "no partial file"
    write_jsonl([FusedExample(p, render_short(p), False, 0)], check_output(path))
    assert json.loads(path.read_text())["meta"]["uid"] == p.uid and list(tmp_path.iterdir()) == [path]
