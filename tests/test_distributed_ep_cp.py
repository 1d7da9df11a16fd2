"""Expert and context parallelism together on one group of 2 gloo ranks: every rank holds half of
each sequence (CP) and half of each MoE layer's experts (EP); loss and gradients equal one process
on the whole batch within 1e-5, for both Mamba2 state-passing forms, and a few AdamW steps give
the same weights.

Under CP the loss is the sum of every rank's token losses over all tokens, so gradients add up
over the ranks: replicated weights are summed over the group, while a local expert's gradient
already holds every rank's tokens (EP's all-to-all brings them) and is compared as it is."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from conftest import small_config
from dist_helpers import run_ranks
from test_distributed_ep import _expert_slice, _local_tensor
from turbos.distributed.context_parallel import MODES, context_parallel, context_parallel_loss, shard_sequence
from turbos.distributed.expert_parallel import expert_parallel
from turbos.model import TurboSForCausalLM
from turbos.model.hybrid import IGNORE_INDEX

TOLERANCE = 1e-5


def _batch(vocab: int, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[1, : T // 4] = IGNORE_INDEX  # a prompt without loss
    return ids, labels


def _sharded_step(model: TurboSForCausalLM, ids: torch.Tensor, labels: torch.Tensor, mode: str):
    """Loss over the whole batch, with the gradients of the whole batch in ``model``'s
    parameters (replicated ones summed over the group; local experts' hold every rank's tokens)."""
    model.zero_grad()
    cp = context_parallel(model, mode=mode)
    local_ids, targets = shard_sequence(ids, labels)
    loss, total = context_parallel_loss(model, local_ids, targets)
    loss.backward()
    cp.remove()
    for name, param in model.named_parameters():
        if _expert_slice(model, name) is None:
            dist.all_reduce(param.grad)
    return total


def _compare(model: TurboSForCausalLM, ref: TurboSForCausalLM, what: str, where: str) -> None:
    reference = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        rows = _expert_slice(model, name)
        mine, theirs = (param.grad, reference[name].grad) if what == "grad" else (param, reference[name])
        theirs = theirs if rows is None else theirs[rows]
        diff = (_local_tensor(mine) - theirs).abs().max().item()
        assert diff <= TOLERANCE, f"{where}: {what} of {name} differs by {diff}"


def _check(mode: str, T: int, steps: int = 3) -> None:
    """The loss and gradients of one step, then the weights after ``steps`` AdamW steps."""
    torch.manual_seed(0)
    # No load-balancing loss and no capacity limit: routing is per token, whatever the split.
    ref = TurboSForCausalLM(small_config(router_aux_loss_coef=0.0, capacity_factor=100.0)).train()
    model = expert_parallel(copy.deepcopy(ref))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
    for step in range(steps):
        ids, labels = _batch(ref.config.vocab_size, T, seed=T + step)
        ref.zero_grad()
        ref_loss = ref(ids, labels=labels).loss
        ref_loss.backward()
        total = _sharded_step(model, ids, labels, mode)
        where = f"mode={mode} T={T} step={step} rank={dist.get_rank()}"
        assert abs(total - ref_loss.detach()) <= TOLERANCE, f"{where}: loss {total} vs {ref_loss}"
        if step == 0:
            _compare(model, ref, "grad", where)
        for optimizer in optimizers:
            optimizer.step()
    _compare(model, ref, "weight", f"mode={mode} T={T} after {steps} steps")


def _checks() -> None:
    for mode in MODES:
        _check(mode, 64)
        _check(mode, 36)  # shards of 18 tokens: no multiple of the chunk size


def test_expert_and_context_parallel_together_match_one_process() -> None:
    run_ranks(_checks, 2)
