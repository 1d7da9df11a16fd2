"""Reinforcement learning: GRPO with the report's engineering choices and the adaptive-CoT
rewards (report §3.2.2, §3.5).

- ``losses``: the terms of the objective (clipped token-level policy gradient, K3 KL, best-of-N
  likelihood), pure functions of per-token tensors;
- ``advantages``: group advantages with the group reward adjustment, prompt filtering, dynamic
  sampling;
- ``rewards``: reward functions (built-in ones or a user's ``reward(prompts, completions,
  **meta)``) and the adaptive-CoT shaping;
- ``verifier``: answer consistency (equivalent forms of a final answer, report §3.4);
- ``instructions``: instruction-following constraints with exact checkers (IFEval style) and a
  built-in family of such prompts;
- ``sandbox``: untrusted code in bubblewrap namespaces with rlimits (the ``code`` reward);
- ``judge``: a generative judge over any OpenAI-compatible endpoint, pairwise with the positions
  swapped;
- ``aggregate``: per-domain reward rules, weighted fusion, the repetition penalty;
- ``remote``: reward functions as HTTP services and their client;
- ``deliberate``: deliberation learning (rivals, a judge panel, weakness profile, loss data);
- ``rollout``: groups of samples from the in-process engine on the policy's live weights, and
  the packed batches of the update;
- ``recipe`` / ``trainer``: ``GRPORecipe`` and ``run_grpo`` (``turbos grpo``), on the shared
  training loop.
"""

from turbos.rl.judge import Judge, judge_reward
from turbos.rl.recipe import GRPORecipe
from turbos.rl.rewards import AdaptiveShaping, adaptive_cot_rewards, correct_reward, load_reward
from turbos.rl.trainer import run_grpo

__all__ = [
    "AdaptiveShaping",
    "GRPORecipe",
    "Judge",
    "adaptive_cot_rewards",
    "correct_reward",
    "judge_reward",
    "load_reward",
    "run_grpo",
]
