"""The engine: continuous batching gives each request exactly what it would get alone (fp32,
greedy, token for token), whatever joins or leaves the batch; cancellation frees the slot; n
samples per prompt."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from serve_helpers import greedy_alone
from turbos.serve import EngineConfig, LLMEngine, QueueFullError, SamplingParams
from turbos.serve.async_engine import AsyncLLMEngine, EngineStoppedError
from turbos.serve.cache_manager import SlotAttention
from turbos.serve.engine import ContextLengthError
from turbos.serve.sampling import SamplingParamsError


def prompts(n: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(9, vocab, (length,), generator=g).tolist() for length in lengths]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_requests_served_together_equal_each_request_alone(model, tokenizer) -> None:
    """Different prompt lengths and lengths of output; two requests join mid-flight, one with a
    prompt longer than the running window; prompts are prefilled in chunks of 7; at most 3 run."""
    engine = LLMEngine(model, tokenizer, max_running=3, prefill_chunk=7, max_prefill_tokens=64)
    vocab = model.config.vocab_size
    first = prompts(1, [5, 19, 12], vocab)
    late = prompts(2, [40, 3], vocab)
    budgets = {0: 12, 1: 6, 2: 15, 3: 10, 4: 8}
    ids = [engine.add_request(p, greedy(budgets[i])) for i, p in enumerate(first)]
    outputs: dict[str, list[int]] = {}
    for step in range(200):
        if step == 4:
            ids += [engine.add_request(p, greedy(budgets[3 + i])) for i, p in enumerate(late)]
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        if step > 4 and not engine.has_unfinished():
            break
    for i, (request_id, prompt) in enumerate(zip(ids, first + late, strict=True)):
        alone = greedy_alone(model, prompt, budgets[i])
        assert outputs[request_id] == alone, f"request {i} ({len(prompt)} prompt tokens) differs from solo"
    assert engine.cache.num_rows == 0 and engine.num_waiting == 0, "every slot is free at the end"


def test_generations_longer_than_the_preallocated_buffers_stay_exact(model, tokenizer) -> None:
    """Buffers start at 64 columns; these rows grow past that and the batch relocates."""
    engine = LLMEngine(model, tokenizer, max_running=2)
    short, long = prompts(4, [3, 30], model.config.vocab_size)
    first = engine.add_request(short, greedy(150))
    outputs: dict[str, list[int]] = {}
    for step in range(400):
        if step == 50:
            second = engine.add_request(long, greedy(90))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        if step > 50 and not engine.has_unfinished():
            break
    attention = next(layer for layer in engine.cache.batch.layers if isinstance(layer, SlotAttention))
    assert attention.key.shape[2] > 64, "the buffers grew"
    assert outputs[first] == greedy_alone(model, short, 150)
    assert outputs[second] == greedy_alone(model, long, 90)


def test_generate_returns_results_in_prompt_order(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer, max_running=2, max_waiting=1)
    batch = prompts(3, [4, 9, 6, 2], model.config.vocab_size)
    results = engine.generate(batch, greedy(5))
    assert [r.prompt_ids for r in results] == batch, "more prompts than the queue holds still all run"
    assert [r.token_ids for r in results] == [greedy_alone(model, p, 5) for p in batch]
    assert all(r.finish_reason == "length" for r in results)
    assert [r.index for r in results] == [0, 0, 0, 0]


def test_generate_gives_n_samples_per_prompt_in_order_seeded_with_seed_plus_j(model, tokenizer) -> None:
    """Sample j of a request seeded with s is what a lone request seeded with s + j gets; the
    queue holds fewer sequences than the samples, which still all run."""
    engine = LLMEngine(model, tokenizer, max_running=2, max_waiting=2)
    batch = prompts(5, [4, 7], model.config.vocab_size)

    def sampled(seed: int, n: int = 1) -> SamplingParams:
        return SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=seed, n=n)

    params = [sampled(seed=7, n=3), sampled(seed=20, n=2)]
    results = engine.generate(batch, params)
    assert [(r.prompt_ids, r.index) for r in results] == [
        (batch[0], 0),
        (batch[0], 1),
        (batch[0], 2),
        (batch[1], 0),
        (batch[1], 1),
    ]
    assert len({tuple(r.token_ids) for r in results[:3]}) == 3, "a prompt's samples differ"
    assert [r.token_ids for r in engine.generate(batch, params)] == [r.token_ids for r in results]
    alone = [
        engine.generate([prompt], sampled(seed))[0].token_ids
        for prompt, seed in [(batch[0], 7), (batch[0], 8), (batch[0], 9), (batch[1], 20), (batch[1], 21)]
    ]
    assert [r.token_ids for r in results] == alone
    assert not engine.has_unfinished()


def test_add_request_queues_one_sample(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer)
    with pytest.raises(SamplingParamsError, match="^n: ") as err:
        engine.add_request([10, 11], SamplingParams(n=2))
    assert err.value.param == "n" and not engine.has_unfinished()


def test_abort_frees_the_slot_and_reports_abort(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer, max_running=2)
    keep = engine.add_request([10, 11, 12], greedy(30))
    drop = engine.add_request([13, 14], greedy(30))
    engine.step()
    engine.step()
    assert engine.cache.num_rows == 2
    engine.abort(drop)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[drop].finished and outs[drop].finish_reason == "abort"
    assert engine.cache.num_rows == 1 and engine.cache.seqs[0].request_id == keep


def test_the_queue_is_bounded(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer, max_running=1, max_waiting=2)
    engine.add_request([10], greedy(3))
    engine.add_request([11], greedy(3))
    with pytest.raises(QueueFullError):
        engine.add_request([12], greedy(3))


def test_prompt_plus_max_tokens_must_fit_the_context(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer)
    context = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="maximum context length"):
        engine.add_request([10] * 10, greedy(context - 9))
    engine.add_request([10] * 10, greedy(context - 10))


def test_a_stop_token_ends_the_request(model, tokenizer) -> None:
    prompt = [10, 11, 12]
    expected = greedy_alone(model, prompt, 4)
    stop = expected[2]
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop])
    result = LLMEngine(model, tokenizer).generate([prompt], params)[0]
    assert result.token_ids == expected[: expected.index(stop) + 1] and result.finish_reason == "stop"


@pytest.fixture
def slow_model(model):
    """Each forward takes at least 20 ms, so a long request is surely still running."""
    handle = model.register_forward_hook(lambda *args: time.sleep(0.02))
    yield model
    handle.remove()


def run_async_engine(model, tokenizer, max_tokens: int, drain_timeout: float):
    """Start a request, shut the engine down, return (every output, engine)."""

    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, tokenizer))
        engine.start()
        request_id, queue = engine.add_request([10, 11], greedy(max_tokens))
        first = await queue.get()
        await asyncio.to_thread(engine.shutdown, drain_timeout)
        rest = [out async for out in engine.stream(request_id, queue)] if not first.finished else []
        with pytest.raises(EngineStoppedError):
            engine.add_request([10], greedy(1))
        return [first, *rest], engine

    return asyncio.run(main())


def test_shutdown_cancels_requests_still_running_after_the_drain_time(slow_model, tokenizer) -> None:
    outputs, engine = run_async_engine(slow_model, tokenizer, max_tokens=200, drain_timeout=0.0)
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"
    assert not engine._thread.is_alive() and not engine.engine.has_unfinished()


def test_shutdown_lets_requests_finish_within_the_drain_time(slow_model, tokenizer) -> None:
    outputs, engine = run_async_engine(slow_model, tokenizer, max_tokens=5, drain_timeout=60.0)
    assert outputs[-1].finish_reason == "length" and sum(len(o.token_ids) for o in outputs) == 5
    assert not engine._thread.is_alive()


def fail_next_decode(engine: LLMEngine) -> None:
    """Make the engine's next decode forward raise once (as a CUDA out-of-memory error would)."""
    real = engine.runner.decode_step

    def decode_step(*args):
        engine.runner.decode_step = real
        raise RuntimeError("out of memory (simulated)")

    engine.runner.decode_step = decode_step


