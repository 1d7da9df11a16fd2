"""The CUDA paths: the same model on the GPU agrees with the CPU, bf16 stays close to fp32, the
engine batches exactly, training (bf16 autocast) learns and resumes. Skipped without a GPU (CI
has none); run on one with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

from conftest import small_config
from test_train_loop import MICRO
from turbos.data.tasks import generate_problems, render_document
from turbos.data.tokenizer import train_tokenizer
from turbos.kernels.ssd import ssd_chunk_scan, ssd_sequential_scan
from turbos.model import HybridCache, TurboSForCausalLM
from turbos.model.quant import quantize_int8_
from turbos.serve import LLMEngine, SamplingParams
from turbos.serve.async_engine import AsyncLLMEngine
from turbos.serve.sampling import TokenLogprobs
from turbos.train.checkpoint import list_checkpoints
from turbos.train.metrics import read_metrics
from turbos.train.recipe import parse_recipe
from turbos.train.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 means fp32: no TF32 in matmuls or convolutions while these tests compare numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return float((got - ref).norm() / ref.norm())


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second left-padded by 7: exercises the SDPA mask and Mamba's padding."""
    ids = torch.randint(1, vocab, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


def test_forward_on_cuda_matches_cpu_in_fp32() -> None:
    model = TurboSForCausalLM(small_config(mamba_chunk_size=16)).eval()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        got = model.to(CUDA)(ids.to(CUDA), attention_mask=mask.to(CUDA)).logits
    assert rel_err(got, ref) < 1e-4


def test_bf16_on_cuda_stays_close_to_fp32() -> None:
    model = TurboSForCausalLM(small_config(mamba_chunk_size=16)).eval().to(CUDA)
    ids, mask = (t.to(CUDA) for t in padded_batch(model.config.vocab_size))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        got = model.to(torch.bfloat16)(ids, attention_mask=mask).logits
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ref) < 3e-2


def test_chunked_scan_matches_the_sequential_reference_on_cuda() -> None:
    b, T, h, p, g, n = 2, 37, 4, 8, 2, 16
    x = torch.randn(b, T, h, p, device=CUDA)
    dt = torch.rand(b, T, h, device=CUDA) * 0.5
    A = -torch.rand(h, device=CUDA) - 0.1
    B, C = torch.randn(b, T, g, n, device=CUDA), torch.randn(b, T, g, n, device=CUDA)
    D = torch.randn(h, device=CUDA)
    state = torch.randn(b, h, p, n, device=CUDA)
    y, final = ssd_chunk_scan(x, dt, A, B, C, 8, D, initial_state=state)
    y_ref, final_ref = ssd_sequential_scan(
        *(t.double() for t in (x, dt, A, B, C, D)), initial_state=state.double()
    )
    assert rel_err(y, y_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


@torch.no_grad()
def greedy_alone(model: TurboSForCausalLM, prompt: list[int], num_tokens: int) -> list[int]:
    cache = HybridCache(model.config, 1, device=CUDA)
    logits = model(torch.tensor([prompt], device=CUDA), past_key_values=cache, logits_to_keep=1).logits
    out = []
    for _ in range(num_tokens):
        out.append(int(logits[0, -1].argmax()))
        logits = model(torch.tensor([[out[-1]]], device=CUDA), past_key_values=cache).logits
    return out


def tokenizer():
    return train_tokenizer([render_document(p) for p in generate_problems(60, seed=0)], vocab_size=320)


def test_engine_on_cuda_batches_exactly() -> None:
    """Requests of different lengths served together, two joining mid-flight, give token for token
    what each gives alone (fp32, greedy)."""
    tok = tokenizer()
    model = TurboSForCausalLM(small_config(vocab_size=tok.get_vocab_size())).eval().to(CUDA)
    engine = LLMEngine(model, tok, max_running=3, prefill_chunk=7)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(9, 320, (n,), generator=g).tolist() for n in (5, 19, 12, 40, 3)]
    budgets = [12, 6, 15, 10, 8]
    ids, outputs = [], {}
    for step in range(200):
        if step in (0, 4):
            batch = range(3) if step == 0 else range(3, 5)
            ids += [
                engine.add_request(
                    prompts[i], SamplingParams(temperature=0, max_tokens=budgets[i], ignore_eos=True)
                )
                for i in batch
            ]
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
        if step > 4 and not engine.has_unfinished():
            break
    for i, request_id in enumerate(ids):
        assert outputs[request_id] == greedy_alone(model, prompts[i], budgets[i]), f"request {i}"


