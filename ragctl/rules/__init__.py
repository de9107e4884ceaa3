"""Rules: YAML data that maps a query Profile to a pruned ConfigSpace (RAGServe/METIS
Algorithm 1). `schema` owns the file format, `loader` reading it with located errors,
`evaluate` the pure mapping (`ragctl rules` is `ragctl/cli/rules.py`)."""

from ragctl.rules.evaluate import (
    default_space,
    evaluate,
    fast_corner,
    fields_read,
    intermediate_values,
    merge_spaces,
    span_spaces,
)
from ragctl.rules.loader import default_rules_path, load_rules, parse_rules
from ragctl.rules.schema import (
    FixedSpace,
    Limits,
    PerPiece,
    PiecesBound,
    Rule,
    RuleSet,
    Then,
    When,
)

__all__ = [
    "FixedSpace",
    "Limits",
    "PerPiece",
    "PiecesBound",
    "Rule",
    "RuleSet",
    "Then",
    "When",
    "default_rules_path",
    "default_space",
    "evaluate",
    "fields_read",
    "intermediate_values",
    "load_rules",
    "merge_spaces",
    "fast_corner",
    "span_spaces",
    "parse_rules",
]