def test_fail_all_also_ends_a_request_that_finished_in_the_failed_step(model, tokenizer) -> None:
    """The prefill finishes a one-token request, then the decode of the other one fails: both are
    reported and dropped (the finished one stayed in the engine forever, has_unfinished() True)."""
    engine = LLMEngine(model, tokenizer, max_running=4)
    long = engine.add_request([10] * 8, greedy(50))
    engine.step()
    one = engine.add_request([11] * 4, greedy(1))
    fail_next_decode(engine)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    outs = {o.request_id: o for o in engine.fail_all("engine error")}
    assert (outs[long].finish_reason, outs[long].error) == ("error", "engine error")
    assert (outs[one].finish_reason, outs[one].error) == ("length", None), "it finished as it ended"
    assert outs[one].token_ids == greedy_alone(model, [11] * 4, 1)
    assert not engine.has_unfinished() and not engine.abort(one)
    [result] = engine.generate([[12, 13]], greedy(3))
    assert result.token_ids == greedy_alone(model, [12, 13], 3), "the engine serves on"


def test_the_async_engine_delivers_a_request_that_finished_in_a_failed_step(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer)
    real_free = engine.cache.free

    def free(seq) -> None:  # the request has its last token; then the step fails
        engine.cache.free = real_free
        real_free(seq)
        raise RuntimeError("simulated")

    engine.cache.free = free

    async def main():
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        _, queue = async_engine.add_request([10, 11], greedy(2))
        try:
            return await asyncio.wait_for(queue.get(), 10)
        finally:
            async_engine.shutdown(join_timeout=2)

    out = asyncio.run(main())
    assert out.finished and out.finish_reason == "length" and out.error is None
    assert not engine.has_unfinished()


