"""Interop with Hugging Face: checkpoints of other model types converted to and from turbos
(state-dict adapters, no fork of layer code), and transformers' Auto classes for turbos
directories.

- ``convert``: ``convert_from_hf`` / ``convert_to_hf`` over the adapters below, one per
  ``model_type``; ``turbos convert`` calls them.
- ``nemotron_h``: NVIDIA NemotronH (Mamba2 / attention / MLP or MoE layers: the A/M/F idea).
- ``hunyuan``: Tencent HunYuan-MoE v1 (TurboS's attention and MoE).
- ``auto``: transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` for turbos directories
  (registered lazily by ``import turbos``), ``generate`` and ``pipeline`` on our hybrid cache,
  and ``save_hf`` for a complete Hugging Face directory.
"""
