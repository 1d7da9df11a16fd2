"""``turbos grpo``: GRPO on the shared training loop (report §3.5, with the adaptive-CoT rewards
of §3.2.2).

Each rollout draws ``prompts_per_rollout`` prompts from the (filtered) prompt stream, samples a
group for each through the in-process engine (``turbos.rl.rollout``), scores it (the recipe's
reward, then the adaptive-CoT shaping), computes group advantages with the group reward
adjustment, drops groups whose advantages are all zero and draws new prompts in their place
(dynamic sampling, at most ``max_refills`` rounds), and computes the frozen reference model's
log-probabilities. Its samples are then shuffled and cut into ``updates_per_rollout`` optimizer
steps of ``micro_batches`` micro-batches each: the ``TrainLoop`` draws them one by one from
``RolloutSource``, the batch source, which rolls out again when it has none left.

Exact resume: the source's state is the prompt stream's position, the prompts kept by the
filter, and the micro-batches of the current rollout not yet trained on (their tokens,
log-probabilities and advantages); every sample is drawn with a seed fixed by the run's seed and
the prompt's stream position, so a resumed run draws what the uninterrupted one drew.

Under torchrun the recipe's ``parallel:`` section shards the policy with FSDP2. Every rank's
engine runs an unsharded copy of the policy, refreshed from it before every rollout; each rank
samples and scores every ranks-th prompt of a rollout (and of the filter's pre-pass) and scores
the reference log-probabilities of every ranks-th sample, and the results are all-gathered, so
every rank holds the whole rollout in the order of one process (the same tokens: each sample's
seed follows from its prompt's stream position; log-probabilities equal up to the rounding of
another batch mix). Each rank trains on every ranks-th sample of each micro-batch, its loss
divided by the step's trained tokens / ranks: FSDP averages the gradients over the ranks, so they
are those of one process on the whole step. Rank 0 writes the output directory's files.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from turbos.data.tasks import Problem, generate_problems
from turbos.data.tasks.code import LEVELS as CODE_LEVELS
from turbos.data.tasks.code import generate_code_problems
from turbos.data.tokenizer import load_tokenizer, save_tokenizer
from turbos.device import resolve_device
from turbos.distributed.checkpoint import copy_full_weights
from turbos.distributed.fsdp import recipe_parallelism
from turbos.distributed.parallel import broadcast_object, is_main, rank, share_work
from turbos.model import TurboSForCausalLM
from turbos.post.sft import export_model, finetune_parts
from turbos.rl.advantages import group_advantages, informative_groups, unstable_prompts
from turbos.rl.aggregate import route, with_repetition_penalty
from turbos.rl.instructions import generate_instructions
from turbos.rl.losses import GRPOLossConfig, grpo_loss
from turbos.rl.recipe import GRPORecipe
from turbos.rl.rewards import RewardFn, adaptive_cot_rewards, call_reward, load_reward
from turbos.rl.rollout import (
    RolloutBatch,
    Sample,
    build_batch,
    reference_logprobs,
    rollout_groups,
    token_logprobs,
)
from turbos.serve import LLMEngine
from turbos.train.checkpoint import recipe_state, start_run
from turbos.train.loop import TrainLoop
from turbos.train.metrics import moe_counts

MODEL_DIR, SUMMARY_FILE, FILTER_FILE = "model", "grpo_summary.json", "filter.json"

# Recipe fields a resumed run may change: where it writes, how often it saves, where it runs.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "checkpoint_interval",
        "keep_last",
        "device",
        "precision",
        "max_running",
        "parallel",
        "extra",
    }
)


def load_prompts(recipe: GRPORecipe, split: str = "train") -> list[Problem]:
    """The recipe's prompt pool: a user JSONL file, or built-in problems of ``split``, shared
    among the families as ``prompts.shares`` says (evenly by default; a family with fewer
    problems than its share, such as ``code``'s few level-5 ones, gives what it has). Besides the reasoning
    families, ``code`` problems carry the source of their hidden tests as the answer and
    ``instructions`` prompts their constraints (JSON), for the rules of ``reward_rules``."""
    from turbos.post.evaluate import read_problems

    p = recipe.prompts
    if p.path:
        return read_problems(p.path)
    counts = pool_counts(p.problems, p.families, p.shares)
    seed = recipe.seed + 3
    problems: list[Problem] = []
    reasoning = [f for f in p.families if f not in SPECIAL_FAMILIES]
    if reasoning and not p.shares:  # even shares: one draw balanced over families x levels
        n = sum(counts[f] for f in reasoning)
        problems += generate_problems(n, families=reasoning, levels=p.levels, split=split, seed=seed)
    else:
        for family in reasoning:
            if counts[family]:
                problems += generate_problems(
                    counts[family], families=[family], levels=p.levels, split=split, seed=seed
                )
    if counts.get("code"):
        levels = tuple(level for level in p.levels if level in CODE_LEVELS) or CODE_LEVELS
        for c in generate_code_problems(counts["code"], levels=levels, split=split, seed=seed):
            problems.append(Problem("code", c.level, c.question, c.test_source(), (), c.uid))
    if counts.get("instructions"):
        for i, inst in enumerate(generate_instructions(counts["instructions"], seed=seed, split=split)):
            answer = json.dumps([c.to_dict() for c in inst.constraints])
            problems.append(
                Problem("instructions", len(inst.constraints), inst.prompt, answer, (), f"if-{i}")
            )
    return problems


SPECIAL_FAMILIES = ("code", "instructions")


def pool_counts(total: int, families: Sequence[str], shares: dict[str, float]) -> dict[str, int]:
    """Prompts per family: ``shares`` (relative weights, missing ones 0) or even, summing to ``total``."""
    unknown = [f for f in shares if f not in families]
    if unknown:
        raise ValueError(
            f"prompts.shares names {unknown[0]!r}, which is not in prompts.families {list(families)}"
        )
    weights = [shares.get(f, 0.0) if shares else 1.0 for f in families]
    if sum(weights) <= 0:
        raise ValueError("prompts.shares must give some family a positive share")
    counts = [int(total * w / sum(weights)) for w in weights]
    for i in sorted(range(len(families)), key=lambda i: -weights[i])[: total - sum(counts)]:
        counts[i] += 1  # the remainder to the largest shares
    return dict(zip(families, counts, strict=True))


def build_reward(recipe: GRPORecipe, reward_fn: RewardFn | None = None) -> RewardFn:
    """The recipe's reward (or ``reward_fn``), routed per domain by ``reward_rules`` and with the
    repetition penalty (``turbos.rl.aggregate``)."""
    reward = load_reward(reward_fn or recipe.reward)
    if recipe.reward_rules:
        reward = route({family: load_reward(spec) for family, spec in recipe.reward_rules.items()}, reward)
    if recipe.repetition_penalty:
        reward = with_repetition_penalty(reward, recipe.repetition_penalty)
    return reward


def score_groups(
    groups: Sequence[Sequence[Sample]],
    problems: Sequence[Problem],
    reward_fn: RewardFn,
    recipe: GRPORecipe,
) -> None:
    """Set every sample's reward, correctness and advantage (one reward call for all)."""
    flat = [s for group in groups for s in group]
    if not flat:
        return
    split = [s.reasoning_content for s in flat]
    meta = {
        "answer": [problems[s.group].answer for s in flat],
        "family": [problems[s.group].family for s in flat],
        "level": [problems[s.group].level for s in flat],
        "mode": [s.mode for s in flat],
        "thought": [s.thought for s in flat],
        "reasoning": [r for r, _ in split],
        "content": [c for _, c in split],
        "constraints": [
            json.loads(problems[s.group].answer) if problems[s.group].family == "instructions" else None
            for s in flat
        ],
    }
    base = call_reward(reward_fn, [problems[s.group].question for s in flat], [s.text for s in flat], **meta)
    at = 0
    for group in groups:
        rewards = base[at : at + len(group)]
        at += len(group)
        correct = [r >= recipe.success for r in rewards]
        if recipe.adaptive.enabled:
            rewards, _ = adaptive_cot_rewards(
                rewards,
                correct,
                [s.thought for s in group],
                [s.reasoning_tokens for s in group],
                recipe.adaptive.shaping(),
            )
        advantages = group_advantages(torch.tensor(rewards), torch.tensor(correct)).tolist()
        for s, r, c, a in zip(group, rewards, correct, advantages, strict=True):
            s.reward, s.correct, s.advantage = r, c, a


def rollout_metrics(groups: Sequence[Sequence[Sample]], problems: Sequence[Problem]) -> dict[str, float]:
    """Reward; accuracy and mean tokens per mode (``auto``, probes ``think`` / ``no_think``), overall
    and per level (``auto/L3/accuracy``); the free samples' thinking rate overall and per level."""
    by: dict[tuple[str, str], list[Sample]] = defaultdict(list)
    for group in groups:
        for s in group:
            level = f"L{problems[s.group].level}"
            by[s.mode, "all"].append(s)
            by[s.mode, level].append(s)
    out: dict[str, float] = {}
    everything = [s for group in groups for s in group]
    out["reward"] = sum(s.reward for s in everything) / max(len(everything), 1)
    for (mode, level), samples in sorted(by.items()):
        prefix = mode if level == "all" else f"{mode}/{level}"
        n = len(samples)
        out[f"{prefix}/accuracy"] = sum(s.correct for s in samples) / n
        out[f"{prefix}/tokens"] = sum(len(s.completion_ids) for s in samples) / n
        if mode == "auto":
            out[f"{prefix}/think_rate"] = sum(s.thought for s in samples) / n
    return out


class PromptStream:
    """Endless prompts: the kept pool in a new seeded order every pass; position = prompts drawn."""

    def __init__(self, kept: Sequence[int], seed: int) -> None:
        if not kept:
            raise ValueError("no prompts to train on")
        self.kept, self.seed = list(kept), seed
        self._epoch: tuple[int, list[int]] | None = None

    def at(self, position: int) -> int:
        """The pool index of the prompt drawn at stream ``position``."""
        epoch, offset = divmod(position, len(self.kept))
        if self._epoch is None or self._epoch[0] != epoch:
            order = list(self.kept)
            random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
            self._epoch = (epoch, order)
        return self._epoch[1][offset]


class EmptyBatch:
    """A micro-batch with no sample: it adds no gradient."""

    num_tokens = 0

    def to(self, device: torch.device) -> EmptyBatch:
        return self


class RolloutSource:
    """The GRPO batch source (see the module docstring). On ``ranks`` data-parallel ranks,
    ``rank`` samples its share of each rollout and trains on its share of each micro-batch;
    ``policy`` is the (sharded) model trained when the engine runs a copy of it, which is then
    refreshed from it before every rollout (None: the engine runs the policy itself)."""

    def __init__(
        self,
        engine: LLMEngine,
        reference: nn.Module | None,
        problems: Sequence[Problem],
        reward_fn: RewardFn,
        recipe: GRPORecipe,
        write: Callable[[str], None] = print,
        rank: int = 0,
        ranks: int = 1,
        policy: nn.Module | None = None,
    ) -> None:
        self.engine, self.reference, self.problems = engine, reference, list(problems)
        self.reward_fn, self.recipe, self.write = reward_fn, recipe, write
        self.rank, self.ranks, self.policy = rank, ranks, policy
        self.device = engine.device
        self.kept: list[int] | None = None
        self.filter_stats: dict[str, Any] = {}
        self.position = 0
        self.rollouts = 0
        self.pending: list[dict[str, Any]] = []
        self.stats: dict[str, float] | None = None
        """The metrics of the rollout the last drawn micro-batch came from, until taken."""
        self._stream: PromptStream | None = None

    # ------------------------------------------------------------------------------ filtering
    def filter_prompts(self) -> None:
        """The pre-pass: one group per pool prompt from the starting policy; keep the unstable."""
        r = self.recipe
        indices = list(range(len(self.problems)))
        if not r.filter_prompts:
            self.kept, self.filter_stats = indices, {"pool": len(indices), "kept": len(indices)}
            return
        start = time.perf_counter()
        group = r.group_size + 2 * r.probes
        self.write(f"prompt filter: {len(indices)} prompts x {group} samples from the starting policy ...")
        groups = self._groups(indices, indices, "filter")
        solved = [sum(s.correct for s in g) for g in groups]
        keep = unstable_prompts(solved, len(groups[0]) if groups else 0)
        self.kept = [i for i, k in zip(indices, keep, strict=True) if k]
        self.filter_stats = {
            "pool": len(indices),
            "kept": len(self.kept),
            "always_solved": sum(s == len(g) for s, g in zip(solved, groups, strict=True)),
            "never_solved": solved.count(0),
            "seconds": round(time.perf_counter() - start, 1),
        }
        self.write(
            f"prompt filter: kept {len(self.kept)} of {len(indices)} prompts "
            f"({self.filter_stats['always_solved']} always solved, {self.filter_stats['never_solved']} "
            f"never, {self.filter_stats['seconds']} s)"
        )
        if not self.kept:
            raise ValueError(
                "the prompt filter kept no prompt: the starting policy solves every prompt always or "
                "never over a group (set filter_prompts=false to train on them anyway)"
            )

    # ------------------------------------------------------------------------------- rollouts
    def _groups(self, indices: Sequence[int], keys: Sequence[int], tag: str) -> list[list[Sample]]:
        """The scored groups of pool prompts ``indices`` drawn at stream positions ``keys``, each
        rank sampling its share (``share_work``); ``Sample.group`` is the index in ``indices``."""
        r = self.recipe

        def sample(share: list[tuple[int, int]]) -> list[list[Sample]]:
            problems = [self.problems[i] for i, _ in share]
            groups = rollout_groups(
                self.engine,
                problems,
                [key for _, key in share],
                r.group_size,
                r.probes,
                r.max_tokens,
                r.temperature,
                f"{r.seed}/{tag}",
            )
            score_groups(groups, problems, self.reward_fn, r)
            return groups

        groups = share_work(list(zip(indices, keys, strict=True)), sample, self.rank, self.ranks)
        for g, group in enumerate(groups):
            for s in group:
                s.group = g
        return groups

    def _reference_logprobs(self, samples: list[Sample]) -> None:
        """Fill the samples' ``ref_logprobs``, each rank scoring its share (``share_work``)."""

        def score(share: list[Sample]) -> list[list[float]]:
            reference_logprobs(self.reference, share, self.recipe.pack_len, self.device)
            return [s.ref_logprobs for s in share]

        for s, ref in zip(samples, share_work(samples, score, self.rank, self.ranks), strict=True):
            s.ref_logprobs = ref

    def rollout(self) -> None:
        """Sample, score and filter one rollout's groups; queue their micro-batches."""
        r = self.recipe
        if self.policy is not None:  # the engine's copy takes the policy's latest weights
            copy_full_weights(self.policy, self.engine.model)
        if self.kept is None:
            self.filter_prompts()
        if self._stream is None:
            self._stream = PromptStream(self.kept, r.seed)
        start = time.perf_counter()
        kept: list[list[Sample]] = []
        seen: list[list[Sample]] = []
        seen_problems: list[Problem] = []
        need, rounds, dropped, tokens = r.prompts_per_rollout, 0, 0, 0
        while need > 0 and rounds <= r.max_refills:
            keys = list(range(self.position, self.position + need))
            self.position += need
            indices = [self._stream.at(k) for k in keys]
            groups = self._groups(indices, keys, "train")
            useful = informative_groups([torch.tensor([s.advantage for s in g]) for g in groups])
            kept += [group for group, keep in zip(groups, useful, strict=True) if keep]
            dropped += useful.count(False)
            for group, i in zip(groups, indices, strict=True):
                for s in group:
                    s.group = len(seen)
                seen.append(group)
                seen_problems.append(self.problems[i])
            tokens += sum(len(s.completion_ids) for g in groups for s in g)
            need = r.prompts_per_rollout - len(kept)
            rounds += 1
        rollout_s = time.perf_counter() - start
        if not kept:  # no informative group after every refill: only the KL term will act
            kept = groups
        samples = [s for g in kept for s in g if any(s.trained)]
        start = time.perf_counter()
        if self.reference is not None and samples:
            self._reference_logprobs(samples)
        reference_s = time.perf_counter() - start
        self.rollouts += 1
        self._queue(samples)
        self.stats = {
            **rollout_metrics(seen, seen_problems),
            "groups": len(kept),
            "groups_dropped": dropped,
            "refill_rounds": rounds - 1,
            "prompts_kept": len(self.kept),
            "prompts_filtered": self.filter_stats.get("pool", 0) - len(self.kept),
            "samples_trained": len(samples),
            "rollout_tokens": tokens,
            "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9),
            "rollout_s": rollout_s,
            "reference_s": reference_s,
        }

    def _queue(self, samples: list[Sample]) -> None:
        """Shuffle (seeded) and cut into the rollout's optimizer steps and their micro-batches."""
        r = self.recipe
        records = [s.state() for s in samples]
        random.Random(f"{r.seed}/shuffle/{self.rollouts}").shuffle(records)
        steps = r.updates_per_rollout
        for k in range(steps):
            step = records[k * len(records) // steps : (k + 1) * len(records) // steps]
            trained = sum(sum(s["trained"]) for s in step)
            norm = max(trained, 1) / r.micro_batches
            for m in range(r.micro_batches):
                micro = step[m * len(step) // r.micro_batches : (m + 1) * len(step) // r.micro_batches]
                self.pending.append({"samples": micro, "norm": norm, "first": k == 0})

    def __next__(self) -> RolloutBatch | EmptyBatch:
        if not self.pending:
            self.rollout()
        micro = self.pending.pop(0)
        samples = micro["samples"]
        if not samples:
            return EmptyBatch()  # fewer samples than micro-batches: every rank skips this one
        share = samples[self.rank :: self.ranks]
        # Each rank divides by the step's trained tokens / ranks: FSDP averages the gradients.
        norm = micro["norm"] / self.ranks
        batch = build_batch(share or samples[:1], self.recipe.pack_len, norm, micro["first"])
        batch.stand_in = not share
        return batch

    def take_stats(self) -> dict[str, float]:
        stats, self.stats = self.stats, None
        return stats or {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "rollouts": self.rollouts,
            "kept": self.kept,
            "filter": self.filter_stats,
            "pending": list(self.pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.rollouts = state["position"], state["rollouts"]
        self.kept, self.filter_stats = state["kept"], state["filter"]
        self.pending = list(state["pending"])
        self._stream = None
        self.stats = None


def grpo_loss_fn(config: GRPOLossConfig) -> Callable[[nn.Module, RolloutBatch | None], tuple]:
    """The GRPO loss on a ``RolloutBatch`` (``turbos.rl.losses.grpo_loss``) plus the MoE aux loss,
    with its parts, the entropy and, on the first update after a rollout, the gap between the
    trainer's and the engine's log-probabilities of the same tokens."""

    def loss_fn(model: nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, entropy, out = token_logprobs(model, batch.chat, router_losses=True)
        loss, parts = grpo_loss(logp, batch.old_logp, batch.ref_logp, batch.advantages, config, batch.norm)
        metrics = {
            "loss": loss.detach().double() + out.aux_loss.detach().double(),
            **parts,
            "entropy": entropy.detach().sum() / batch.norm,
            "aux_loss": out.aux_loss.detach(),
            **moe_counts(out.moe_stats),
        }
        if batch.first_update:
            metrics["logprob_gap"] = (logp.detach() - batch.old_logp).abs().max()
        if batch.stand_in:  # its forward and backward are for FSDP only
            return (loss + out.aux_loss) * 0, {name: value * 0 for name, value in metrics.items()}
        return loss + out.aux_loss, metrics

    return loss_fn


class GRPOLoop(TrainLoop):
    """The shared loop with rollouts as its batch source."""

    batches: RolloutSource
    last_rollout: dict[str, float] | None = None
    """The latest rollout's reward and accuracy, shown by the progress bar."""

    def grad_accum(self) -> int:
        return self.batches.recipe.micro_batches

    def forward_backward_step(
        self, batch: RolloutBatch | EmptyBatch, grad_accum: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(batch, EmptyBatch):
            return torch.zeros((), dtype=torch.float64, device=self.device), {}
        return super().forward_backward_step(batch, grad_accum)

    def begin(self) -> None:
        if self.batches.kept is None:  # a fresh run: the prompt filter's pre-pass comes first
            self.batches.filter_prompts()

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def record_fields(self) -> dict[str, Any]:
        return self.batches.take_stats()

    def after_step(self, record: dict[str, Any]) -> None:
        spent = time.perf_counter() - self._step_start
        record["update_s"] = spent - record.get("rollout_s", 0.0) - record.get("reference_s", 0.0)
        if "reward" in record:
            self.last_rollout = {k: record[k] for k in ("reward", "auto/accuracy") if k in record}

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        shown = self.last_rollout or {}
        return {
            "reward": f"{shown.get('reward', math.nan):.3f}",
            "acc": f"{shown.get('auto/accuracy', math.nan):.2f}",
            "kl": f"{record.get('kl', 0.0):.4f}",
        }


def run_grpo(
    recipe: GRPORecipe,
    reward_fn: RewardFn | None = None,
    progress: bool = True,
    resume: str | None = None,
    overwrite: bool = False,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """GRPO from ``recipe.model``; writes ``OUTPUT_DIR/model`` (servable), ``metrics.jsonl``,
    ``filter.json`` and ``grpo_summary.json``.

    ``reward_fn``: a Python reward function (``reward(prompts, completions, **meta)``) used
    instead of ``recipe.reward``. ``resume`` ('auto' or a checkpoint), ``overwrite`` and
    ``stop_at`` as in ``turbos.post.sft.run_sft``: a resumed run gives the policy of a run never
    stopped, bit for bit on CPU. Under torchrun every rank calls this (the module docstring says
    how they share the work); rank 0 writes the output directory's files."""
    if stop_at is not None and not 0 < stop_at <= recipe.steps:
        raise ValueError(f"stop_at must be in [1, steps={recipe.steps}], got {stop_at}")
    out = Path(recipe.output_dir)
    identity = recipe_state(asdict(recipe), RESUMABLE_CHANGES)
    if reward_fn is not None:
        identity["reward"] = f"python:{getattr(reward_fn, '__module__', '?')}.{reward_fn.__qualname__}"
    outputs = (out / MODEL_DIR, out / SUMMARY_FILE)
    checkpoint, finished = broadcast_object(  # the output directory's files are rank 0's
        start_run(out, resume, overwrite, identity, outputs, "GRPO") if is_main() else None
    )
    if finished is not None:
        return finished
    reward = build_reward(recipe, reward_fn)
    problems = load_prompts(recipe)
    torch.manual_seed(recipe.seed)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "grpo_recipe.yaml").write_text(yaml.safe_dump(asdict(recipe), sort_keys=False))
    device = resolve_device(recipe.device)
    model = TurboSForCausalLM.from_pretrained(recipe.model, device=device)
    dims, parallelize = recipe_parallelism(recipe.parallel, model.config, "GRPO")
    tokenizer = load_tokenizer(recipe.model)
    tokenizer_dir = out / "tokenizer"  # copied into every checkpoint (by rank 0)
    if is_main():
        save_tokenizer(tokenizer, tokenizer_dir)
    reference = None
    if recipe.kl_coef > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    # One process: the engine runs the policy itself. Sharded: an unsharded copy on every rank,
    # refreshed from the policy before every rollout (RolloutSource).
    sharded = dims.dp_shard > 1
    engine_model = copy.deepcopy(model) if sharded else model
    engine = LLMEngine(engine_model, tokenizer, max_running=recipe.max_running, seed=recipe.seed)
    min_lr = recipe.lr if recipe.min_lr is None else recipe.min_lr
    optimizer, schedule, settings = finetune_parts(
        recipe, model, min_lr, out, identity, device, tokenizer_dir, progress, "grpo"
    )
    loop = GRPOLoop(model, optimizer, schedule, None, grpo_loss_fn(recipe.loss), settings, parallelize)
    loop.batches = RolloutSource(
        engine,
        reference,
        problems,
        reward,
        recipe,
        loop.write,
        rank(),
        dims.data_parallel,
        loop.model if sharded else None,
    )
    if checkpoint is not None:
        loop.resume(checkpoint)
    end = recipe.steps if stop_at is None else max(stop_at, loop.step)
    start = time.perf_counter()
    loop.train(end)
    source = loop.batches
    if is_main():
        (out / FILTER_FILE).write_text(json.dumps(source.filter_stats, indent=2) + "\n")
    if end < recipe.steps:
        return {"steps": end, "stopped_at": end, "wall_s": time.perf_counter() - start}
    try:
        model.eval()
        export_model(model, tokenizer, out / MODEL_DIR)
        summary = {
            "steps": recipe.steps,
            "rollouts": source.rollouts,
            "prompts": source.filter_stats,
            "tokens": loop.tokens,
            "wall_s": time.perf_counter() - start,
            "model_dir": str(out / MODEL_DIR),
        }
        if is_main():
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    except KeyboardInterrupt as err:
        raise loop.interrupted(err) from None
    return summary
