"""Pictures of a run from its metrics.jsonl: loss curves, LR per param group, expert load per layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from turbos.train.metrics import read_metrics


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Lay out, write as PNG and close (so long runs do not accumulate open figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def _stage_boundaries(ax: Any, train: list[dict[str, Any]]) -> None:
    """Dotted vertical lines where the stage changes, labelled with the new stage (none for an SFT
    run, whose records have no stage)."""
    for before, after in zip(train, train[1:], strict=False):
        if after.get("stage") != before.get("stage"):
            ax.axvline(before["step"], color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                after["stage"],
                (before["step"], 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=7,
                color="grey",
            )


def plot_losses(records: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    train = [r for r in records if "lm_loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss", lw=1)
        ax.plot(
            [r["step"] for r in train],
            [r["loss"] for r in train],
            label="train loss (+ aux)",
            lw=0.8,
            alpha=0.6,
        )
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss", ms=3)
    _stage_boundaries(ax, train)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path


def plot_learning_rates(records: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    train = [r for r in records if "lr" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups = list(train[0]["lr"]) if train else []
    for group in groups:
        ax.plot([r["step"] for r in train], [r["lr"][group] for r in train], label=group)
    _stage_boundaries(ax, train)
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate per parameter group")
    ax.grid(alpha=0.3)
    if groups:
        ax.legend()
    save_figure(fig, path)
    return path


def plot_expert_load(records: list[dict[str, Any]], path: Path) -> Path:
    """One heat map per MoE layer: expert (rows) x step (columns), colour = share of assignments."""
    plt = pyplot()
    train = [r for r in records if r.get("expert_load")]
    num_layers = len(train[0]["expert_load"])
    fig, axes = plt.subplots(num_layers, 1, figsize=(8, 1.2 + 1.1 * num_layers), sharex=True, squeeze=False)
    steps = [r["step"] for r in train]
    for layer, ax in enumerate(axes[:, 0]):
        load = [
            [r["expert_load"][layer][e] for r in train] for e in range(len(train[0]["expert_load"][layer]))
        ]
        image = ax.imshow(
            load,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            vmin=0,
            extent=(steps[0] - 0.5, steps[-1] + 0.5, len(load) - 0.5, -0.5),
        )
        ax.set_ylabel(f"MoE {layer}\nexpert", fontsize=8)
        fig.colorbar(image, ax=ax, pad=0.01, label="share")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("Routed expert load per MoE layer (balanced = 1 / num_experts)")
    save_figure(fig, path)
    return path


def plot_grpo(records: list[dict[str, Any]], path: Path) -> Path:
    """A GRPO run (``turbos.rl``) per rollout: reward and accuracy by sampling mode, thinking rate
    by level, mean tokens by mode; per update: KL, clip fraction and entropy; seconds per part."""
    plt = pyplot()
    rollouts = [r for r in records if "reward" in r]
    steps = [r["step"] for r in rollouts]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    (reward, think, tokens), (kl, entropy, seconds) = axes
    reward.plot(steps, [r["reward"] for r in rollouts], "k-", lw=1.5, label="reward")
    for mode in ("auto", "think", "no_think"):
        if f"{mode}/accuracy" in rollouts[0]:
            reward.plot(steps, [r[f"{mode}/accuracy"] for r in rollouts], lw=1, label=f"accuracy, {mode}")
            tokens.plot(steps, [r[f"{mode}/tokens"] for r in rollouts], lw=1, label=mode)
    levels = sorted(
        {k.split("/")[1] for r in rollouts for k in r if k.startswith("auto/L")}, key=lambda x: int(x[1:])
    )
    for level in levels:
        key = f"auto/{level}/think_rate"
        think.plot(steps, [r.get(key, float("nan")) for r in rollouts], lw=1, label=level)
    updates = [r for r in records if "kl" in r or "clip_fraction" in r]
    kl.plot([r["step"] for r in updates], [r.get("kl", float("nan")) for r in updates], lw=1, label="K3 KL")
    clip = kl.twinx()
    clip.plot([r["step"] for r in updates], [r["clip_fraction"] for r in updates], "C1", lw=0.8, alpha=0.7)
    clip.set_ylabel("clip fraction", color="C1")
    entropy.plot([r["step"] for r in updates], [r["entropy"] for r in updates], lw=1)
    for part in ("rollout_s", "reference_s"):
        seconds.plot(steps, [r[part] for r in rollouts], lw=1, label=part[:-2])
    seconds.plot([r["step"] for r in records], [r["update_s"] for r in records], lw=1, label="update")
    titles = [
        (reward, "Reward and accuracy of the rollouts", "share"),
        (think, "auto mode: thinking rate by level", "answers that thought"),
        (tokens, "Mean generated tokens by mode", "tokens"),
        (kl, "KL to the reference (left), clip fraction (right)", "K3 KL"),
        (entropy, "Policy entropy", "nats/token"),
        (seconds, "Seconds per part", "s"),
    ]
    for ax, title, ylabel in titles:
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    save_figure(fig, path)
    return path


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png, lr.png, (for MoE models) expert_load.png and (for GRPO runs) grpo.png
    instead of loss.png; returns their paths."""
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    grpo = any("reward" in r for r in records)
    paths = [plot_grpo(records, out / "grpo.png") if grpo else plot_losses(records, out / "loss.png")]
    paths.append(plot_learning_rates(records, out / "lr.png"))
    if any(r.get("expert_load") for r in records):
        paths.append(plot_expert_load(records, out / "expert_load.png"))
    return paths
