"""Packing: exact row lengths, EOS between documents, nothing lost, disjoint validation, exact resume."""

import itertools

import pytest
import torch

from turbos.data.packing import (
    StreamingPackedDataset,
    document_split,
    eos_seq_idx,
    first_fit_decreasing,
    pack_rows,
    tokenize_documents,
)
from turbos.data.tokenizer import EOS_ID, train_tokenizer
from turbos.model.context import packed_position_ids

SEQ_LEN = 16
DOCUMENTS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (i % 7 + 1) for i in range(300)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCUMENTS, vocab_size=300)


def stream_of(documents, tokenizer):
    return list(itertools.chain.from_iterable(tokenize_documents(documents, tokenizer)))


def rows_of(documents, tokenizer):
    return list(pack_rows(tokenize_documents(documents, tokenizer), SEQ_LEN))


def unpack(rows):
    """The token stream that rows overlapping by one token were cut from."""
    rows = [list(map(int, row)) for row in rows]
    return [token for row in rows for token in row[:-1]] + rows[-1][-1:]


def document_numbers(rows, tokenizer):
    """The numbers of the documents that start in `rows`, in order."""
    text = tokenizer.decode(unpack(rows), skip_special_tokens=False)
    return [int(piece.split(":")[0]) for piece in text.split("document ")[1:] if ":" in piece]


def test_each_document_is_followed_by_eos(tokenizer):
    for ids, document in zip(tokenize_documents(DOCUMENTS[:5], tokenizer), DOCUMENTS[:5], strict=True):
        assert ids[-1] == EOS_ID and EOS_ID not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == document


def test_rows_have_exactly_seq_len_plus_one_tokens(tokenizer):
    rows = rows_of(DOCUMENTS, tokenizer)
    assert rows and all(len(row) == SEQ_LEN + 1 for row in rows)


def test_no_token_is_lost_except_a_tail_shorter_than_a_row(tokenizer):
    stream = stream_of(DOCUMENTS, tokenizer)
    rows = rows_of(DOCUMENTS, tokenizer)
    kept = unpack(rows)
    assert kept == stream[: len(kept)], "rows must be the stream, in order, overlapping by one token"
    assert len(stream) - len(kept) < SEQ_LEN + 1
    assert all(a[-1] == b[0] for a, b in itertools.pairwise(rows)), "consecutive rows share one token"


def test_documents_are_separated_by_eos_inside_rows(tokenizer):
    rows = rows_of(DOCUMENTS, tokenizer)
    assert sum(row[:-1].count(EOS_ID) for row in rows) >= len(DOCUMENTS) - 1


def test_document_split_is_stable_and_about_the_requested_fraction():
    splits = [document_split(d, 0.2) for d in DOCUMENTS]
    assert splits == [document_split(d, 0.2) for d in DOCUMENTS]
    assert 0.1 < splits.count("val") / len(splits) < 0.3, "300 documents at 20% should give 10-30% val"
    assert {document_split(d, 0.0) for d in DOCUMENTS} == {"train"}


def streaming(tokenizer, **overrides):
    options = {"shuffle_buffer": 32, "seed": 3} | overrides
    return StreamingPackedDataset(DOCUMENTS, tokenizer, SEQ_LEN, **options)


def test_unshuffled_finite_stream_equals_packing_in_order(tokenizer):
    rows = list(streaming(tokenizer, shuffle_buffer=0, repeat=False))
    expected = rows_of(DOCUMENTS, tokenizer)
    assert [row.tolist() for row in rows] == expected


def test_shuffled_finite_stream_keeps_every_row(tokenizer):
    rows = [row.tolist() for row in streaming(tokenizer, repeat=False)]
    expected = rows_of(DOCUMENTS, tokenizer)
    assert rows != expected and sorted(rows) == sorted(expected)


