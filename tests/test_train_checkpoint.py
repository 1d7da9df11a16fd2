"""Checkpoints: atomic writes (a crash mid-save keeps the last good one), keep-last-K, RNG state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from turbos.model import TurboSForCausalLM
from turbos.train import checkpoint as ckpt
from turbos.train.optim import build_optimizer


def model_and_optimizer(seed: int = 0) -> tuple[TurboSForCausalLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TurboSForCausalLM(small_config())
    optimizer = build_optimizer(model, lr=1e-3)
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # so the optimizer has moments to save
    return model, optimizer


def save(run: Path, step: int, model, optimizer, keep_last: int = 0) -> Path:
    return ckpt.save_checkpoint(run, step, model, optimizer, {"step": step}, keep_last=keep_last)


def test_checkpoint_round_trips_weights_optimizer_and_state(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 7, model, optimizer)
    assert path.name == "step-00000007"
    assert {"config.json", "model.safetensors", "optimizer.pt", "rng.pt", "trainer_state.json"} <= {
        p.name for p in path.iterdir()
    }
    other, other_opt = model_and_optimizer(seed=1)
    state = ckpt.load_checkpoint(path, other, other_opt)
    assert state == {"step": 7}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} must load bit for bit"
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    loaded = [s["exp_avg"] for s in other_opt.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, loaded, strict=True))


def test_a_crash_during_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, optimizer = model_and_optimizer()
    good = save(tmp_path, 1, model, optimizer)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    def killed_midway(directory, model, optimizer, state, tokenizer_dir, rng):
        model.save_pretrained(directory)  # some files are written ...
        raise KeyboardInterrupt("killed")  # ... then the process dies

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(ckpt, "write_checkpoint_files", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, optimizer)
    monkeypatch.undo()

    assert any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir()), "partial save left"
    assert ckpt.latest_checkpoint(tmp_path) == good, "the partial step-2 save must be invisible"
    assert ckpt.resolve_resume("auto", tmp_path) == good
    restored, _ = model_and_optimizer(seed=3)
    ckpt.load_checkpoint(good, restored)
    assert all(torch.equal(expected[k], v) for k, v in restored.state_dict().items())

    save(tmp_path, 2, model, optimizer)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"], "the next save cleans up the partial one"


def test_keep_last_k_deletes_the_oldest_checkpoints(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    save(tmp_path, 6, model, optimizer)
    written = save(tmp_path, 4, model, optimizer, keep_last=1)
    assert written.is_dir(), "a later step's checkpoint must not push out the one just saved"


def test_a_rewind_sets_the_abandoned_branch_aside_and_resume_auto_follows_the_new_one(
    tmp_path: Path, capsys
) -> None:
    model, optimizer = model_and_optimizer()
    for step in (2, 4, 6):
        save(tmp_path, step, model, optimizer)
    (tmp_path / "metrics.jsonl").write_text('{"step": 6}\n')
    (tmp_path / "model").mkdir()  # an output of the finished run, abandoned with it
    rewind = tmp_path / "checkpoints" / "step-00000002"

    resumed = ckpt.open_run_dir(tmp_path, str(rewind), overwrite=False, outputs=[tmp_path / "model"])

    assert resumed == rewind and ckpt.list_checkpoints(tmp_path) == [rewind]
    [aside] = (tmp_path / "checkpoints").glob("abandoned-*")
    assert sorted(p.name for p in aside.iterdir()) == [
        "metrics.jsonl",
        "model",
        "step-00000004",
        "step-00000006",
    ]
    assert (aside / "metrics.jsonl").read_text() == (tmp_path / "metrics.jsonl").read_text()
    assert "moved the abandoned branch (step-00000004, step-00000006, model)" in capsys.readouterr().err
    new = save(tmp_path, 4, model, optimizer, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [new] and ckpt.resolve_resume("auto", tmp_path) == new


def test_resuming_under_a_different_recipe_names_the_differing_fields(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    recipe = {"lr": 1e-3, "stages": [{"name": "a", "steps": 2}, {"name": "b", "steps": 4}]}
    saved = ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2, "recipe": recipe})
    assert ckpt.open_run_dir(tmp_path, "auto", False, recipe) == saved, "the same recipe resumes"
    changed = {"lr": 2e-3, "stages": [{"name": "a", "steps": 3}, {"name": "c", "steps": 4}]}
    with pytest.raises(ValueError, match=r"\['lr', 'stages\.0\.steps', 'stages\.1\.name'\] differ"):
        ckpt.open_run_dir(tmp_path, "auto", False, changed)
    with pytest.raises(ValueError, match=r"\['stages'\] differ"):
        ckpt.open_run_dir(tmp_path, "auto", False, {"lr": 1e-3, "stages": recipe["stages"][:1]})


def test_resume_auto_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        ckpt.resolve_resume("auto", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)


def test_loading_into_a_different_network_is_refused(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 1, model, optimizer)
    with pytest.raises(ValueError, match=r"different model config: \['hidden_size'"):
        ckpt.load_checkpoint(path, TurboSForCausalLM(small_config(hidden_size=32)))


def test_rng_state_restores_python_numpy_and_torch_draws() -> None:
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
