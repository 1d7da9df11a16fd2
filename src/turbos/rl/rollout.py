"""Rollouts: groups of sampled responses from the continuous-batching engine, and the packed
batches the update trains on.

In one process the engine runs the policy module itself (``LLMEngine(policy, ...)``): the
optimizer updates those parameters in place, so every rollout samples from the current weights
with no copy, no weight sync and no stale snapshot. On several ranks (FSDP2 shards the policy)
each rank's engine runs an unsharded copy that ``turbos.rl.trainer.RolloutSource`` refreshes
before every rollout (``turbos.distributed.checkpoint.copy_full_weights``). Both the engine and
the update run the model with inference routing (no MoE capacity limit), so the engine's
per-token log-probabilities are the policy's (``tests/test_rl_rollout.py`` checks them against
the trainer's, fp32, <= 1e-4) and serve as the sampling policy's ``old_logp`` of the clipped ratio.

A group for one prompt (a problem asked in ``auto`` mode) holds ``group_size`` free samples,
whose first token is the model's own decision to think, plus ``probes`` forced samples of each
reasoning depth (the report's "responses of different reasoning depth"): a long probe starts
with ``<think>``, a short probe may not. Probes are trained with their forced first token left
out of the loss, so the decision to think is learned from the free samples alone.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from turbos.data.tasks import Problem
from turbos.model.hybrid import IGNORE_INDEX
from turbos.post.sft import ChatBatch, collate
from turbos.serve import LLMEngine, SamplingParams
from turbos.serve.chat_template import END_THINK_ID, THINK_ID, prepare_chat
from turbos.serve.reasoning import parse_reasoning

PROBE_MODES = ("think", "no_think")


@dataclass
class Sample:
    """One sampled response and everything the update needs about it."""

    group: int
    """Index of its group (prompt) in the rollout."""
    mode: str
    """"auto" (free), or the depth it was forced to: "think" or "no_think"."""
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """The sampling policy's log-probability of each completion token (0.0 where not trained)."""
    trained: list[bool]
    """Per completion token: in the loss (False for a probe's forced first token)."""
    text: str
    finish_reason: str | None
    reward: float = 0.0
    correct: bool = False
    advantage: float = 0.0
    ref_logprobs: list[float] = field(default_factory=list)
    """The reference model's log-probabilities of the trained tokens."""

    @functools.cached_property
    def reasoning_content(self) -> tuple[str | None, str]:
        """(reasoning or None, answer) of the reply, parsed once."""
        return parse_reasoning(self.text, "auto")

    @property
    def thought(self) -> bool:
        reasoning, _ = self.reasoning_content
        return bool(reasoning and reasoning.strip())

    @property
    def reasoning_tokens(self) -> int:
        """Tokens up to and including ``</think>`` (all of them when it never closed); 0 without."""
        if not self.thought:
            return 0
        ids = self.completion_ids
        return ids.index(END_THINK_ID) + 1 if END_THINK_ID in ids else len(ids)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of a sample still to be trained on."""
        return {
            "prompt_ids": self.prompt_ids,
            "completion_ids": self.completion_ids,
            "logprobs": self.logprobs,
            "trained": self.trained,
            "advantage": self.advantage,
            "ref_logprobs": self.ref_logprobs,
        }


def sample_seed(seed: int | str, key: int, index: int) -> int:
    """The sampling seed of sample ``index`` for the prompt drawn at stream position ``key``: fixed
    by ``seed`` (the run's seed and what the samples are for, e.g. "0/train"), so a resumed run
    draws the same samples, whatever the batching."""
    return random.Random(f"{seed}/{key}/{index}").getrandbits(63)


def rollout_groups(
    engine: LLMEngine,
    problems: Sequence[Problem],
    keys: Sequence[int],
    group_size: int,
    probes: int,
    max_tokens: int,
    temperature: float,
    seed: int | str,
) -> list[list[Sample]]:
    """One group per problem: ``group_size`` free auto-mode samples, then ``probes`` long and
    ``probes`` short ones, all generated in one engine batch. ``keys``: each problem's stream
    position, which seeds its samples (``sample_seed``)."""
    base = SamplingParams(max_tokens=max_tokens, temperature=temperature, logprobs=0)
    think_first_banned = prepare_chat([{"role": "user", "content": "?"}], "think").banned_first_token_ids
    prompts, params, plan = [], [], []
    for g, (problem, key) in enumerate(zip(problems, keys, strict=True)):
        chat = prepare_chat([{"role": "user", "content": problem.question}], "auto")
        ids = engine.encode(chat.text)
        modes = ["auto"] * group_size + ["think"] * probes + ["no_think"] * probes
        for j, mode in enumerate(modes):
            banned = {"auto": [], "think": think_first_banned, "no_think": [THINK_ID]}[mode]
            seed_j = sample_seed(seed, key, j)
            params.append(chat.sampling_params(replace(base, seed=seed_j, banned_first_token_ids=banned)))
            # a long probe's prompt ends with <think>: its reasoning may not be empty
            prompts.append([*ids, THINK_ID] if mode == "think" else ids)
            plan.append((g, mode, ids))
    think_text = engine.tokenizer.id_to_token(THINK_ID)
    groups: list[list[Sample]] = [[] for _ in problems]
    for (g, mode, ids), result in zip(plan, engine.generate(prompts, params), strict=True):
        completion, text = list(result.token_ids), result.text
        logprobs = [lp.logprob for lp in result.logprobs]
        trained = [True] * len(completion)
        if mode == "think":  # the forced <think> joins the completion, out of the loss
            completion, logprobs, trained = [THINK_ID, *completion], [0.0, *logprobs], [False, *trained]
            text = think_text + text
        elif mode == "no_think":  # its first token was drawn with <think> banned
            trained[0], logprobs[0] = False, 0.0
        sample = Sample(g, mode, list(ids), completion, logprobs, trained, text, result.finish_reason)
        groups[g].append(sample)
    return groups


# ---------------------------------------------------------------------------------- the update
@dataclass
class RolloutBatch:
    """Samples packed into rows for the update (``ChatBatch``: each sees only itself), with the
    per-token quantities of the loss, in the order of ``chat.target_index``."""

    chat: ChatBatch
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    norm: float
    """The loss's divisor for this micro-batch: the trained tokens of its whole optimizer step,
    over the step's number of micro-batches (the loop divides by that number again)."""
    first_update: bool = False
    """Whether the policy still has the sampling weights (the first update after a rollout)."""
    stand_in: bool = False
    """A batch trained on with no effect (zero loss and metrics, no tokens counted): on several
    ranks, that of a rank whose share of the micro-batch is empty, since FSDP needs every rank's
    forward and backward."""

    @property
    def num_tokens(self) -> int:
        return 0 if self.stand_in else self.chat.num_tokens

    def to(self, device: torch.device) -> RolloutBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            chat=self.chat.to(device),
            old_logp=move(self.old_logp),
            ref_logp=move(self.ref_logp),
            advantages=move(self.advantages),
        )


