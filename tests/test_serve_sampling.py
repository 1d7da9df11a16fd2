"""Sampling parameters and the sampler: greedy, top-k, top-p, penalties, logit bias, bans, seeds,
n samples, logprobs, extreme values; the detokenizer: exact text across split characters, stop strings never
leaking; and the completions' logprob text offsets."""

from __future__ import annotations

import pytest
import torch

from turbos.serve.detokenizer import IncrementalDetokenizer, token_bytes
from turbos.serve.openai_format import Formatter
from turbos.serve.sampling import (
    MAX_N,
    Sampler,
    SamplingParams,
    SamplingParamsError,
    SamplingRow,
    TokenLogprobs,
)
from turbos.serve.sequence import Sequence

# probabilities 0.5, 0.3, 0.15, 0.05 over four tokens
LOGITS = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def draws(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = 2000, **row) -> list[int]:
    sampler = Sampler(torch.Generator().manual_seed(0))
    rows = [SamplingRow(params, row.get("prompt", []), row.get("output", []))] * n
    return sampler(logits.expand(n, -1).clone(), rows)[0]


def test_temperature_zero_is_argmax_whatever_the_other_settings() -> None:
    assert set(draws(SamplingParams(temperature=0, top_k=3, top_p=0.2), n=50)) == {0}


@pytest.mark.parametrize(("top_k", "allowed"), [(1, {0}), (2, {0, 1}), (0, {0, 1, 2, 3}), (-1, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, allowed) -> None:
    assert set(draws(SamplingParams(top_k=top_k))) == allowed


@pytest.mark.parametrize(("top_p", "allowed"), [(0.4, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, allowed) -> None:
    assert set(draws(SamplingParams(top_p=top_p))) == allowed


def test_sampled_frequencies_follow_the_probabilities() -> None:
    counts = torch.bincount(torch.tensor(draws(SamplingParams(), n=20000)), minlength=4) / 20000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.02), f"frequencies {counts.tolist()}"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, 1.0, -1.0, -1.5])
    greedy = SamplingParams(temperature=0, repetition_penalty=4.0)
    assert draws(greedy, logits, n=1, prompt=[0]) == [1], "2.0 / 4 = 0.5 < 1.0"
    assert draws(greedy, torch.tensor([-1.0, -1.5]), n=1, prompt=[0]) == [1], "-1 * 4 = -4 < -1.5"
    assert draws(SamplingParams(temperature=0), logits, n=1, prompt=[0]) == [0], "1.0 disables it"


def test_presence_and_frequency_penalties_count_output_tokens() -> None:
    logits = torch.tensor([2.0, 1.5, 0.0])
    assert draws(SamplingParams(temperature=0, presence_penalty=0.6), logits, n=1, output=[0]) == [1]
    assert draws(SamplingParams(temperature=0, frequency_penalty=0.3), logits, n=1, output=[0]) == [0]
    assert draws(SamplingParams(temperature=0, frequency_penalty=0.3), logits, n=1, output=[0, 0]) == [1]


def test_logit_bias_is_added_before_greedy_and_sampled_picks() -> None:
    assert draws(SamplingParams(temperature=0, logit_bias={3: 100}), n=1) == [3]
    assert draws(SamplingParams(temperature=0, logit_bias={0: -0.6}), n=1) == [1], "log .5 - .6 < log .3"
    assert set(draws(SamplingParams(logit_bias={3: 100}), n=200)) == {3}
    assert 0 not in set(draws(SamplingParams(logit_bias={0: -100})))


def test_temperatures_below_the_greedy_threshold_are_greedy() -> None:
    for temperature in (1e-40, 1e-6):
        assert set(draws(SamplingParams(temperature=temperature), n=50)) == {0}


@pytest.mark.parametrize(
    "logits",
    [
        torch.tensor([3e38, 1e38, -3e38, 0.0]),
        torch.tensor([-3e38, -1e38, -2e38, -3.4e38]),
        torch.tensor([1e30, float("-inf"), 1e30, -1e30]),
    ],
    ids=["huge", "all very negative", "ties and a banned token"],
)
@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-5, "repetition_penalty": 0.01},
        {"temperature": 1e-5, "repetition_penalty": 100, "presence_penalty": -2, "frequency_penalty": -2},
        {"temperature": 100, "top_p": 1e-9, "top_k": 1, "logit_bias": {3: 100}},
        {"temperature": 2e-5, "logit_bias": {0: -100, 1: 100}},
    ],
)
def test_extreme_valid_values_always_give_valid_tokens(logits, params) -> None:
    """The penalties overflow float32 or the temperature divides by almost nothing: still a token
    with a finite logit, never an error (which would fail every request in the batch)."""
    tokens = draws(SamplingParams(**params), logits, n=20, prompt=[0, 1], output=[0, 2, 2])
    assert all(0 <= t < 4 and logits[t] > float("-inf") for t in tokens)


def test_banned_tokens_are_never_sampled() -> None:
    assert set(draws(SamplingParams(temperature=0, banned_token_ids=[0]), n=5)) == {1}
    assert 0 not in set(draws(SamplingParams(banned_token_ids=[0])))


def test_first_token_bans_apply_to_the_first_output_token_only() -> None:
    params = SamplingParams(temperature=0, banned_first_token_ids=[0])
    assert draws(params, n=1) == [1]
    assert draws(params, n=1, output=[3]) == [0]


