"""Data pipeline: tokenizer, corpora, packing into training rows, and built-in reasoning tasks.

- `tokenizer`: byte-level BPE (Hugging Face `tokenizers`) with the chat and thinking special tokens.
- `corpora`: document sources named by spec strings (`text:`, `jsonl:`, `parquet:`, `hf-disk:`,
  `builtin:`) and weighted mixtures; `builtin` holds the sources that need no download.
- `packing`: documents to fixed-length rows, streamed with exact resume; sequences packed into rows.
- `tasks`: reasoning problems with difficulty levels, step-by-step solutions and exact verifiers.
"""
