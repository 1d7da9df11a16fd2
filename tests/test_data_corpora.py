"""Document sources: each file format, spec strings, built-ins, weighted mixtures and clear errors."""

import itertools
import json
import textwrap
from collections import Counter

import pytest

from turbos.data.builtin import PythonDocstrings, ReasoningDocs
from turbos.data.corpora import Mixture, build_corpus, interleave, parse_source
from turbos.data.tasks import generate_problems, render_document
from turbos.data.tasks.equivalence import problem_split


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_text_glob_gives_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("second file", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file\n\nstill first", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not matched", encoding="utf-8")
    assert list(parse_source(f"text:{tmp_path}/*.txt")) == ["first file\n\nstill first", "second file"]


def test_text_paragraph_unit_splits_at_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\nline two\n\n  \n\ntwo\n\n", encoding="utf-8")
    corpus = build_corpus({"source": f"text:{tmp_path}/*.txt", "unit": "paragraph"})
    assert list(corpus) == ["one\nline two", "two"]


def test_text_glob_recurses_with_double_star(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "deeper" / "x.txt").write_text("deep", encoding="utf-8")
    assert list(parse_source(f"text:{tmp_path}/**/*.txt")) == ["deep"]


def test_jsonl_yields_the_chosen_field_skipping_empty_documents(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha", "id": 1}, {"text": ""}, {"text": "beta"}])
    assert list(parse_source(f"jsonl:{tmp_path}/d.jsonl#text")) == ["alpha", "beta"]


def test_jsonl_missing_field_names_the_line(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha"}, {"body": "beta"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 has no field 'text'"):
        list(parse_source(f"jsonl:{tmp_path}/d.jsonl#text"))


def test_a_value_that_is_not_text_is_an_error(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": 3}])
    with pytest.raises(ValueError, match="expected text, got int"):
        list(parse_source(f"jsonl:{tmp_path}/d.jsonl#text"))


def test_parquet_yields_the_chosen_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"content": [f"row {i}" for i in range(2500)], "n": list(range(2500))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=1000)
    assert list(parse_source(f"parquet:{tmp_path}/p.parquet#content")) == [f"row {i}" for i in range(2500)]
    with pytest.raises(ValueError, match="no column 'text'"):
        parse_source(f"parquet:{tmp_path}/p.parquet#text")


def test_datasets_saved_to_disk_yield_the_chosen_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).save_to_disk(tmp_path / "ds")
    assert list(parse_source(f"hf-disk:{tmp_path}/ds#text")) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="no column 'body'"):
        parse_source(f"hf-disk:{tmp_path}/ds#body")


def test_dataset_dict_on_disk_is_read_by_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {name: datasets.Dataset.from_dict({"text": [name]}) for name in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dd")
    assert list(parse_source(f"hf-disk:{tmp_path}/dd#text", split="validation")) == ["validation"]
    with pytest.raises(ValueError, match="no split 'test'"):
        parse_source(f"hf-disk:{tmp_path}/dd#text", split="test")


@pytest.mark.parametrize("spec", ["text:{d}/none/*.txt", "jsonl:{d}/none.jsonl#t", "parquet:{d}/none.pq#t"])
def test_missing_files_are_a_clear_error(tmp_path, spec):
    with pytest.raises(FileNotFoundError, match="none"):
        parse_source(spec.format(d=tmp_path))


def test_missing_dataset_directory_is_a_clear_error(tmp_path):
    pytest.importorskip("datasets")
    with pytest.raises(FileNotFoundError, match="no dataset saved"):
        parse_source(f"hf-disk:{tmp_path}/none#text")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ftp://example.org/data", "unknown source scheme"),
        ("no-scheme-here", "unknown source scheme"),
        ("builtin:wikipedia", "unknown built-in source"),
        ("jsonl:/data/d.jsonl", "must name its text field"),
    ],
)
def test_bad_spec_strings_are_a_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_source(spec)


def test_unknown_option_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="does not take option"):
        build_corpus({"source": f"text:{tmp_path}/*.txt", "column": "text"})