def test_a_seed_makes_a_row_independent_of_its_batch() -> None:
    """Five steps of one seeded request, alone and between two unseeded rows, draw the same tokens."""
    logits = torch.randn(3, 50)
    seeded, other = SamplingParams(seed=123), SamplingParams()
    sampler = Sampler(torch.Generator().manual_seed(0))

    def steps(batch: bool) -> list[int]:
        generator = torch.Generator().manual_seed(123)
        mine = SamplingRow(seeded, [], [], generator)
        if not batch:
            return [sampler(logits[1:2], [mine])[0][0] for _ in range(5)]
        rows = [SamplingRow(other, [], []), mine, SamplingRow(other, [], [])]
        return [sampler(logits, rows)[0][1] for _ in range(5)]

    assert steps(batch=False) == steps(batch=True)


def test_logprobs_are_the_models_log_softmax() -> None:
    logits = torch.randn(1, 10)
    _, lps = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0, logprobs=3), [], [])])
    expected = logits[0].log_softmax(-1)
    assert lps[0].token_id == int(expected.argmax())
    assert lps[0].logprob == pytest.approx(expected.max().item())
    assert [t for t, _ in lps[0].top] == expected.topk(3).indices.tolist()


def test_logprobs_of_a_mixed_batch_are_exactly_each_rows_log_softmax() -> None:
    """Rows without logprobs, with k = 0 and with different k, greedy and sampled, in one batch."""
    logits = torch.randn(5, 40)
    ks = [None, 0, 3, None, 5]
    rows = [SamplingRow(SamplingParams(temperature=i % 2, logprobs=k), [], []) for i, k in enumerate(ks)]
    tokens, lps = Sampler(torch.Generator().manual_seed(0))(logits, rows)
    for i, (k, lp) in enumerate(zip(ks, lps, strict=True)):
        if k is None:
            assert lp is None
            continue
        expected = torch.log_softmax(logits[i].float(), -1)
        assert lp.token_id == tokens[i] and lp.logprob == expected[tokens[i]].item()
        values, ids = expected.topk(k)
        assert lp.top == list(zip(ids.tolist(), values.tolist(), strict=True))


def test_samples_of_n_are_seeded_with_consecutive_seeds() -> None:
    one = SamplingParams(seed=5, temperature=0.7)
    assert one.samples() == [one] and one.samples()[0] is one, "n = 1 is the request itself"
    three = SamplingParams(seed=5, temperature=0.7, n=3)
    assert [(p.n, p.seed, p.temperature) for p in three.samples()] == [(1, 5, 0.7), (1, 6, 0.7), (1, 7, 0.7)]
    assert [p.seed for p in SamplingParams(n=2).samples()] == [None, None]
    top = SamplingParams(seed=2**64 - 1, n=3).samples()
    assert [p.seed for p in top] == [2**64 - 1, 0, 1], "wrapped into 64 bits, as torch reads seeds"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("top_k", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-39),
        ("repetition_penalty", 101),
        ("logit_bias", {5: 101}),
        ("logit_bias", {-1: 1}),
        ("logit_bias", {"5": 1}),
        ("logit_bias", {5: float("nan")}),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("max_tokens", 0),
        ("max_tokens", True),
        ("seed", 1.0),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
        ("logprobs", 21),
        ("n", 0),
        ("n", MAX_N + 1),
        ("n", 2.0),
        ("n", True),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(field, value) -> None:
    with pytest.raises(SamplingParamsError, match=field) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


@pytest.mark.parametrize(
    "text", ["Question: 12+30\nAnswer: 42", "Ünïcödé 日本語 🎉🧠 e\u0301", "<think>x</think> y"]
)
def test_detokenizing_token_by_token_gives_the_decoded_text(tokenizer, text) -> None:
    ids = tokenizer.encode(text).ids
    detok = IncrementalDetokenizer(token_bytes(tokenizer))
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False) == text
    assert all("\ufffd" not in p for p in pieces), "a character split across tokens is held until complete"


def test_stop_strings_cut_the_text_and_never_leak_while_streaming(tokenizer) -> None:
    text = "Question: 1+1\nAnswer: 2\nQuestion: 2+2"
    detok = IncrementalDetokenizer(token_bytes(tokenizer), stop=["\nQuestion", "zzz"])
    released = ""
    for i in tokenizer.encode(text).ids:
        released += detok.add(i)
        assert "\nQ" not in released, "a possible stop string is held back"
        if detok.stopped:
            break
    released += detok.finish()
    assert detok.stopped and released == "Question: 1+1\nAnswer: 2"


def test_held_back_text_is_released_when_it_is_not_a_stop(tokenizer) -> None:
    detok = IncrementalDetokenizer(token_bytes(tokenizer), stop=["Answer: 9"])
    text = "".join(detok.add(i) for i in tokenizer.encode("Answer: 2").ids) + detok.finish()
    assert text == "Answer: 2" and not detok.stopped


def test_text_offsets_count_characters_of_the_output_text(tokenizer) -> None:
    """Each token's offset is where its text starts in the output, in characters, also when a
    character's bytes are split across tokens (the token that starts it holds no character yet)."""
    text = "Ünïcödé 日本語 🎉 ok"
    ids = tokenizer.encode(text).ids
    table = token_bytes(tokenizer)
    params = SamplingParams(logprobs=0)
    seq = Sequence("r", [1], params, 100, frozenset(), IncrementalDetokenizer(table))
    for token in ids:
        seq.append(token, TokenLogprobs(token, 0.0, []))
    out = seq.take_output()
    offsets = Formatter("r", "m", table).completion_logprobs(out.logprobs)["text_offset"]
    expected = [len(b"".join(table[t] for t in ids[:i]).decode(errors="ignore")) for i in range(len(ids))]
    assert out.text == text and offsets == expected
    assert len(ids) > len(text), "some characters are split across tokens"
