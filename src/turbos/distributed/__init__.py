"""Scale-out on ``torch.distributed``, applied to a built model from outside (the layers know
nothing of it).

- ``parallel``: the recipe's ``parallel:`` section (``ParallelConfig``), the degrees resolved
  against the world size (``ParallelDims``), process-group set-up (``init_distributed``) and
  small collectives (``is_main``, ``barrier``, ``mean_over_ranks``, ...);
- ``fsdp``: ``parallelize``: FSDP2 (``fully_shard``) per layer and at the root, mixed precision,
  activation checkpointing;
- ``checkpoint``: sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP,
  resharded on load to any number of ranks) plus the consolidated single-file model;
- ``planner``: memory and communication of a parallel layout, from the config alone;
- ``context_parallel``: sequences split over ranks (Mamba2 state passing);
- ``expert_parallel``: routed experts sharded over ranks, all-to-all between dispatch and experts.
"""