def test_mixture_honours_weights_and_is_deterministic_by_seed(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"t": f"a{i}"} for i in range(4000)])
    write_jsonl(tmp_path / "b.jsonl", [{"t": f"b{i}"} for i in range(4000)])
    recipe = [{"source": f"jsonl:{tmp_path}/a.jsonl#t", "weight": 3}, f"jsonl:{tmp_path}/b.jsonl#t"]
    documents = list(build_corpus(recipe, seed=1))
    share_a = Counter(d[0] for d in documents)["a"] / len(documents)
    assert abs(share_a - 0.75) < 0.03, f"share of the weight-3 source {share_a:.3f}, expected 0.75 +- 0.03"
    assert documents == list(build_corpus(recipe, seed=1)), "same seed, same documents"
    assert documents != list(build_corpus(recipe, seed=2))


def test_mixture_ends_when_a_source_runs_out():
    documents = list(Mixture((["x"] * 5, ["y"] * 1000), (1.0, 1.0), seed=0))
    assert documents.count("x") == 5 and documents.count("y") < 100


def test_an_endless_mixture_continues_where_iterating_ends_and_reads_every_source_through():
    small, large = [f"x{i}" for i in range(5)], [f"y{i}" for i in range(1000)]
    inner = Mixture((small, ["z0", "z1"]), (1.0, 1.0), seed=4)  # nested: restarts by its own endless
    mixture = Mixture((inner, large), (1.0, 1.0), seed=0)
    once = list(mixture)
    endless = list(itertools.islice(mixture.endless(), 4000))
    assert endless[: len(once)] == once, "the same draws up to where iterating ends"
    assert set(large) <= set(endless), "the larger source is read through, not cut short every pass"
    share = sum(d.startswith("y") for d in endless) / len(endless)
    assert abs(share - 0.5) < 0.03, f"weights still hold: {share:.3f}"
    first_pass = [d for d in endless if d.startswith("y")][: len(large)]
    assert first_pass == large, "a source is read through before any of it repeats"
    with pytest.raises(ValueError, match="no documents"):
        list(itertools.islice(Mixture(([], ["y"]), (1.0, 1.0), seed=0).endless(), 20))


def test_interleave_takes_turns_and_reads_every_corpus_through():
    assert list(interleave([["a1", "a2", "a3"], [], ["b1"]])) == ["a1", "b1", "a2", "a3"]


def test_mixture_rejects_non_positive_weights():
    with pytest.raises(ValueError, match="positive"):
        Mixture((["x"], ["y"]), (1.0, 0.0))


def test_corpora_can_be_read_again_in_the_same_order(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    corpus = build_corpus([f"jsonl:{tmp_path}/d.jsonl#text", {"source": "builtin:reasoning", "n": 40}])
    assert list(corpus) == list(corpus)


def test_pydocs_reads_docstrings_in_source_order(tmp_path):
    source = """
        '''Module doc.'''
        class A:
            '''Class doc.'''
            def f(self):
                '''Method doc.'''
        if True:
            def g():
                '''Nested doc.'''
    """
    (tmp_path / "mod.py").write_text(textwrap.dedent(source).lstrip(), encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text('"""Left out."""\n', encoding="utf-8")
    expected = ["Module doc.", "Class doc.", "Method doc.", "Nested doc."]
    assert list(PythonDocstrings(str(tmp_path))) == expected
    (tmp_path / "mod.py").write_text('"""Changed."""\n', encoding="utf-8")
    assert list(PythonDocstrings(str(tmp_path))) == expected, "read once per process, then kept"


def test_pydocs_reads_the_standard_library_deterministically():
    first = list(itertools.islice(parse_source("builtin:pydocs"), 50))
    assert len(first) == 50 and all(isinstance(d, str) and d.strip() for d in first)
    assert first == list(itertools.islice(parse_source("builtin:pydocs"), 50))


def test_reasoning_documents_are_worked_train_problems():
    documents = list(build_corpus({"source": "builtin:reasoning", "n": 60, "levels": [4, 5]}))
    assert len(documents) == 60
    problems = generate_problems(60, levels=[4, 5])
    assert documents == [render_document(p) for p in problems]
    for problem, document in zip(problems, documents, strict=True):
        assert problem_split(problem) == "train", "test problems must never leak into pre-training"
        assert "\nAnswer: " in document
    assert documents == list(ReasoningDocs(n=60, levels=(4, 5)))
