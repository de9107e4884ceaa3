"""Rules: the packaged Algorithm 1, evaluation, merging, and located errors for bad files."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ragctl.cli.rules import app as rules_app
from ragctl.errors import RulesError, UserError
from ragctl.rules import (
    RuleSet,
    default_rules_path,
    default_space,
    evaluate,
    fast_corner,
    fields_read,
    intermediate_values,
    load_rules,
    merge_spaces,
    parse_rules,
    span_spaces,
)
from ragctl.types import SUMMARY_RANGE, Config, ConfigSpace, Profile

DEFAULT = load_rules()
DEFAULT_TEXT = default_rules_path().read_text()

PROFILES = [
    Profile(c, j, n, (40, 120))
    for c, j, n in itertools.product(("high", "low"), (True, False), range(1, 11))
]


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """\
version: 1
name: test
limits: {max_chunks: 30}
rules:
  - name: single-fact
    when: {joint_reasoning: false}
    then:
      methods: [map_rerank]
      num_chunks: {per_piece: [1, 3]}
  - name: joint
    when: {joint_reasoning: true}
    then:
      methods: [stuff, map_reduce]
      num_chunks: [2, 8]
      intermediate_length: from_summary_length
default_space:
  methods: [stuff, map_reduce]
  num_chunks: [3, 9]
  intermediate_length: [50, 100]