def test_engine_on_cuda_bf16_and_int8_generate() -> None:
    """bf16 activations with float and int8 weights: the greedy continuations mostly agree."""
    tok = tokenizer()
    model = TurboSForCausalLM(small_config(vocab_size=tok.get_vocab_size())).eval().to(CUDA, torch.bfloat16)
    prompts = [torch.randint(9, 320, (n,)).tolist() for n in (8, 30)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    plain = [r.token_ids for r in LLMEngine(model, tok).generate(prompts, params)]
    quant = [r.token_ids for r in LLMEngine(quantize_int8_(model), tok).generate(prompts, params)]
    assert all(len(t) == 8 for t in plain + quant)
    agree = sum(a == b for p, q in zip(plain, quant, strict=True) for a, b in zip(p, q, strict=True))
    assert agree >= 8, f"int8 agrees with bf16 on only {agree} of 16 greedy tokens"


def test_training_on_cuda_in_bf16_learns_and_resumes(tmp_path: Path) -> None:
    def recipe(run_dir: Path):
        raw = copy.deepcopy(MICRO)
        raw.update(output_dir=str(run_dir), device="cuda", precision="auto")
        raw["stages"] = [{"name": "only", "steps": 20}]
        raw["optimizer"]["lr"] = 1e-2
        return parse_recipe(raw)

    Trainer(recipe(tmp_path / "a"), progress=False).train(stop_at=10)
    assert list_checkpoints(tmp_path / "a"), "a checkpoint was written"
    Trainer(recipe(tmp_path / "a"), resume="auto", progress=False).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "a")[1:] if "loss" in r]
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == list(range(21))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, f"bf16 training on CUDA did not learn: {losses}"


def run_engine(engine: LLMEngine, prompts: list[list[int]], budgets: list[int]) -> list[list[TokenLogprobs]]:
    """Greedy, with logprobs; the first half of the prompts start together, the rest join after
    3 steps."""
    half = len(prompts) // 2
    ids, outputs = [], {}
    for step in range(500):
        if step in (0, 3):
            batch = range(half) if step == 0 else range(half, len(prompts))
            for i in batch:
                params = SamplingParams(temperature=0, max_tokens=budgets[i], ignore_eos=True, logprobs=3)
                ids.append(engine.add_request(prompts[i], params))
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.logprobs)
        if step > 3 and not engine.has_unfinished():
            break
    return [outputs[i] for i in ids]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_decode(dtype: torch.dtype) -> None:
    """Graph replay gives the eager engine's tokens while rows join and leave (buckets 1, 2, 4, 5)
    and the KV buffers grow past 64 columns (graphs captured again on the new buffers). In fp32
    every token is equal; in bf16 (rounding differs with the attention width) log-probabilities
    agree up to where a sequence first differs, and it differs only at a near tie."""
    tok = tokenizer()
    model = TurboSForCausalLM(small_config(vocab_size=tok.get_vocab_size())).eval().to(CUDA, dtype)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(9, 320, (n,), generator=g).tolist() for n in (5, 50, 12, 3, 30, 9)]
    budgets = [40, 7, 25, 60, 12, 33]
    eager = run_engine(LLMEngine(model, tok, max_running=5, cuda_graphs=False), prompts, budgets)
    engine = LLMEngine(model, tok, max_running=5, cuda_graphs=True)
    graphed = run_engine(engine, prompts, budgets)
    assert engine.runner.graphs is not None and engine.runner.graphs.graphs, "graphs were replayed"
    assert engine.cache.batch.capacity > 64, "the KV buffers grew during the run"
    if dtype == torch.float32:
        assert [[t.token_id for t in r] for r in graphed] == [[t.token_id for t in r] for r in eager]
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for request, (mine, theirs) in enumerate(zip(graphed, eager, strict=True)):
        assert len(mine) == budgets[request]
        for step, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            if a.token_id != b.token_id:
                top = dict(b.top)
                assert a.token_id in top and b.logprob - top[a.token_id] < tol, f"{request}/{step}: no tie"
                break
            assert abs(a.logprob - b.logprob) < tol, f"request {request} step {step}"


def test_cuda_graph_decode_serves_int8_weights() -> None:
    tok = tokenizer()
    model = TurboSForCausalLM(small_config(vocab_size=tok.get_vocab_size())).eval().to(CUDA, torch.bfloat16)
    quantize_int8_(model)
    prompts = [torch.randint(9, 320, (n,)).tolist() for n in (8, 30)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eager = [r.token_ids for r in LLMEngine(model, tok, cuda_graphs=False).generate(prompts, params)]
    graphed = [r.token_ids for r in LLMEngine(model, tok, cuda_graphs=True).generate(prompts, params)]
    same = sum(a == b for x, y in zip(graphed, eager, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 18, f"only {same} of 20 tokens agree"


def test_async_engine_on_cuda_captures_graphs_in_its_thread() -> None:
    """The server's layout: the engine steps (and captures graphs) in a background thread while
    requests, seeded ones too (a CUDA generator each), arrive from the event loop one by one."""
    tok = tokenizer()
    model = TurboSForCausalLM(small_config(vocab_size=tok.get_vocab_size())).eval().to(CUDA)
    prompts = [torch.randint(9, 320, (n,)).tolist() for n in (6, 17, 9, 25)]

    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=i)

    expected = [
        LLMEngine(model, tok, cuda_graphs=False).generate([p], params(i))[0].token_ids
        for i, p in enumerate(prompts)
    ]

    async def main() -> list[list[int]]:
        engine = AsyncLLMEngine(LLMEngine(model, tok, max_running=4))
        engine.start()
        streams = []
        for i, prompt in enumerate(prompts):
            streams.append(engine.add_request(prompt, params(i)))
            await asyncio.sleep(0.01)
        got = []
        for request_id, queue in streams:
            got.append([t async for out in engine.stream(request_id, queue) for t in out.token_ids])
        assert engine.engine.runner.graphs.graphs, "the engine thread replayed graphs"
        await asyncio.to_thread(engine.shutdown)
        return got

    assert asyncio.run(main()) == expected
