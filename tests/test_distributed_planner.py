"""The cluster planner: memory components by hand, what each degree divides, the 560B fits, errors,
the CLI, and the activation estimate against the bytes autograd really saves."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from turbos.cli import main
from turbos.distributed.planner import (
    Layout,
    PlanError,
    Precision,
    activation_bytes,
    layer_activation_bytes,
    plan,
    suggest,
)
from turbos.model import TurboSForCausalLM
from turbos.params import count_parameters
from turbos.presets import get_preset

TOKENS = 64 * 256  # 64 sequences of 256 per step


def small_plan(layout: Layout, **options: object):
    return plan(get_preset("small"), layout, seq_len=256, tokens_per_step=TOKENS, **options)


def test_state_memory_is_parameters_times_bytes_over_shards() -> None:
    config = get_preset("small")
    n = count_parameters(config)["total"]["total"]
    for dp in (1, 4):
        p = small_plan(Layout(dp=dp))
        assert p.memory["weights"] == pytest.approx(n * 2 / dp)
        assert p.memory["gradients"] == pytest.approx(n * 2 / dp)
        assert p.memory["optimizer"] == pytest.approx(n * (4 + 4 + 4) / dp)
    fp32 = small_plan(Layout(dp=2), precision=Precision(param_bytes=4, grad_bytes=4))
    assert fp32.memory["weights"] == pytest.approx(n * 4 / 2)


def test_attention_layer_activations_by_hand() -> None:
    c = get_preset("small")  # hidden 384, 6 heads of 64, 2 KV heads, QK-norm
    b, T, H, d = 2, 128, 384, 64
    per_token = (
        (2 * 4 * H + 4 + 2 * H)  # pre-norm fp32 copy + normed + rstd; q/k/v projections' input
        + (6 + 2) * (2 * 4 * d + 4)  # QK-norm: fp32 copy, normed, rstd per head of q and k
        + 2 * 6 * d * 3  # SDPA's q and out, o_proj's input (bf16)
        + 2 * 2 * 2 * d  # SDPA's k and v
        + 4 * 6  # logsumexp
    )
    assert layer_activation_bytes(c, "A", T, b) == b * T * per_token


def test_ep_ranks_shard_every_state_and_split_the_experts() -> None:
    """EP ranks are data replicas: FSDP shards the dense weights over all DP x EP ranks and the
    experts, split over EP, over their DP replicas. Every state divides by DP x EP, as FSDP alone
    on the same GPUs; EP gathers less (the experts only over their replicas) and adds the token
    all-to-alls."""
    n = count_parameters(get_preset("small"))["total"]["total"]
    fsdp, ep = small_plan(Layout(dp=8)), small_plan(Layout(dp=2, ep=4))
    assert ep.memory["weights"] == pytest.approx(n * 2 / 8)
    assert fsdp.memory["weights"] == pytest.approx(n * 2 / 8)
    assert ep.communication["fsdp"] < fsdp.communication["fsdp"]
    assert ep.communication["ep_all_to_all"] > 0 == fsdp.communication["ep_all_to_all"]
    assert ep.memory["fsdp_buffers"] < fsdp.memory["fsdp_buffers"]


def test_cp_divides_activations_and_adds_state_passing_independent_of_length() -> None:
    c = get_preset("small")
    state = 2 * c.mamba_num_heads * c.mamba_head_dim * c.mamba_state_size * 4  # b=2, fp32
    for T in (512, 2048):
        whole = layer_activation_bytes(c, "M", T, 2)
        halves = layer_activation_bytes(c, "M", T, 2, cp=2)
        assert halves - state == pytest.approx(whole / 2)
    acts = {cp: small_plan(Layout(cp=cp)).memory["activations"] for cp in (1, 2, 4)}
    assert acts[4] < acts[2] < acts[1]
    comm = {T: plan(c, Layout(cp=2), seq_len=T, tokens_per_step=T).communication["cp"] for T in (512, 2048)}
    n_attn = c.layer_types.count("A")
    kv = lambda T: 1 * T * 2 * c.num_key_value_heads * c.attn_head_dim * 2 / 2 * 2  # noqa: E731
    assert comm[512] - kv(512) * n_attn == pytest.approx(comm[2048] - kv(2048) * n_attn)


def test_activation_checkpointing_keeps_layer_inputs() -> None:
    c = get_preset("small")
    full = activation_bytes(c, 256, 1, embedding=False, head=False)
    ac = activation_bytes(c, 256, 1, embedding=False, head=False, activation_checkpointing=True)
    biggest = max(layer_activation_bytes(c, k, 256, 1) for k in "AMF")
    assert ac == 256 * 2 * c.hidden_size * c.num_hidden_layers + biggest
    assert ac < full / 3


def test_560b_does_not_fit_8_gpus_and_fits_256() -> None:
    config = get_preset("turbos-560b")
    fitting, nearest = suggest(config, 8, 80.0)
    assert not fitting and nearest and nearest[0].total_memory > 8 * 80 * 2**30
    fitting, _ = suggest(config, 256, 80.0)
    assert fitting and all(p.fits and p.layout.gpus == 256 for p in fitting)
    assert [p.cost_seconds for p in fitting] == sorted(p.cost_seconds for p in fitting)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (Layout(ep=3), "ep=3 must divide num_experts=8"),
        (Layout(tp=4), "tp=4 must divide num_attention_heads=6"),
        (Layout(cp=3), "cp=3 must divide the sequence length 256"),
        (Layout(pp=19), "pp=19 exceeds the 18 layers"),
        (Layout(dp=128), "exceed the 64 sequences"),
    ],
)
def test_impossible_degrees_are_refused(layout: Layout, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        small_plan(layout)


def test_cli_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "turbos-560b", "--gpus", "256", "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "dp" in lines[1] and len(lines) == 3 + 3 and all(line.endswith("yes") for line in lines[3:])
    assert main(["plan", "--preset", "small", "--gpus", "8", "--ep", "2", "--tp", "2", "--json"]) == 0
    (only,) = json.loads(capsys.readouterr().out)["plans"]  # dp is what the other degrees leave
    assert only["layout"] == {"dp": 2, "ep": 2, "cp": 1, "tp": 2, "pp": 1} and only["fits"]
    assert main(["plan", "--preset", "turbos-560b", "--gpus", "8"]) == 1
    assert "no layout fits" in capsys.readouterr().err
    assert main(["plan", "--preset", "small", "--gpus", "8", "--dp", "2", "--ep", "3"]) == 2
    assert "does not match --gpus 8" in capsys.readouterr().err
    assert main(["plan", "--preset", "small", "--gpus", "8", "--dp", "2", "--tp", "4"]) == 2
    assert "tp=4 must divide num_attention_heads=6" in capsys.readouterr().err


def measured_saved_bytes(config, batch: int, seq_len: int) -> int:
    """Bytes of the tensors a bf16 forward + backward saves (parameters excluded), by storage."""
    torch.manual_seed(0)
    model = TurboSForCausalLM(config).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = defaultdict(int)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, labels=ids)
        (out.lm_loss + out.aux_loss).backward()
    return sum(seen.values())


@pytest.mark.parametrize(
    ("overrides", "batch", "seq_len"),
    [({}, 2, 256), ({"expert_activation": "relu2", "mamba_chunk_size": 48, "layout": "AMF MF D"}, 2, 200)],
)
def test_activation_estimate_matches_what_autograd_saves(overrides: dict, batch: int, seq_len: int) -> None:
    """The planner's bytes against the saved tensors of a real bf16 forward + backward on CPU,
    whose SSD scan is the chunked torch one: within 10% (they agree to about 1%)."""
    config = get_preset("tiny", **overrides)
    estimate = activation_bytes(config, seq_len, batch, ssd_impl="chunked")
    measured = measured_saved_bytes(config, batch, seq_len)
    assert estimate == pytest.approx(measured, rel=0.10)
