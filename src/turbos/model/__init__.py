"""The TurboS network, one file per layer kind."""

from turbos.model.cache import HybridCache
from turbos.model.hybrid import CausalLMOutput, TurboSForCausalLM, TurboSModel

__all__ = ["CausalLMOutput", "HybridCache", "TurboSForCausalLM", "TurboSModel"]
