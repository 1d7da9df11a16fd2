"""The one training loop, shared by pre-training and SFT (torchtitan's trainer in miniature).

A kind of training supplies the model, an optimizer factory, an LR schedule, a batch source and a
loss function; ``TrainLoop`` does the rest:

- ``train_step``: set each param group's LR from the schedule, run ``grad_accum()`` micro-batches
  through ``forward_backward_step`` (autocast, ``loss_fn``, backward of loss / grad_accum), clip
  the global grad norm and take the optimizer step (the one ``optimizer.step()`` of training);
- metrics: the loss and ``loss_fn``'s metric tensors are averaged over the micro-batches on the
  device and read once per step into a ``metrics.jsonl`` record; a tqdm bar shows progress;
- checkpoints (``turbos.train.checkpoint``): written atomically every ``checkpoint_interval`` steps
  and at the end, with the weights, optimizer, every RNG, the batch source's position and the
  recipe, so a resumed run continues bit for bit (on CPU) and one under a changed recipe is
  refused.

``parallelize(model)`` (identity by default) runs between building the model and building the
optimizer: where FSDP, expert parallelism or compile wrap the model from outside.

Under torchrun (several ranks, ``turbos.distributed``) every rank runs the loop on its own
micro-batches: the logged metrics are averaged over the ranks and the token counts summed, the
grad norm is the global one, only rank 0 shows progress and writes ``metrics.jsonl``, and
checkpoints are sharded (``turbos.distributed.checkpoint``: DCP plus the whole model from rank 0).

A batch source is an iterator of micro-batches (objects with ``num_tokens`` and ``to(device)``)
with ``state_dict()`` / ``load_state_dict()``, so a resumed run draws the batch that would have
come next. ``loss_fn(model, batch) -> (loss, metrics)``: the loss to back-propagate and named
tensors to log (scalars, or the per-layer routing counts of ``turbos.train.metrics.moe_counts``).
Kinds customise a few methods: ``grad_accum``, ``before_step``, ``after_step``, ``record_fields``,
``extra_state``, ``restore`` (pre-training enters its stages there and validates).

Interrupts: Ctrl-C (``KeyboardInterrupt``) or SIGTERM (``Interrupted``, raised by the CLI's
handler) while a step runs drops that step: its gradients are discarded and the RNGs, the batch
source and the kind's state go back to where the last completed step left them; that step is then
checkpointed unless it already is, so resuming finishes with the weights of a run never stopped.
The optimizer update, metrics records and checkpoint writes are never cut in half: a signal
arriving during them is raised when they are done.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from turbos.device import autocast_context
from turbos.distributed import checkpoint as sharded  # a module: it imports train.checkpoint
from turbos.distributed.parallel import clip_grad_norm_, is_main, mean_over_ranks, world_size
from turbos.train.checkpoint import (
    checkpoint_root,
    load_checkpoint,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from turbos.train.metrics import MetricsLog, summarize_moe
from turbos.train.optim import set_lr
from turbos.train.schedule import LRSchedule


class Batch(Protocol):
    num_tokens: int
    """Tokens the micro-batch feeds the model (padding excluded), read before it moves."""

    def to(self, device: torch.device) -> Batch: ...


class BatchSource(Protocol):
    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``), with what the interrupted work left: ``where`` it stopped
    ("at step 137/500"), what was ``saved``, and the ``checkpoint`` to resume from (None: none)."""

    def __init__(
        self,
        signum: int = signal.SIGINT,
        where: str = "",
        saved: str = "",
        checkpoint: Path | None = None,
    ) -> None:
        super().__init__(signum)
        self.signum, self.where, self.saved, self.checkpoint = signum, where, saved, checkpoint

    @property
    def message(self) -> str:
        """One line: "interrupted at step 137/500: saved checkpoint ..."."""
        head = f"interrupted {self.where}" if self.where else "interrupted"
        return f"{head}: {self.saved}" if self.saved else head


def signal_number(err: KeyboardInterrupt) -> int:
    """The signal behind an interrupt: SIGINT for a plain KeyboardInterrupt (Ctrl-C)."""
    return err.signum if isinstance(err, Interrupted) else signal.SIGINT


@contextlib.contextmanager
def deferred_interrupts(drop: bool = False) -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block; one that arrived meanwhile is raised (through the
    handler in place before) when the block ends, or forgotten with ``drop`` (while an interrupt
    is being handled: a second Ctrl-C must not cut its checkpoint short). Signals reach only the
    main thread, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        sig: handler
        for sig in (signal.SIGINT, signal.SIGTERM)
        if (handler := signal.getsignal(sig)) is not None  # None: set outside Python, left alone
    }
    for sig in previous:
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received and not drop:
            signal.raise_signal(received[0])