"""


# -- the packaged default: Algorithm 1 -----------------------------------------------------


@pytest.mark.parametrize(
    "profile", PROFILES, ids=lambda p: f"{p.complexity}-{p.joint_reasoning}-{p.pieces}"
)
def test_default_rules_are_algorithm_1(profile: Profile) -> None:
    space = evaluate(DEFAULT, profile)
    n = profile.pieces
    assert space.num_chunks == (n, 3 * n)
    if not profile.joint_reasoning:
        assert (space.methods, space.source) == (("map_rerank",), "single-fact")
        assert space.intermediate_lengths == ()
    elif profile.complexity == "low":
        assert (space.methods, space.source) == (("stuff",), "joint-simple")
        assert space.intermediate_lengths == ()
    else:
        assert (space.methods, space.source) == (("stuff", "map_reduce"), "joint-complex")
        assert space.intermediate_lengths == (40, 80, 120)


def test_default_rules_read_every_profile_field_and_retrieve_30_chunks() -> None:
    assert DEFAULT.fields_read == ("complexity", "joint_reasoning", "pieces", "summary_length")
    assert [fields_read(r) for r in DEFAULT.rules] == [
        ("joint_reasoning", "pieces"),
        ("complexity", "joint_reasoning", "pieces"),
        ("complexity", "joint_reasoning", "pieces", "summary_length"),
    ]
    assert DEFAULT.max_num_chunks == 30  # 3 * 10 pieces, the limit


def test_default_space_is_the_documented_conservative_one() -> None:
    space = default_space(DEFAULT)
    assert space == ConfigSpace(("stuff", "map_reduce"), (3, 9), (50, 75, 100), "default")


def test_summary_range_gives_lo_mid_hi_deduplicated() -> None:
    joint_complex = dict(complexity="high", joint_reasoning=True, pieces=2)
    assert evaluate(
        DEFAULT, Profile(**joint_complex, summary_length=(30, 200))
    ).intermediate_lengths == (30, 115, 200)
    assert evaluate(
        DEFAULT, Profile(**joint_complex, summary_length=(50, 51))
    ).intermediate_lengths == (50, 51)
    assert evaluate(
        DEFAULT, Profile(**joint_complex, summary_length=(60, 60))
    ).intermediate_lengths == (60,)
    assert intermediate_values(50, 100, 1) == (75,)
    assert intermediate_values(50, 100, 5) == (50, 63, 75, 88, 100)  # 62.5 rounds half up


# -- evaluation of other rule sets -----------------------------------------------------------


def test_per_piece_ranges_are_clipped_to_max_chunks() -> None:
    rules = parse_rules(BASE.replace("max_chunks: 30", "max_chunks: 12"))
    got = {n: evaluate(rules, Profile("low", False, n, (30, 30))).num_chunks for n in range(1, 11)}
    assert got[1] == (1, 3) and got[4] == (4, 12) and got[5] == (5, 12)
    assert got[10] == (10, 12)
    rules = parse_rules(
        BASE.replace("max_chunks: 30", "max_chunks: 5")
        .replace("[3, 9]", "[3, 5]")
        .replace("[2, 8]", "[2, 5]")
    )
    assert evaluate(rules, Profile("low", False, 7, (30, 30))).num_chunks == (
        5,
        5,
    )  # low clipped too
    assert rules.max_num_chunks == 5


def test_fixed_ranges_ignore_pieces() -> None:
    rules = parse_rules(BASE)
    for n in (1, 5, 10):
        space = evaluate(rules, Profile("low", True, n, (30, 90)))
        assert space == ConfigSpace(("stuff", "map_reduce"), (2, 8), (30, 60, 90), "joint")
    assert fields_read(rules.rules[1]) == ("joint_reasoning", "summary_length")


def test_first_match_wins_and_pieces_bounds() -> None:
    text = BASE.replace(
        "  - name: single-fact\n",
        "  - name: many-pieces\n"
        "    when: {joint_reasoning: false, pieces: {min: 6}}\n"
        "    then: {methods: [stuff], num_chunks: [20, 25]}\n"
        "  - name: single-fact\n",
    )
    rules = parse_rules(text)
    assert evaluate(rules, Profile("low", False, 5, (30, 30))).source == "single-fact"
    assert evaluate(rules, Profile("low", False, 6, (30, 30))).source == "many-pieces"
    assert evaluate(rules, Profile("low", False, 6, (30, 30))).num_chunks == (20, 25)
    assert rules.max_num_chunks == 30  # single-fact: 3 * 10 pieces
    assert fields_read(rules.rules[0]) == ("joint_reasoning", "pieces")


def test_no_matching_rule_falls_back_to_the_default_space() -> None:
    rules = parse_rules(
        BASE.replace(
            "when: {joint_reasoning: true}", "when: {joint_reasoning: true, complexity: high}"
        )
    )
    space = evaluate(rules, Profile("low", True, 4, (30, 200)))
    assert space.source == "default" and space == default_space(rules)
    assert evaluate(rules, Profile("high", True, 4, (30, 200))).source == "joint"


def test_a_rule_without_when_matches_everything() -> None:
    text = BASE.split("rules:")[0] + (
        "rules:\n  - name: all\n    then: {methods: [stuff], num_chunks: {per_piece: [2, 2]}}\n"
        + BASE.split("  intermediate_length: from_summary_length\n")[1]
    )
    rules = parse_rules(text)
    assert {evaluate(rules, p).source for p in PROFILES} == {"all"}
    assert evaluate(rules, Profile("high", True, 7, (30, 30))).num_chunks == (14, 14)
    assert fields_read(rules.rules[0]) == ("pieces",)


@given(
    complexity=st.sampled_from(["high", "low"]),
    joint=st.booleans(),
    pieces=st.integers(1, 10),
    summary=st.tuples(st.integers(30, 200), st.integers(30, 200)).map(lambda t: tuple(sorted(t))),
    max_chunks=st.integers(1, 40),
)
@settings(max_examples=300, deadline=None)
def test_every_profile_gives_a_valid_space_within_limits(
    complexity: str, joint: bool, pieces: int, summary: tuple[int, int], max_chunks: int
) -> None:
    text = DEFAULT_TEXT.replace("max_chunks: 30", f"max_chunks: {max_chunks}").replace(
        "num_chunks: [3, 9]", f"num_chunks: [1, {min(9, max_chunks)}]"
    )
    rules = parse_rules(text)
    profile = Profile(complexity, joint, pieces, summary)  # type: ignore[arg-type]
    space = evaluate(rules, profile)
    configs = space.configs()
    assert configs
    lo, hi = space.num_chunks
    assert 1 <= lo <= hi <= max_chunks
    for c in configs:
        assert 1 <= c.num_chunks <= max_chunks
        if c.method == "map_reduce":
            assert summary[0] <= c.intermediate_length <= summary[1]
        else:
            assert c.intermediate_length is None
    if not joint:
        assert {c.method for c in configs} == {"map_rerank"}


# -- merge_spaces ----------------------------------------------------------------------------


def test_merge_spaces_unions_methods_and_takes_median_ranges() -> None:
    spaces = [
        ConfigSpace(("stuff",), (2, 6), (), "a"),
        ConfigSpace(("map_reduce", "stuff"), (4, 12), (100, 50), "b"),
        ConfigSpace(("map_rerank",), (3, 9), (), "c"),
    ]
    merged = merge_spaces(spaces)
    assert merged == ConfigSpace(
        ("map_rerank", "stuff", "map_reduce"), (3, 9), (50, 100), "history"
    )


def test_merge_spaces_rounds_half_up_and_skips_lengths_without_map_reduce() -> None:
    spaces = [ConfigSpace(("stuff",), (1, 4), (), "a"), ConfigSpace(("stuff",), (4, 7), (), "b")]
    assert merge_spaces(spaces) == ConfigSpace(("stuff",), (3, 6), (), "history")  # 2.5, 5.5
    one = ConfigSpace(("stuff", "map_reduce"), (2, 2), (40, 80), "x")
    assert merge_spaces([one]) == ConfigSpace(("stuff", "map_reduce"), (2, 2), (40, 80), "history")
    with pytest.raises(ValueError):
        merge_spaces([])


def test_span_spaces_holds_every_space() -> None:
    box = ConfigSpace(("stuff", "map_reduce"), (3, 9), (50, 100), "default")
    labels = ConfigSpace(("map_rerank", "stuff"), (1, 2), (), "labels")
    both = span_spaces([box, labels], "default+labels")
    assert both == ConfigSpace(
        ("map_rerank", "stuff", "map_reduce"), (1, 9), (50, 100), "default+labels"
    )
    assert set(box.configs()) | set(labels.configs()) <= set(both.configs())
    assert span_spaces([labels], "x") == ConfigSpace(("map_rerank", "stuff"), (1, 2), (), "x")
    with pytest.raises(ValueError):
        span_spaces([], "x")


def test_fast_corner_undercuts_every_space_the_rules_can_give() -> None:
    corner = fast_corner(DEFAULT)
    assert corner == (
        Config("map_rerank", 1), Config("stuff", 1), Config("map_reduce", 1, SUMMARY_RANGE[0])
    )
    fixed = parse_rules(
        """