def test_abort_retires_a_request_that_finished_in_an_interrupted_step(model, tokenizer) -> None:
    """Ctrl-C after a request's last token, before the step returned: aborting it ends it."""
    engine = LLMEngine(model, tokenizer)
    real_free = engine.cache.free

    def free(seq) -> None:
        engine.cache.free = real_free
        real_free(seq)
        raise KeyboardInterrupt

    engine.cache.free = free
    request_id = engine.add_request([10, 11], greedy(3))
    with pytest.raises(KeyboardInterrupt):
        for _ in range(5):
            engine.step()
    assert engine.abort(request_id)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [(request_id, "length")]
    assert not engine.has_unfinished()


def test_generate_checks_every_prompt_before_queueing_any(model, tokenizer) -> None:
    engine = LLMEngine(model, tokenizer, max_running=2)
    context = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match="^prompt 1: This model's maximum context length"):
        engine.generate([[10, 11], [12] * (context + 1)], greedy(4))
    assert not engine.has_unfinished() and engine.num_waiting == 0
    [result] = engine.generate([[13, 14]], greedy(4))
    assert result.token_ids == greedy_alone(model, [13, 14], 4)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("max_running", 0),
        ("max_waiting", 0),
        ("prefill_chunk", 0),
        ("max_prefill_tokens", -1),
        ("seed", 2**64),
    ],
)
def test_engine_settings_out_of_range_are_rejected(model, tokenizer, option, value) -> None:
    with pytest.raises(ValueError, match=f"^{option} must be"):
        LLMEngine(model, tokenizer, **{option: value})


def test_engine_options_override_single_fields_of_the_engine_config(model, tokenizer) -> None:
    base = EngineConfig(max_running=3, seed=1)
    engine = LLMEngine(model, tokenizer, base, max_waiting=5)
    assert engine.engine_config == EngineConfig(max_running=3, max_waiting=5, seed=1)
    assert (engine.scheduler.max_running, engine.scheduler.max_waiting) == (3, 5)
