"""Byte-level BPE tokenizer trained with Hugging Face `tokenizers`, saved in the `transformers` layout.

Byte-level means every string is first mapped to bytes, so any text round-trips:
`tok.decode(tok.encode(text).ids) == text` for all Unicode text not containing the special-token
strings. No normalizer and no added prefix space are used, for the same reason. Digits are
split one per token, so every number is spelled digit by digit, which is what the arithmetic
tasks (column addition) need.

The special tokens take the first ids, in `SPECIAL_TOKENS` order: pad = 0 (so zero-filled
buffers are padding), bos = 1, eos = 2, then the chat roles and the thinking delimiters. Encoding
adds no special tokens; callers place BOS/EOS themselves (packing joins documents with EOS).
The saved directory loads unchanged with `transformers.PreTrainedTokenizerFast.from_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from turbos.config import DamagedFileError

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_TOKEN = "<|end|>"  # closes one chat turn
THINK_TOKEN = "<think>"
END_THINK_TOKEN = "</think>"

SPECIAL_TOKENS = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
    END_TOKEN,
    THINK_TOKEN,
    END_THINK_TOKEN,
)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ADDITIONAL_SPECIAL_TOKENS = SPECIAL_TOKENS[3:]
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # special tokens plus one token per byte


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (special tokens and all 256 bytes included).

    The vocabulary can come out smaller when the texts have fewer merges of `min_frequency`.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (specials + bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _special_tokens_map() -> dict[str, object]:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens_map(),
        "clean_up_tokenization_spaces": False,  # keeps decode exact
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(), indent=2) + "\n")
    return out


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load a tokenizer saved by `save_tokenizer`, checking the special tokens have their ids."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {str(directory)!r}")
    data = path.read_bytes()  # an unreadable file is an OSError, not damage
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # not UTF-8, or not a tokenizer (tokenizers raises a bare Exception)
        raise DamagedFileError(path, err) from None
    wrong = [t for i, t in enumerate(SPECIAL_TOKENS) if tokenizer.token_to_id(t) != i]
    if wrong:
        raise ValueError(f"{path} does not give the special tokens {wrong} their turbos ids")
    return tokenizer
