"""turbos: an open implementation of Hunyuan-TurboS (arXiv 2505.15431).

A hybrid Transformer-Mamba2 Mixture-of-Experts language model with its training, post-training
and serving stack, runnable end to end on a CPU at toy scale.
"""

__version__ = "0.1.0"
