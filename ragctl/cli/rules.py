"""`ragctl rules validate | ls`: check a rules file, or show what it does. Errors are RulesError,
which `main` prints as one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ragctl.cli.common import out, print_json
from ragctl.rules.evaluate import default_space
from ragctl.rules.loader import default_rules_path, load_rules
from ragctl.rules.schema import PerPiece, Rule, RuleSet

app = typer.Typer(
    help="Rules: YAML that maps a query profile to a pruned configuration space.",
    no_args_is_help=True,
)


@app.command()
def validate(
    file: Path | None = typer.Argument(
        None, help="Rules file to check (default: the packaged default.yaml)."
    ),
) -> None:
    """Check a rules file against the schema; print `FILE: ok, N rules` or the first problem."""
    path = file or default_rules_path()
    rules = load_rules(path)
    n = len(rules.rules)
    print(f"{path}: ok, {n} rule{'' if n == 1 else 's'}")


@app.command("ls")
def ls(
    file: Path | None = typer.Option(
        None, "--file", "-f", help="Rules file (default: the packaged default.yaml)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the rules as one JSON object."),
) -> None:
    """Show each rule (condition, space, profile fields it reads), the default space and the
    limits."""
    path = file or default_rules_path()
    rules = load_rules(path)
    if json_out:
        data = rules.model_dump(mode="json")
        data["fields_read"] = list(rules.fields_read)
        data["max_num_chunks"] = rules.max_num_chunks
        print_json(data)
        return
    out.print(_table(rules, str(path)))
    d = default_space(rules)
    ilens = ", ".join(map(str, d.intermediate_lengths)) or "-"
    out.print(
        f"default space  {', '.join(d.methods)}; num_chunks {d.num_chunks[0]}-{d.num_chunks[1]}; "
        f"intermediate_length {ilens}  (no trusted profile and no history, or no rule matches)"
    )
    lim = rules.limits
    out.print(
        f"limits         max_chunks {lim.max_chunks}; intermediate_values "
        f"{lim.intermediate_values}; retrieve up to {rules.max_num_chunks} chunks"
    )


def _table(rules: RuleSet, title: str) -> Table:
    about = f"{rules.name}: {rules.description}" if rules.description else rules.name
    table = Table(
        title=f"{title} ({about})" if about else title,
        title_justify="left",
        caption="first match wins; n = the profile's pieces",
        caption_justify="left",
    )
    table.add_column("rule", no_wrap=True)
    table.add_column("when", overflow="fold")
    table.add_column("methods", overflow="fold")
    table.add_column("num_chunks", no_wrap=True)
    table.add_column("intermediate_length", overflow="fold")
    table.add_column("profile fields read", overflow="fold")
    for rule in rules.rules:
        table.add_row(
            rule.name,
            rule.when.describe().replace(", ", "\n"),
            "\n".join(rule.then.methods),
            _num_chunks(rule),
            _intermediate(rule),
            "\n".join(rule.fields_read) or "-",
        )
    return table


def _num_chunks(rule: Rule) -> str:
    nc = rule.then.num_chunks
    if isinstance(nc, PerPiece):
        a, b = nc.per_piece
        return f"{_times(a)}-{_times(b)}"
    return f"{nc[0]}-{nc[1]}"


def _intermediate(rule: Rule) -> str:
    il = rule.then.intermediate_length
    if il is None:
        return "-"
    if isinstance(il, str):
        return "summary_length"
    return f"{il[0]}-{il[1]}"


def _times(k: int) -> str:
    return "n" if k == 1 else f"{k}n"
