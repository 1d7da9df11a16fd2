"""Post-training: SFT, adaptive long-short chain-of-thought fusion, evaluation (report §3)."""
