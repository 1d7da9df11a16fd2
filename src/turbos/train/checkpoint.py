"""Training checkpoints: one directory per step, written whole or not at all.

Layout of ``RUN_DIR/checkpoints/step-00000100/``:

    config.json, model.safetensors       the model (loads with TurboSForCausalLM.from_pretrained)
    tokenizer.json, ...                  the tokenizer files, so the directory is self-contained
    optimizer.pt                         AdamW state
    rng.pt                               Python, NumPy and torch (CPU and CUDA) generator states
    trainer_state.json                   step, tokens seen, data position, recipe (and the kind's own:
                                         pre-training's stage and last validation loss, ...)

A run on several ranks writes ``dcp/`` (sharded model and optimizer) in place of optimizer.pt
(``turbos.distributed.checkpoint``), with the same other files.

Everything is written into a hidden temporary directory (``.tmp-step-...``), flushed to disk,
and renamed into place, so a kill during a save leaves the previous checkpoint untouched and
``latest_checkpoint`` (which reads only ``step-N`` names) never picks a partial one.

Resuming from a checkpoint that is not the run's latest (a rewind) abandons the later ones: they
move, with a copy of metrics.jsonl, into ``checkpoints/abandoned-<timestamp>/``, so that neither
keep-last nor ``--resume auto`` mixes the two branches and nothing is deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turbos.config import TurboSConfig
from turbos.model import TurboSForCausalLM
from turbos.safetensors_io import load_state_dict
from turbos.train.metrics import METRICS_FILE

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
ABANDONED_PREFIX = "abandoned-"
_STEP_DIR = re.compile(r"step-(\d+)")
_TMP_PREFIX = ".tmp-"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path:
    """A checkpoint directory from ``--resume``: a path, or 'auto' for the run's latest."""
    if resume == "auto":
        path = latest_checkpoint(run_dir)
        if path is None:
            raise FileNotFoundError(f"--resume auto: no checkpoint under {checkpoint_root(run_dir)}")
        return path
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint directory (no {TRAINER_STATE})")
    return path


def open_run_dir(
    run_dir: str | os.PathLike,
    resume: str | os.PathLike | None,
    overwrite: bool,
    recipe: dict[str, Any] | None = None,
    outputs: Sequence[Path] = (),
) -> Path | None:
    """The checkpoint a run resumes from, or None for a fresh start.

    ``resume``: a checkpoint directory, or 'auto' for the run's latest. Without it, a run directory
    that already holds checkpoints is refused unless ``overwrite`` (which deletes them), so a
    finished or interrupted run is never lost by starting again by mistake.

    ``recipe``: what identifies the run's training (``trainer_state["recipe"]`` of its
    checkpoints); a checkpoint that recorded a different one is refused, naming the differing
    fields. Resuming from an earlier checkpoint than the run's latest moves the later ones, and
    the run's ``outputs`` that exist (its final model...), into ``checkpoints/abandoned-<time>/``.
    """
    if resume is not None:
        checkpoint = resolve_resume(str(resume), run_dir)
        if recipe is not None:
            check_recipe(checkpoint, recipe)
        later = later_checkpoints(run_dir, checkpoint)
        if later:
            abandon(run_dir, [*later, *(path for path in outputs if path.exists())], checkpoint)
        return checkpoint
    if list_checkpoints(run_dir):
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints: resume with --resume auto, "
                "pass --overwrite, or choose another output_dir"
            )
        shutil.rmtree(checkpoint_root(run_dir))
    return None


def start_run(
    out: Path,
    resume: str | None,
    overwrite: bool,
    recipe: dict[str, Any],
    outputs: Sequence[Path],
    what: str,
) -> tuple[Path | None, dict[str, Any] | None]:
    """Open the output directory of a run whose final ``outputs`` end with its summary JSON:
    (the checkpoint to resume from or None, the summary when the run is already finished).

    A finished run is refused unless resuming (its latest checkpoint: nothing to do) or
    ``overwrite`` (its outputs are deleted); checkpoints as ``open_run_dir`` says. ``what``
    names the kind of run in the error ("SFT")."""
    finished = [path for path in outputs if path.exists()]
    if resume is None and finished:
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a finished {what} run ({', '.join(path.name for path in finished)}): pass "
                "--overwrite to replace it, or choose another output_dir"
            )
        for path in finished:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    checkpoint = open_run_dir(out, resume, overwrite, recipe, outputs)
    summary = outputs[-1]
    if checkpoint is not None and summary.is_file():
        print(
            f"{out} is already finished (resumed from its latest checkpoint {checkpoint}); nothing to do",
            file=sys.stderr,
        )
        return checkpoint, json.loads(summary.read_text())
    return checkpoint, None


