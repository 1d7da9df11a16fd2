"""Byte-level BPE tokenizer: special-token ids, exact round trips, and loading through transformers."""

import itertools

import pytest

from turbos.data.builtin import PythonDocstrings
from turbos.data.tasks import generate_problems, render_document
from turbos.data.tokenizer import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    THINK_TOKEN,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

UNICODE_TEXTS = [
    "plain ascii",
    "  leading and trailing spaces  \t\n\n",
    "Ünïcödé, 日本語のテキスト, русский, العربية",
    "emoji 🎉🧠 and combining e\u0301 and zero width\u200bjoiner",
    "control \x00\x01\x7f and CRLF\r\n",
    "numbers 0123456789 and 3.14159",
]


@pytest.fixture(scope="module")
def corpus():
    return [render_document(p) for p in generate_problems(400)] + [*itertools.islice(PythonDocstrings(), 300)]


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=400)


def test_special_tokens_take_the_first_ids_in_order(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(BOS_TOKEN)) == (PAD_ID, BOS_ID)
    assert tokenizer.token_to_id(EOS_TOKEN) == EOS_ID


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_any_text_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text, "byte-level BPE must be lossless"


def test_encoding_adds_no_special_tokens(tokenizer):
    ids = tokenizer.encode("hello").ids
    assert BOS_ID not in ids and EOS_ID not in ids


def test_special_token_text_encodes_to_its_single_id(tokenizer):
    assert tokenizer.encode(THINK_TOKEN).ids == [tokenizer.token_to_id(THINK_TOKEN)]


def test_digits_are_split_one_per_token(tokenizer):
    tokens = tokenizer.encode("4821").tokens
    assert tokens == ["4", "8", "2", "1"], "numbers must be spelled digit by digit for arithmetic"


def test_training_reaches_the_requested_vocab_size(tokenizer):
    assert tokenizer.get_vocab_size() == 400


def test_vocab_smaller_than_specials_plus_bytes_is_rejected(corpus):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100)


def test_save_and_load_gives_the_same_tokenizer(tokenizer, tmp_path):
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    for text in UNICODE_TEXTS:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids


def test_load_from_a_directory_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_transformers_loads_the_saved_directory_unchanged(tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_tokenizer(tokenizer, tmp_path)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert set(hf.all_special_tokens) == set(SPECIAL_TOKENS)
    for text in UNICODE_TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text).ids, "transformers must tokenize exactly like tokenizers"
        assert hf.decode(ids) == text


def test_cli_trains_a_tokenizer_that_transformers_loads_with_its_chat_template(tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    from turbos.cli import main

    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 50)
    (tmp_path / "b.txt").write_text("What is 12 + 30? Answer: 42\n" * 50)
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                f"text:{tmp_path}/*.txt",
                "--vocab-size",
                "300",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    hf = PreTrainedTokenizerFast.from_pretrained(out)
    text = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|bos|><|user|>hi<|end|><|assistant|>"
    assert hf.decode(hf("lazy fox 42")["input_ids"]) == "lazy fox 42"
    assert main(["tokenizer", "train", "--data", "nope:x", "--out", str(out)]) == 2, "bad spec: clear error"


def test_tokenizer_train_reads_every_source_through(tmp_path) -> None:
    """Several --data sources used to be mixed, and the mixture ended with its smallest source:
    one small file cut the built-in corpus to a few documents and the vocabulary far below the
    size asked for."""
    from transformers import PreTrainedTokenizerFast

    from turbos.cli import main

    (tmp_path / "one.txt").write_text("a single short note")
    out = tmp_path / "tok"
    data = ["--data", "builtin:pydocs", f"text:{tmp_path}/*.txt"]
    assert main(["tokenizer", "train", *data, "--vocab-size", "600", "--out", str(out), "--no-progress"]) == 0
    assert PreTrainedTokenizerFast.from_pretrained(out).vocab_size == 600
