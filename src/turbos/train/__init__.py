"""Training: recipes, AdamW param groups and expert LRs, LR schedules, the loop, checkpoints, plots.

- `recipe`: YAML recipes parsed into a validated `Recipe`, dotted-key overrides, stage plans.
- `optim`: parameter groups (no decay on norms, biases, SSM parameters, embeddings) and the
  routed-expert LR rule; `schedule`: warm-up, constant, cosine annealing, per-stage LR (WSD), and
  SFT's warm-up + cosine.
- `loop`: the one training loop (step, accumulation, clipping, schedule, checkpoints, metrics,
  interrupts) that pre-training and SFT share; `trainer`: pre-training's stages on it;
  `checkpoint`: atomic checkpoints and exact resume; `metrics`: metrics.jsonl;
  `evaluate`: validation loss and precision rules; `plots`: PNGs of a run.
"""

from turbos.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from turbos.train.optim import build_optimizer, expert_lr_scale, param_groups
from turbos.train.plots import plot_run
from turbos.train.recipe import Recipe, RecipeError, StagePlan, load_recipe, parse_recipe, plan_stages
from turbos.train.schedule import LRSchedule
from turbos.train.trainer import Trainer

__all__ = [
    "LRSchedule",
    "Recipe",
    "RecipeError",
    "StagePlan",
    "Trainer",
    "build_optimizer",
    "expert_lr_scale",
    "latest_checkpoint",
    "load_checkpoint",
    "load_recipe",
    "param_groups",
    "parse_recipe",
    "plan_stages",
    "plot_run",
    "save_checkpoint",
]