def _differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Dotted keys (``stages.1.steps``) at which two JSON values differ: mappings and lists of the
    same length are compared item by item, anything else as a whole."""
    if isinstance(saved, dict) and isinstance(current, dict):
        pairs = [(key, saved.get(key), current.get(key)) for key in sorted(saved.keys() | current.keys())]
    elif isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        pairs = [(str(i), a, b) for i, (a, b) in enumerate(zip(saved, current, strict=True))]
    else:
        return [] if saved == current else [where]
    return [diff for key, a, b in pairs for diff in _differences(a, b, f"{where}.{key}" if where else key)]


def check_recipe(checkpoint: Path, recipe: dict[str, Any]) -> None:
    """ValueError naming the fields in which ``recipe`` differs from the one the checkpoint recorded."""
    saved = read_trainer_state(checkpoint).get("recipe")
    if saved is None:
        print(
            f"warning: checkpoint {checkpoint} does not record its recipe (an older version wrote it); "
            "resuming without checking that the recipe is unchanged",
            file=sys.stderr,
        )
        return
    changed = _differences(saved, recipe)
    if changed:
        raise ValueError(
            f"checkpoint {checkpoint} was trained with a different recipe: {changed} differ (a resumed "
            "run may change only where it writes, how often it saves and where it runs)"
        )


def recipe_state(recipe: dict[str, Any], resumable: Collection[str]) -> dict[str, Any]:
    """What identifies a run's training (JSON types), recorded in its checkpoints: the recipe less
    the fields in ``resumable``, those a resumed run may change (where it writes, how often it
    saves, where it runs); every other field shapes the batches or the updates."""
    state = json.loads(json.dumps(recipe))
    return {key: value for key, value in state.items() if key not in resumable}


def later_checkpoints(run_dir: str | os.PathLike, checkpoint: Path) -> list[Path]:
    """The run's checkpoints of later steps than ``checkpoint`` (which may belong to another run)."""
    step = read_trainer_state(checkpoint)["step"]
    return [path for path in list_checkpoints(run_dir) if int(_STEP_DIR.fullmatch(path.name)[1]) > step]


def abandon(run_dir: str | os.PathLike, paths: Sequence[Path], resumed: Path) -> Path:
    """Move ``paths`` (the branch a rewind to ``resumed`` abandons) and a copy of the run's
    metrics.jsonl into a new ``checkpoints/abandoned-<time>/`` folder; prints where they went."""
    root = checkpoint_root(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, number = root / f"{ABANDONED_PREFIX}{stamp}", 1
    while folder.exists():
        number += 1
        folder = root / f"{ABANDONED_PREFIX}{stamp}-{number}"
    folder.mkdir(parents=True)
    for path in paths:
        shutil.move(path, folder / path.name)
    metrics = Path(run_dir) / METRICS_FILE
    if metrics.is_file():
        shutil.copy2(metrics, folder / METRICS_FILE)
    print(
        f"resuming from {resumed}, before the run's latest checkpoint: moved the abandoned branch "
        f"({', '.join(path.name for path in paths)}) and a copy of {METRICS_FILE} to {folder}",
        file=sys.stderr,
    )
    return folder


# ----------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every generator training draws from (MoE recycle routing uses torch's global one)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_checkpoint_files(
    directory: Path,
    model: TurboSForCausalLM,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None,
    rng: dict[str, Any],
) -> None:
    """Write every file of a checkpoint into ``directory``; the trainer state goes last."""
    model.save_pretrained(directory)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    write_run_files(directory, trainer_state, tokenizer_dir, rng)


def write_run_files(
    directory: Path, trainer_state: dict[str, Any], tokenizer_dir: Path | None, rng: dict[str, Any]
) -> None:
    """A checkpoint's files besides the model and optimizer: tokenizer, RNGs, then the trainer state."""
    if tokenizer_dir is not None:
        for path in sorted(Path(tokenizer_dir).iterdir()):
            if path.is_file():
                shutil.copy2(path, directory / path.name)
    torch.save(rng, directory / "rng.pt")
    (directory / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: TurboSForCausalLM,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None = None,
    keep_last: int = 0,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Atomically write the checkpoint of ``step``; then keep only the newest ``keep_last`` (0: all),
    never deleting the one just written. ``rng``: the generator states to record (``rng_state()``,
    default: the current ones)."""
    tmp = begin_checkpoint(run_dir, step)
    write_checkpoint_files(
        tmp, model, optimizer, trainer_state, tokenizer_dir, rng if rng is not None else rng_state()
    )
    return publish_checkpoint(tmp, keep_last)


def begin_checkpoint(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (stale ones are removed)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by a save that was killed
        shutil.rmtree(stale)
    tmp = root / f"{_TMP_PREFIX}step-{step:08d}"
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, keep_last: int = 0) -> Path:
    """Flush a written temporary checkpoint to disk and rename it into place; then keep only the
    newest ``keep_last`` (0: all), never deleting this one. Returns its final path."""
    _fsync_tree(tmp)
    root, final = tmp.parent, tmp.parent / tmp.name.removeprefix(_TMP_PREFIX)
    run_dir = root.parent
    if final.exists():  # the same step saved again: swap, never leaving the step without a copy
        old = root / f"{_TMP_PREFIX}old-{final.name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if keep_last:
        for path in list_checkpoints(run_dir)[:-keep_last]:
            if path != final:
                shutil.rmtree(path)
    return final


def read_trainer_state(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAINER_STATE).read_text())


def load_checkpoint(
    directory: str | os.PathLike, model: TurboSForCausalLM, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place and restore the RNGs; returns the trainer state.

    The model must already have the checkpoint's config (stage settings such as rope_alpha
    included), so a checkpoint never loads into a different network.
    """
    directory = Path(directory)
    check_model_config(directory, model)
    model.load_weights(load_state_dict(directory), f"checkpoint {directory} does not match its config")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    set_rng_state(torch.load(directory / "rng.pt", weights_only=True))
    return read_trainer_state(directory)


def check_model_config(directory: Path, model: TurboSForCausalLM) -> None:
    """ValueError naming the fields in which the checkpoint's model config differs from the model's."""
    saved, current = TurboSConfig.from_pretrained(directory).to_dict(), model.config.to_dict()
    if saved != current:
        differences = sorted(key for key in saved if saved[key] != current.get(key))
        raise ValueError(f"checkpoint {directory} has a different model config: {differences}")