def _read(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Tensors as Python numbers and lists, in one copy from the device."""
    if not values:
        return {}
    flat = torch.cat([value.reshape(-1) for value in values.values()]).cpu()
    out, at = {}, 0
    for name, value in values.items():
        out[name] = flat[at : at + value.numel()].view(value.shape).tolist()
        at += value.numel()
    return out


@dataclass
class LoopSettings:
    """Where a TrainLoop runs and writes, how it clips, saves and shows progress."""

    run_dir: Path
    recipe_state: dict[str, Any]
    """What identifies the run's training (``turbos.train.checkpoint.recipe_state``), recorded in
    every checkpoint and checked on resume."""
    device: torch.device
    precision: str = "auto"
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    checkpoint_interval: int = 0
    """Save every this many steps; 0: only at the end and when stopped early or interrupted."""
    keep_last: int = 0
    """Checkpoints kept (0: all)."""
    save_final: bool = True
    """Save at the schedule's last step too (SFT exports its model instead)."""
    tokenizer_dir: Path | None = None
    """Tokenizer files copied into every checkpoint, so it is self-contained."""
    progress: bool = True
    description: str = "train"


class TrainLoop:
    """Optimizer steps ``step`` + 1 ... of ``schedule``, on ``batches`` and ``loss_fn``."""

    def __init__(
        self,
        model: nn.Module,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        schedule: LRSchedule,
        batches: BatchSource | None,
        loss_fn: LossFn,
        settings: LoopSettings,
        parallelize: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.model = model if parallelize is None else parallelize(model)
        self.optimizer = build_optimizer(self.model)
        self.schedule = schedule
        self.batches = batches
        """The batch source; a kind may switch it between steps (pre-training: one per stage)."""
        self.loss_fn = loss_fn
        self.settings = settings
        self.run_dir = Path(settings.run_dir)
        self.device = settings.device
        self.world = world_size()
        """Ranks training together (1: a single process)."""
        self.data_ranks = self.world
        """Ranks reading different batches: the step's tokens are theirs (context-parallel ranks
        share their batches, and a kind that splits them says so)."""
        self.main = is_main()
        """Whether this process logs and shows progress (rank 0)."""
        self.step = 0
        """Optimizer updates done."""
        self.tokens = 0
        """Tokens trained on so far."""
        self.metrics: MetricsLog | None = None  # opened by the first train(): resuming trims it
        self._resumed = False
        self._completed: tuple[dict[str, Any], dict[str, Any]] | None = None
        """(RNG states, trainer state) at the end of the last completed step; None before one."""
        self._saved: tuple[int, Path] | None = None
        """(step, checkpoint in this run directory holding it)."""
        self._unlogged: dict[str, Any] | None = None
        self._bar: tqdm | None = None

    # ---------------------------------------------------------------------------- kind hooks
    def grad_accum(self) -> int:
        """Micro-batches of the coming step."""
        return 1

    def begin(self) -> None:
        """Called when ``train`` starts (pre-training validates before its first step)."""

    def before_step(self) -> None:
        """Called before each step (pre-training enters the step's stage)."""

    def after_step(self, record: dict[str, Any]) -> None:
        """Called with each step's record before it is logged (pre-training validates, adding to it)."""

    def describe(self) -> str:
        """The progress bar's label for the coming step."""
        return self.settings.description

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows after a step."""
        return {"loss": f"{record['lm_loss']:.3f}", "tok_s": f"{record['tokens_per_s']:,.0f}"}

    def record_fields(self) -> dict[str, Any]:
        """Fields a step's record carries after ``step`` (pre-training: its stage and length)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """The kind's own entries of a checkpoint's trainer state."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Put the loop at a saved trainer state (before the weights load; a kind whose model
        config changes with the state, such as a stage's RoPE alpha, extends this)."""
        self.step, self.tokens = state["step"], state["tokens"]
        self.batches.load_state_dict(state["data"])

    # ------------------------------------------------------------------------------ the step
    def forward_backward_step(
        self, batch: Batch, grad_accum: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of one micro-batch, and its gradients added: those of loss / grad_accum."""
        with autocast_context(self.settings.precision, self.device):
            loss, metrics = self.loss_fn(self.model, batch)
        (loss / grad_accum).backward()
        return loss.detach(), metrics

    def train_step(self) -> dict[str, Any]:
        """One optimizer update; returns its metrics record (already counted as done)."""
        start = time.perf_counter()
        grad_accum = self.grad_accum()
        lrs = set_lr(self.optimizer, self.schedule(self.step))
        means: dict[str, torch.Tensor] = {}
        tokens = 0
        for _ in range(grad_accum):
            batch = next(self.batches, None)
            if batch is None:
                raise RuntimeError(f"{self.describe()}: the batch source ran out at step {self.step + 1}")
            tokens += batch.num_tokens
            loss, metrics = self.forward_backward_step(batch.to(self.device), grad_accum)
            # "_loss", what was back-propagated, is checked, not logged: the metrics say what to log.
            for name, value in {"_loss": loss, **metrics}.items():  # in float64, as Python floats add
                means[name] = means.get(name, 0) + value.detach().double() / grad_accum
        if self.world > 1:  # the step's record is that of all ranks' micro-batches
            means["_tokens"] = means["_loss"].new_tensor(tokens)
            means = mean_over_ranks(means)
        clip = self.settings.grad_clip or math.inf
        grad_norm = clip_grad_norm_(self.model.parameters(), clip)
        means["grad_norm"] = grad_norm.double()
        with deferred_interrupts():
            values = _read(means)  # the step's one wait for the device
            if self.world > 1:
                tokens = round(values.pop("_tokens") * self.data_ranks)
            loss = values.pop("_loss")
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss} at step {self.step + 1}; the last checkpoint is intact"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += tokens
            self._completed = (rng_state(), self.trainer_state())
            grad_norm = values.pop("grad_norm")
            routing = summarize_moe(values)
            record = {
                "step": self.step,
                **self.record_fields(),
                **values,
                "lr": lrs,
                "grad_norm": grad_norm,
                "tokens": self.tokens,
                "tokens_per_s": tokens / (time.perf_counter() - start),
                **routing,
            }
            self._unlogged = record
        return record

    # ------------------------------------------------------------------------------ the run
    def train(self, end: int | None = None) -> None:
        """Train to step ``end`` (default: the schedule's last), checkpointing as the settings say."""
        total = self.schedule.total_steps
        end = total if end is None else min(end, total)
        if self.metrics is None and self.main:
            self.metrics = MetricsLog(self.run_dir, resume_step=self.step if self._resumed else None)
        self._bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (self.settings.progress and self.main),
            unit="step",
            dynamic_ncols=True,
        )
        try:
            self.begin()
            while self.step < end:
                self.before_step()
                self._bar.set_description(self.describe(), refresh=False)
                record = self.train_step()
                self.after_step(record)
                self.log(record)
                self._bar.set_postfix(self.postfix(record), refresh=False)
                self._bar.update(1)
                interval = self.settings.checkpoint_interval
                if (interval and self.step % interval == 0) or (
                    self.step == end and (self.settings.save_final or end < total)
                ):
                    self.save()
        except KeyboardInterrupt as err:
            raise self.interrupted(err) from None
        finally:
            self._bar.close()
            self._bar = None

    def log(self, record: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl (never half a line; rank 0 only)."""
        with deferred_interrupts():
            if self.metrics is not None:
                self.metrics.write(record)
            self._unlogged = None

    def write(self, text: str) -> None:
        """A line of output that does not break the progress bar (rank 0 only)."""
        if self.main:
            tqdm.write(text)

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            **self.extra_state(),
            "data": self.batches.state_dict(),
            "recipe": self.settings.recipe_state,
        }

    def save(self) -> Path:
        """Checkpoint the last completed step (atomically; a signal waits for the write)."""
        rng, state = self._completed
        save = sharded.save_sharded_checkpoint if self.world > 1 else save_checkpoint
        with deferred_interrupts():
            path = save(
                self.run_dir,
                self.step,
                self.model,
                self.optimizer,
                {**state, **self.extra_state()},
                self.settings.tokenizer_dir,
                self.settings.keep_last,
                rng=rng,
            )
            self._saved = (self.step, path)
        return path

    def resume(self, checkpoint: str | Path) -> dict[str, Any]:
        """Continue from a checkpoint: the kind's state and the batch source's position
        (``restore``), then weights, optimizer and RNGs; returns the checkpoint's trainer state."""
        checkpoint = Path(checkpoint)
        state = read_trainer_state(checkpoint)
        self.restore(state)
        if sharded.is_sharded_checkpoint(checkpoint):
            sharded.load_sharded_checkpoint(checkpoint, self.model, self.optimizer)
        elif self.world > 1:
            raise ValueError(
                f"checkpoint {checkpoint} was written by a single process: resume it on one process "
                "(its next checkpoint on several ranks is sharded)"
            )
        else:
            load_checkpoint(checkpoint, self.model, self.optimizer)
        self._completed = (rng_state(), state)
        self._resumed = True
        if checkpoint.parent.resolve() == checkpoint_root(self.run_dir).resolve():
            self._saved = (self.step, checkpoint)
        return state

    def interrupted(self, err: KeyboardInterrupt) -> Interrupted:
        """What to raise for an interrupt: the partial step dropped, the last completed one logged
        and checkpointed (unless it already is), and where it stopped."""
        with deferred_interrupts(drop=True):
            self.optimizer.zero_grad(set_to_none=True)
            if self._unlogged is not None:
                self.log(self._unlogged)  # its validation, if it was cut short, is left out
            if self._completed is None:
                where = f"at step {self.step}/{self.schedule.total_steps}"
                return Interrupted(signal_number(err), where, "nothing saved (no step had finished)")
            rng, state = self._completed
            self.restore(state)
            set_rng_state(rng)
            path = self.save() if self._saved is None or self._saved[0] != self.step else self._saved[1]
        where = f"at step {self.step}/{self.schedule.total_steps}"
        return Interrupted(signal_number(err), where, f"saved checkpoint {path}", path)
