"""Document sources for pre-training: local files, Hugging Face datasets on disk, built-ins, mixtures.

A corpus is a re-iterable `Iterable[str]` of documents: iterating again reads it again from the
start, in the same order. Recipes name sources with spec strings:

    text:<glob>               one document per file (or per blank-line-separated paragraph)
    jsonl:<glob>#<field>      one document per line, the string in `field`
    parquet:<glob>#<column>   one document per row, the string in `column`
    hf-disk:<dir>#<column>    a `datasets` dataset saved with `save_to_disk`
    builtin:pydocs            docstrings of the Python standard library (see `builtin.py`)
    builtin:reasoning         worked solutions of the built-in reasoning tasks

Options a spec string cannot carry are keyword arguments of `parse_source`; in a recipe they are
extra keys beside `source` (and `weight` in a mixture), e.g.
`{"source": "text:notes/*.txt", "unit": "paragraph"}` or `{"source": "builtin:reasoning", "n": 5000}`.
Empty documents are skipped; a value that is not text is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbos.data.builtin import PythonDocstrings, ReasoningDocs
from turbos.data.jsonl import read_jsonl

Corpus = Iterable[str]
SourceSpec = str | Mapping[str, Any]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


def _expand(pattern: str) -> list[Path]:
    """Files matching a glob (`**` recurses), sorted; FileNotFoundError when there are none."""
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [path for path in files if path.is_file()]
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}")
    return files


def _text_values(values: Iterable[Any], where: str) -> Iterator[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{where}, row {i}: expected text, got {type(value).__name__}")
        if value.strip():
            yield value


@dataclass(frozen=True)
class TextFiles:
    """UTF-8 text files matching `pattern`; `unit` is "file" or "paragraph" (split at blank lines)."""

    pattern: str
    unit: str = "file"

    def __post_init__(self) -> None:
        if self.unit not in ("file", "paragraph"):
            raise ValueError(f"unit must be 'file' or 'paragraph', got {self.unit!r}")
        _expand(self.pattern)

    def __iter__(self) -> Iterator[str]:
        for path in _expand(self.pattern):
            text = path.read_text(encoding="utf-8")
            pieces = [text] if self.unit == "file" else [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
            yield from (piece for piece in pieces if piece.strip())


@dataclass(frozen=True)
class JsonlField:
    """The string `field` of each JSON object, one per line, in files matching `pattern`."""

    pattern: str
    field: str

    def __post_init__(self) -> None:
        _expand(self.pattern)

    def _values(self, path: Path) -> Iterator[Any]:
        for number, record in read_jsonl(path, "JSONL"):
            if self.field not in record:
                raise ValueError(f"{path}:{number} has no field {self.field!r} (found: {sorted(record)})")
            yield record[self.field]

    def __iter__(self) -> Iterator[str]:
        for path in _expand(self.pattern):
            yield from _text_values(self._values(path), f"{path} field {self.field!r}")


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError("parquet sources need pyarrow: pip install pyarrow") from error
    return pyarrow.parquet


@dataclass(frozen=True)
class ParquetColumn:
    """The string `column` of every row of the Parquet files matching `pattern`, read in batches."""

    pattern: str
    column: str
    batch_size: int = 1024

    def __post_init__(self) -> None:
        parquet = _pyarrow_parquet()
        for path in _expand(self.pattern):
            names = parquet.read_schema(path).names
            if self.column not in names:
                raise ValueError(f"{path} has no column {self.column!r} (columns: {names})")

    def _values(self, path: Path) -> Iterator[Any]:
        batches = _pyarrow_parquet().ParquetFile(path).iter_batches(self.batch_size, columns=[self.column])
        for batch in batches:
            yield from batch.column(0).to_pylist()

    def __iter__(self) -> Iterator[str]:
        for path in _expand(self.pattern):
            yield from _text_values(self._values(path), f"{path} column {self.column!r}")


@dataclass(frozen=True)
class HFDiskColumn:
    """The string `column` of a Hugging Face `datasets` dataset saved with `save_to_disk`.

    For a `DatasetDict`, `split` picks the dataset. Rows are read in batches from the memory-mapped
    Arrow files, so the dataset need not fit in memory.
    """

    path: str
    column: str
    split: str = "train"
    batch_size: int = 1024

    def __post_init__(self) -> None:
        names = self._load().column_names
        if self.column not in names:
            raise ValueError(f"dataset at {self.path} has no column {self.column!r} (columns: {names})")

    def _load(self) -> Any:
        try:
            import datasets
        except ImportError as error:
            raise ImportError("hf-disk sources need the datasets package: pip install datasets") from error
        if not Path(self.path).exists():
            raise FileNotFoundError(f"no dataset saved at {self.path!r}")
        dataset = datasets.load_from_disk(self.path)
        if isinstance(dataset, datasets.DatasetDict):
            if self.split not in dataset:
                raise ValueError(f"dataset at {self.path} has no split {self.split!r} ({list(dataset)})")
            dataset = dataset[self.split]
        return dataset

    def __iter__(self) -> Iterator[str]:
        batches = self._load().select_columns([self.column]).iter(batch_size=self.batch_size)
        values = (value for batch in batches for value in batch[self.column])
        yield from _text_values(values, f"{self.path} column {self.column!r}")


@dataclass(frozen=True)
class Mixture:
    """Documents drawn from `sources` at random in proportion to `weights`, deterministic by `seed`.

    Each document comes from source i with probability weights[i] / sum(weights). Iterating ends
    when any source runs out, so the proportions hold for the whole mixture. A training stream
    that repeats reads `endless()` instead, so that the sources it has not read through yet are
    not cut short at every pass.
    """

    sources: tuple[Corpus, ...]
    weights: tuple[float, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.sources or len(self.sources) != len(self.weights):
            raise ValueError(
                f"a mixture needs one weight per source, got {len(self.weights)} weights "
                f"for {len(self.sources)} sources"
            )
        if any(weight <= 0 for weight in self.weights):
            raise ValueError(f"mixture weights must be positive, got {self.weights}")

    def __iter__(self) -> Iterator[str]:
        rng = random.Random(self.seed)
        streams = [iter(source) for source in self.sources]
        indices = range(len(streams))
        while True:
            (i,) = rng.choices(indices, self.weights)
            document = next(streams[i], None)
            if document is None:
                return
            yield document

    def endless(self) -> Iterator[str]:
        """The same draws forever: a source that runs out starts its next pass instead of ending
        the mixture. Up to where iterating ends, the same documents in the same order; after it,
        each source keeps its share and is read through before any of it repeats."""
        rng = random.Random(self.seed)
        streams = [_passes(source) for source in self.sources]
        indices = range(len(streams))
        while True:
            (i,) = rng.choices(indices, self.weights)
            yield next(streams[i])


def _passes(corpus: Corpus) -> Iterator[str]:
    """A corpus read again and again (a mixture by its ``endless``); ValueError if it is empty."""
    if isinstance(corpus, Mixture):
        yield from corpus.endless()
        return
    while True:
        empty = True
        for document in corpus:
            empty = False
            yield document
        if empty:
            raise ValueError(f"a mixture source has no documents: {corpus!r}")


def interleave(corpora: Sequence[Corpus]) -> Iterator[str]:
    """Every document of every corpus, taking turns while several have documents left (a
    tokenizer sees all of each source, and a cap on the count takes from all of them)."""
    streams = [iter(corpus) for corpus in corpora]
    while streams:
        for stream in list(streams):
            document = next(stream, None)
            if document is None:
                streams.remove(stream)
            else:
                yield document


FILE_SOURCES: dict[str, type] = {"jsonl": JsonlField, "parquet": ParquetColumn, "hf-disk": HFDiskColumn}
BUILTIN_SOURCES: dict[str, type] = {"pydocs": PythonDocstrings, "reasoning": ReasoningDocs}
SCHEMES = ("text", *FILE_SOURCES, "builtin")


def _construct(cls: type, spec: str, *args: Any, **options: Any) -> Corpus:
    allowed = [f.name for f in dataclasses.fields(cls)][len(args) :]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"source {spec!r} does not take option(s) {unknown}; it takes {allowed}")
    return cls(*args, **options)


def parse_source(spec: str, **options: Any) -> Corpus:
    """The corpus a spec string names (see the module docstring); `options` go to its constructor."""
    scheme, colon, rest = spec.partition(":")
    if not colon or scheme not in SCHEMES:
        raise ValueError(f"unknown source scheme in {spec!r}; expected <scheme>:..., scheme one of {SCHEMES}")
    if scheme == "builtin":
        if rest not in BUILTIN_SOURCES:
            raise ValueError(f"unknown built-in source {rest!r}; known: {sorted(BUILTIN_SOURCES)}")
        return _construct(BUILTIN_SOURCES[rest], spec, **options)
    if scheme == "text":
        return _construct(TextFiles, spec, rest, **options)
    location, hash_sign, field = rest.rpartition("#")
    if not hash_sign or not location or not field:
        raise ValueError(f"source {spec!r} must name its text field: {scheme}:<path>#<field>")
    return _construct(FILE_SOURCES[scheme], spec, location, field, **options)


def _source_and_weight(entry: SourceSpec) -> tuple[Corpus, float]:
    if isinstance(entry, str):
        return parse_source(entry), 1.0
    options = dict(entry)
    if "source" not in options:
        raise ValueError(f"source entry {entry!r} has no 'source' key")
    source, weight = options.pop("source"), float(options.pop("weight", 1.0))
    return parse_source(source, **options), weight


def build_corpus(spec: SourceSpec | Sequence[SourceSpec], *, seed: int = 0) -> Corpus:
    """A corpus from a recipe entry: a spec string, a {source, options...} mapping, or a mixture.

    A mixture is a list of spec strings or {source, weight, options...} mappings (weight 1 when
    left out), mixed by `Mixture` with `seed`.
    """
    if isinstance(spec, (str, Mapping)):
        return _source_and_weight(spec)[0]
    entries = [_source_and_weight(entry) for entry in spec]
    if not entries:
        raise ValueError("a mixture needs at least one source")
    sources, weights = zip(*entries, strict=True)
    return Mixture(tuple(sources), tuple(weights), seed)
