"""Generated token ids to text, one token at a time, exactly, and cut at stop strings.

Our tokenizer is byte-level BPE (data/tokenizer.py): every token stands for a run of bytes, and a
multi-byte character may be split across tokens. So each token's bytes are fed to an incremental
UTF-8 decoder, which holds an incomplete character until its last byte comes. Chat-control
special tokens (role markers, ``<|end|>``, ``<|eos|>``...) produce no text; the thinking
delimiters keep theirs, so the reasoning parser can see them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from functools import lru_cache

from tokenizers import Tokenizer, decoders

from turbos.data.tokenizer import END_THINK_TOKEN, SPECIAL_TOKENS, THINK_TOKEN

VISIBLE_SPECIAL_TOKENS = (THINK_TOKEN, END_THINK_TOKEN)


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable character table used by byte-level BPE: printable
    bytes stand for themselves, the others, in order, for the characters from U+0100 upwards."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {chr(b): b for b in printable}
    others = sorted(set(range(256)) - set(printable))
    mapping.update({chr(256 + n): b for n, b in enumerate(others)})
    return mapping


def token_bytes(tokenizer: Tokenizer, vocab_size: int = 0) -> list[bytes]:
    """The bytes each token id stands for (b"" for chat-control special tokens), for at least
    ``vocab_size`` ids (a model's vocabulary may be padded beyond the tokenizer's; those ids
    have no text)."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        raise ValueError("the detokenizer needs a byte-level BPE tokenizer (turbos.data.tokenizer)")
    table = _byte_decoder()
    out = [b""] * max(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True))
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for text, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if text in added:
            out[i] = text.encode() if text in VISIBLE_SPECIAL_TOKENS or text not in SPECIAL_TOKENS else b""
        else:
            out[i] = bytes(table[c] for c in text)
    return out


class IncrementalDetokenizer:
    """Text of a growing list of tokens; ``add`` returns the new text that is safe to show.

    With stop strings, text that could be the start of one is held back until it is decided, and
    the text ends right before the first stop string found (``stopped`` becomes True).
    """

    def __init__(self, token_bytes: Sequence[bytes], stop: Iterable[str] = ()) -> None:
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        self.stopped = False
        self._sent = 0

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += self._utf8.decode(self._token_bytes[token_id])
        self._cut_at_stop(before)
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest of the text, at the end of generation (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            before = len(self.text)
            self.text += self._utf8.decode(b"", final=True)
            self._cut_at_stop(before)
        return self._release(final=True)

    def _cut_at_stop(self, before: int) -> None:
        if not self._stop:
            return
        start = max(0, before - self._longest_stop + 1)
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest end of the text that is a proper beginning of a stop string."""
        held = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