def test_streaming_validation_split_reads_only_validation_documents(tokenizer):
    val = streaming(tokenizer, split="val", val_fraction=0.2, shuffle_buffer=0, repeat=False)
    val_documents = [d for d in DOCUMENTS if document_split(d, 0.2) == "val"]
    assert [row.tolist() for row in val] == rows_of(val_documents, tokenizer)


def test_restoring_the_state_gives_the_same_next_rows(tokenizer):
    n_rows_per_pass = len(list(streaming(tokenizer, repeat=False)))
    for stop in (5, n_rows_per_pass + 7):  # mid-pass, and after the corpus has been read again
        original = streaming(tokenizer)
        rows = iter(original)
        for _ in range(stop):
            next(rows)
        state = original.state_dict()
        expected = [next(rows) for _ in range(10)]
        resumed = streaming(tokenizer)
        resumed.load_state_dict(state)
        got = list(itertools.islice(resumed, 10))
        assert state["rows_consumed"] == stop and all(map(torch.equal, got, expected))


def test_a_state_from_a_different_stream_is_rejected(tokenizer):
    state = streaming(tokenizer, seed=1).state_dict()
    with pytest.raises(ValueError, match="different stream"):
        streaming(tokenizer, seed=2).load_state_dict(state)


def test_a_finished_finite_pass_starts_again_from_the_beginning(tokenizer):
    dataset = streaming(tokenizer, repeat=False)
    first, second = list(dataset), list(dataset)
    assert all(map(torch.equal, first, second)) and dataset.rows_consumed == 0


def test_a_repeating_stream_of_a_mixture_reads_every_source_through(tokenizer):
    """Repeating re-read the whole mixture, which ends when its small source runs out, so most of
    the large source never came round; the endless reading restarts only the source that ran out."""
    from turbos.data.corpora import Mixture

    small, large = DOCUMENTS[:20], DOCUMENTS[20:]
    mixture = Mixture((small, large), (1.0, 1.0), seed=0)
    assert len({d for d in mixture if d in large}) < len(large) / 4, "one pass reads little of it"
    dataset = StreamingPackedDataset(mixture, tokenizer, SEQ_LEN, shuffle_buffer=0, seed=3)
    rows = list(itertools.islice(dataset, 3 * len(rows_of(DOCUMENTS, tokenizer))))
    seen = set(document_numbers(rows, tokenizer))
    assert {int(d.split(":")[0][len("document ") :]) for d in large} <= seen
    finite = StreamingPackedDataset(mixture, tokenizer, SEQ_LEN, shuffle_buffer=0, repeat=False)
    once = [row.tolist() for row in finite]
    assert [row.tolist() for row in rows[: len(once) - 1]] == once[:-1], "the first pass is unchanged"


def test_reset_at_eos_numbers_each_rows_documents_and_restarts_their_positions(tokenizer):
    rows = torch.stack(list(itertools.islice(streaming(tokenizer), 8)))
    inputs = rows[:, :-1]
    seq_idx = eos_seq_idx(inputs, EOS_ID)
    positions = packed_position_ids(seq_idx)
    for row, documents, position in zip(inputs.tolist(), seq_idx.tolist(), positions.tolist(), strict=True):
        document, at = 0, 0  # a row's first token continues the document it was cut from
        for t, token in enumerate(row):
            assert (documents[t], position[t]) == (document, at), f"token {t} of {row}"
            document, at = (document + 1, 0) if token == EOS_ID else (document, at + 1)
    assert int(seq_idx.max()) > 0, "rows hold several documents"


def test_first_fit_decreasing_places_the_longest_first_into_the_first_row_with_room():
    assert first_fit_decreasing([5, 3, 4, 2, 8, 1], 8) == [[4], [0, 1], [2, 3, 5]]
    assert first_fit_decreasing([2, 2, 2], 8) == [[0, 1, 2]], "ties keep their order"
    with pytest.raises(ValueError, match="a sequence of 9 tokens does not fit in a row of 8"):
        first_fit_decreasing([3, 9], 8)