version: 1
limits: {max_chunks: 20, intermediate_values: 1}
rules:
  - name: wide
    when: {complexity: high}
    then: {methods: [map_reduce], num_chunks: [4, 8], intermediate_length: [60, 90]}
default_space: {methods: [stuff, map_reduce], num_chunks: [6, 9], intermediate_length: [40, 50]}
"""
    )
    # One summary budget per range: its midpoint (75 and 45), and the least of both is kept.
    assert fast_corner(fixed) == (Config("stuff", 6), Config("map_reduce", 4, 45))
    summaries = [(SUMMARY_RANGE[0],) * 2, (40, 120), (SUMMARY_RANGE[1],) * 2]
    for rules in (DEFAULT, fixed):
        least = {c.method: c for c in fast_corner(rules)}
        for p, s in itertools.product(PROFILES, summaries):
            space = evaluate(rules, Profile(p.complexity, p.joint_reasoning, p.pieces, s))
            for c in space.configs():
                low = least[c.method]
                assert c.num_chunks >= low.num_chunks
                assert (c.intermediate_length or 0) >= (low.intermediate_length or 0)


# -- errors, located in the file -------------------------------------------------------------


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(RulesError) as info:
        load_rules(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{path}:")
    assert isinstance(info.value, UserError)
    return msg[len(str(path)) :]


def test_typo_key_names_line_column_and_a_suggestion(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path, BASE.replace("      methods: [map_rerank]", "      methds: [map_rerank]")
    )
    assert msg == ":8:7: rules[0].then.methds: extra field not permitted (did you mean 'methods'?)"
    msg = error_of(tmp_path, BASE + "defaults: {}\n")
    assert msg.startswith(":20:1: defaults: extra field not permitted")


def test_unknown_method_points_at_the_list_item(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        BASE.replace(
            "methods: [stuff, map_reduce]\n      num", "methods: [stuff, mapreduce]\n      num"
        ),
    )
    assert msg.startswith(":13:24: rules[1].then.methods[1]: ")
    assert "'mapreduce'" in msg and "'map_reduce'" in msg


def test_reversed_ranges(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("num_chunks: [2, 8]", "num_chunks: [8, 2]"))
    assert msg == ":14:7: rules[1].then.num_chunks: range [8, 2] is reversed: write [low, high]"
    msg = error_of(tmp_path, BASE.replace("per_piece: [1, 3]", "per_piece: [3, 1]"))
    assert msg.startswith(":9:20: rules[0].then.num_chunks.per_piece: range [3, 1] is reversed")
    msg = error_of(tmp_path, BASE.replace("[50, 100]", "[100, 50]"))
    assert msg.startswith(":19:3: default_space.intermediate_length: range [100, 50]")


def test_non_positive_and_mistyped_values(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("num_chunks: [3, 9]", "num_chunks: [0, 9]"))
    assert msg.startswith(":18:16: default_space.num_chunks[0]: input should be greater than")
    msg = error_of(tmp_path, BASE.replace("{joint_reasoning: false}", "{joint_reasoning: 'no'}"))
    assert msg.startswith(":6:12: rules[0].when.joint_reasoning: ") and "'no'" in msg
    msg = error_of(tmp_path, BASE.replace("num_chunks: [2, 8]", "num_chunks: 5"))
    assert msg.startswith(":14:7: rules[1].then.num_chunks: expected a range")


def test_map_reduce_needs_an_intermediate_length_and_only_it(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("      intermediate_length: from_summary_length\n", ""))
    # The field is absent: the message points at its parent, `then:`.
    assert (
        msg == ":12:5: rules[1].then.intermediate_length: map_reduce needs an intermediate_length"
    )
    msg = error_of(
        tmp_path,
        BASE.replace("methods: [stuff, map_reduce]\n      num", "methods: [stuff]\n      num"),
    )
    assert msg.startswith(":15:7: rules[1].then.intermediate_length: applies to map_reduce only")


def test_cross_rule_checks(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("name: joint", "name: single-fact"))
    assert msg == ":10:5: rules[1].name: 'single-fact' is also rules[0]"
    msg = error_of(
        tmp_path, BASE.replace("when: {joint_reasoning: true}", "when: {joint_reasoning: false}")
    )
    assert msg.startswith(":11:5: rules[1].when: never matches")
    msg = error_of(tmp_path, BASE.replace("num_chunks: [2, 8]", "num_chunks: [31, 40]"))
    assert msg.startswith(
        ":14:7: rules[1].then.num_chunks: num_chunks low 31 is above limits.max_chunks"
    )
    msg = error_of(
        tmp_path,
        BASE.replace(
            "{joint_reasoning: false}", "{joint_reasoning: false, pieces: {min: 5, max: 2}}"
        ),
    )
    assert msg == ":6:36: rules[0].when.pieces: min 5 is above max 2"


def test_yaml_problems(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path, BASE.replace("  - name: joint\n", "  - name: joint\n   bad indent: 1\n")
    )
    assert msg.startswith(":11:4: YAML syntax error: ")
    msg = error_of(tmp_path, BASE.replace("limits: {max_chunks: 30}", "limits: {max_chunks: 30"))
    assert re.match(r":4:\d+: YAML syntax error: ", msg)
    msg = error_of(
        tmp_path,
        BASE.replace(
            "    then:\n      methods: [map_rerank]",
            "    then:\n      methods: [map_rerank]\n      methods: [stuff]",
        ),
    )
    assert msg == ":9:7: duplicate key 'methods'"
    assert error_of(tmp_path, "- a\n- b\n") == ":1:1: the top level must be a mapping, not a list"
    assert error_of(tmp_path, "\n\n# only a comment\n").startswith(": empty file")
    assert error_of(tmp_path, BASE.replace("version: 1", "version: 2")).startswith(
        ":1:1: version: input should be 1"
    )


def test_empty_when_matches_and_non_string_keys_are_refused(tmp_path: Path) -> None:
    rules = parse_rules(BASE.replace("when: {joint_reasoning: true}", "when:"))
    assert evaluate(rules, Profile("high", True, 2, (30, 30))).source == "joint"
    text = BASE.replace(
        "    then:\n      methods: [map_rerank]",
        "    then:\n      on: 1\n      methods: [map_rerank]",
    )
    msg = error_of(tmp_path, text)
    assert msg.startswith(":7:5: rules[0].then: a key reads as True, not a string")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"^\S*nope\.yaml: no such rules file$"):
        load_rules(tmp_path / "nope.yaml")


def test_loaded_rules_are_a_ruleset_and_valid_python_data_is_checked_too() -> None:
    rules = parse_rules(BASE)
    assert isinstance(rules, RuleSet) and [r.name for r in rules.rules] == ["single-fact", "joint"]
    data = rules.model_dump(mode="json")
    assert RuleSet.model_validate(data) == rules
    data["rules"][1]["name"] = "single-fact"
    with pytest.raises(RulesError, match=r"^rules\[1\]\.name: 'single-fact' is also rules\[0\]$"):
        RuleSet.model_validate(data)


# -- CLI -------------------------------------------------------------------------------------


def test_cli_validate_and_ls(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(rules_app, ["validate"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{default_rules_path()}: ok, 3 rules"
    path = write(tmp_path, BASE)
    result = runner.invoke(rules_app, ["validate", str(path)])
    assert result.output.strip() == f"{path}: ok, 2 rules"
    result = runner.invoke(rules_app, ["ls", "--file", str(path)], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for text in (
        "single-fact",
        "joint_reasoning=false",
        "map_rerank",
        "n-3n",
        "2-8",
        "summary_length",
        "default space",
        "max_chunks 30",
    ):
        assert text in result.output
    result = runner.invoke(rules_app, ["ls", "--json"])
    assert (
        '"fields_read": ["complexity", "joint_reasoning", "pieces", "summary_length"]'
        in result.output
    )


def test_cli_validate_lets_the_located_error_through(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("methods: [map_rerank]", "methods: [rerank]"))
    result = CliRunner().invoke(rules_app, ["validate", str(path)])
    assert isinstance(result.exception, RulesError)
    assert str(result.exception).startswith(f"{path}:8:17: rules[0].then.methods[0]: ")
