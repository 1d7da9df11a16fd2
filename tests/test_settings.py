"""The typed settings parser: types, declared ranges, dotted error paths and key=value overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from turbos.config import ConfigError
from turbos.settings import SettingsError, apply_overrides, check_settings, parse_settings, read_yaml, setting


@dataclass
class Part:
    name: str
    weight: float = setting(1.0, gt=0)


@dataclass
class Machine:
    part: Part = field(default_factory=lambda: Part("main"))
    parts: list[Part] = field(default_factory=list)
    pair: tuple[float, float] = setting((0.5, 0.5), ge=0, lt=1)
    tags: tuple[str, ...] = setting(("x",), nonempty=True)
    mode: Literal["fast", "slow"] = "fast"
    count: int = setting(1, ge=1)
    rate: float = 0.1
    flag: bool = False
    limit: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checked:
    """Checks itself when constructed, as SFTRecipe and DemoSettings do."""

    count: int = setting(1, ge=1)
    part: Part = field(default_factory=lambda: Part("main"))

    def __post_init__(self) -> None:
        check_settings(self, "checked")


def parse(text: str) -> Machine:
    return parse_settings(Machine, yaml.safe_load(text))


def test_numbers_yaml_reads_as_text_are_numbers() -> None:
    machine = parse("rate: 1e-4\ncount: '3'\npair: [3.0e-1, 5e-1]")
    assert isinstance(yaml.safe_load("rate: 1e-4")["rate"], str), "YAML 1.1 reads 1e-4 (no dot) as text"
    assert (machine.rate, machine.count, machine.pair) == (1e-4, 3, (0.3, 0.5))


def test_an_int_is_a_float_and_a_whole_float_an_int() -> None:
    machine = parse("rate: 2\ncount: 4.0")
    assert machine.rate == 2.0 and type(machine.rate) is float
    assert machine.count == 4 and type(machine.count) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("count: true", "count: expected int, got True"),
        ("rate: false", "rate: expected float, got False"),
        ("flag: 1", "flag: expected true or false, got 1"),
        ("count: 2.5", "count: expected int, got 2.5"),
        ("rate: fast", "rate: expected float, got 'fast'"),
        ("rate: .nan", "rate: expected a finite float, got nan"),
        ("mode: medium", "mode: expected one of ['fast', 'slow'], got 'medium'"),
        ("pair: [0.5]", "pair: expected a list of 2 values, got [0.5]"),
        ("tags: [a, 3]", "tags[1]: expected a string, got 3"),
        ("parts: {name: a}", "parts: expected a list, got {'name': 'a'}"),
        ("part: [a]", "part: expected a mapping, got ['a']"),
        ("limit: lots", "limit: expected int, got 'lots'"),
        ("notes: [a]", "notes: expected a mapping, got ['a']"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key_and_the_expected_type(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{re.escape(message)}$"):
        parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("count: 0", "count must be >= 1, got 0"),
        ("pair: [0.5, 1]", "pair[1] must be in [0, 1), got 1.0"),
        ("tags: []", "tags must not be empty"),
        ("parts: [{name: a}, {name: b, weight: 0}]", "parts[1].weight must be > 0, got 0.0"),
        ("part: {name: a, weight: -1}", "part.weight must be > 0, got -1.0"),
    ],
)
def test_a_value_out_of_its_declared_range_names_its_key_and_the_range(text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{re.escape(message)}$"):
        parse(text)


def test_nested_dataclasses_lists_of_them_and_optionals_are_built() -> None:
    machine = parse("part: {name: a}\nparts: [{name: b, weight: 2}]\nlimit: null\ntags: [p, q]")
    assert machine.part == Part("a") and machine.parts == [Part("b", 2.0)]
    assert machine.limit is None and machine.tags == ("p", "q"), "a YAML list becomes the tuple"


def test_an_unknown_key_is_named_with_its_path_and_the_valid_keys() -> None:
    with pytest.raises(
        SettingsError, match=r"^unknown key 'part\.nmae'; valid keys in 'part': \['name', 'weight'\]$"
    ):
        parse("part: {nmae: a}")
    with pytest.raises(SettingsError, match=r"^unknown key 'parts\[0\]\.wieght'; valid keys in 'parts\[0\]'"):
        parse("parts: [{name: a, wieght: 2}]")
    with pytest.raises(SettingsError, match=r"^unknown key 'cuont'; valid keys: \['part', 'parts', 'pair'"):
        parse("cuont: 2")


def test_a_missing_required_key_is_named_with_its_path() -> None:
    with pytest.raises(SettingsError, match=r"^missing key 'parts\[0\]\.name'$"):
        parse("parts: [{weight: 2}]")


def test_what_starts_every_message_and_settings_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^machine: count must be >= 1, got 0$"):
        parse_settings(Machine, {"count": 0}, "machine")
    with pytest.raises(SettingsError, match=r"^machine: expected a mapping, got \[1\]$"):
        parse_settings(Machine, [1], "machine")
    assert parse_settings(Machine, None) == Machine(), "no mapping at all (an empty YAML file): the defaults"


def test_a_class_that_checks_itself_is_checked_when_built_directly_or_parsed() -> None:
    built = Checked(count="2", part={"name": "a", "weight": "1e-1"})
    assert built == Checked(2, Part("a", 0.1)), "a mapping becomes the nested dataclass, text a number"
    with pytest.raises(SettingsError, match=r"^checked: part\.weight must be > 0, got -1\.0$"):
        Checked(part=Part("a", -1))
    with pytest.raises(SettingsError, match=r"^checked: count must be >= 1, got 0$"):
        parse_settings(Checked, {"count": 0}, "checked")  # named once, not "checked: checked: ..."


def test_overrides_set_nested_keys_and_list_items_with_yaml_values() -> None:
    raw = {"part": {"name": "a"}, "parts": [{"name": "b"}]}
    apply_overrides(raw, ["part.weight=2", "parts.0.weight=1e-3", "tags=[p, q]", "limit=null", "notes.k=v"])
    machine = parse_settings(Machine, raw)
    assert (machine.part.weight, machine.parts[0].weight, machine.tags) == (2.0, 1e-3, ("p", "q"))
    assert machine.limit is None and machine.notes == {"k": "v"}, "a missing section is created"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("count", r"override 'count' must look like key=value"),
        ("=3", r"override '=3' must look like key=value"),
        ("parts.5.weight=1", r"'parts\.5' needs an index below 1"),
        ("parts.x.weight=1", r"'parts\.x' needs an index below 1"),
        ("count.value=1", r"'count' is not a section"),
    ],
)
def test_malformed_overrides_are_refused(override: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        apply_overrides({"count": 1, "parts": [{"name": "b"}]}, [override])


def test_read_yaml_names_the_file_when_it_is_missing_or_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no machine file '.*nope\.yaml'"):
        read_yaml(tmp_path / "nope.yaml", "machine")
    path = tmp_path / "bad.yaml"
    path.write_text("count: [1\n")
    with pytest.raises(SettingsError, match=r"bad\.yaml is not valid YAML"):
        read_yaml(path, "machine")
    path.write_text("")
    assert read_yaml(path, "machine") == {}, "an empty file holds no settings"