def pack_samples(samples: Sequence[dict[str, Any]], pack_len: int) -> tuple[ChatBatch, list[int]]:
    """Samples (``Sample.state()`` records) packed into rows of at most ``pack_len`` tokens (wider
    when one sample is longer), and the order in which their trained tokens appear in the
    batch's targets (``collate`` visits rows first-fit decreasing)."""
    ids, labels = [], []
    for s in samples:
        ids.append(s["prompt_ids"] + s["completion_ids"])
        kept = zip(s["completion_ids"], s["trained"], strict=True)
        targets = [t if keep else IGNORE_INDEX for t, keep in kept]
        labels.append([IGNORE_INDEX] * len(s["prompt_ids"]) + targets)
    chat = collate(ids, labels, max(pack_len, *map(len, ids)))
    return chat, torch.unique_consecutive(chat.target_conversation).tolist()


def build_batch(
    samples: Sequence[dict[str, Any]], pack_len: int, norm: float, first_update: bool = False
) -> RolloutBatch:
    """The update's micro-batch of ``samples`` (``Sample.state()`` records, all with trained tokens)."""
    chat, order = pack_samples(samples, pack_len)

    def per_token(name: str) -> torch.Tensor:
        values = []
        for i in order:
            s = samples[i]
            if name == "advantage":
                values += [s["advantage"]] * sum(s["trained"])
            elif name == "ref_logprobs":
                values += s["ref_logprobs"]
            else:
                values += [v for v, keep in zip(s[name], s["trained"], strict=True) if keep]
        return torch.tensor(values, dtype=torch.float32)

    has_ref = all(s["ref_logprobs"] for s in samples)
    return RolloutBatch(
        chat,
        per_token("logprobs"),
        per_token("ref_logprobs") if has_ref else None,
        per_token("advantage"),
        norm,
        first_update,
    )


def token_logprobs(
    model: nn.Module, chat: ChatBatch, router_losses: bool = False
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(log-probability of each target token, the entropy of its distribution, the model output)
    for a packed batch: logits are computed at the targets' positions only."""
    out = model(
        chat.input_ids,
        attention_mask=chat.attention_mask,
        seq_idx=chat.seq_idx,
        logits_index=chat.target_index,
        router_losses=router_losses,
    )
    logp_all = F.log_softmax(out.logits.float(), dim=-1)
    logp = logp_all.gather(-1, chat.target_ids[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy, out


@torch.no_grad()
def reference_logprobs(
    model: nn.Module, samples: Sequence[Sample], pack_len: int, device: torch.device
) -> None:
    """Fill each sample's ``ref_logprobs`` with the (frozen) reference model's, in one packed pass."""
    records = [s.state() for s in samples]
    chat, order = pack_samples(records, pack_len)
    logp, _, _ = token_logprobs(model, chat.to(device))
    values = logp.cpu().tolist()
    at = 0
    for i in order:
        n = sum(samples[i].trained)
        samples[i].ref_logprobs = values[at : at + n]
        at += n
