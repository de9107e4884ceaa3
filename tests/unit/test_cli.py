"""The CLI's global options come from Settings, and a bad setting is one line and exit 2 before
anything starts (no engine in these tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragctl.cli import app, main
from ragctl.cli.common import settings_flags
from ragctl.errors import InvalidSetting, UserError
from ragctl.settings import Settings


def test_documented_flags_exist_and_rules_keeps_its_name() -> None:
    flags = settings_flags()
    documented = """--model --engine-url --data-dir --cache-dir --kv-cache-gib --kv-cache-blocks
        --max-model-len --embedder --answer-max-tokens --profiler-url --profiler-model
        --profiler-api-key --golden-every""".split()
    assert set(documented) <= set(flags.values())
    assert flags["rules_file"] == "--rules"
    assert "--dtype" not in flags.values()  # not a CLI flag today


def test_global_options_reach_the_settings(tmp_path: Path) -> None:
    # The group callback builds the Settings before the subcommand's --help exits.
    args = ["--rules", str(tmp_path / "r.yaml"), "--data-dir", str(tmp_path), "model", "--help"]
    ok = CliRunner().invoke(app, ["--kv-cache-blocks", "7", *args])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["--kv-cache-blocks", "0", *args])
    assert isinstance(bad.exception, InvalidSetting)
    help_text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "--kv-cache-blocks" in help_text and "memory-pressure" in help_text


def test_with_overrides_validates() -> None:
    s = Settings()
    assert s.with_overrides(kv_cache_blocks=3, model=None).kv_cache_blocks == 3
    assert s.with_overrides() is s
    with pytest.raises(InvalidSetting, match=r"^invalid setting kv_cache_blocks: .*1"):
        s.with_overrides(kv_cache_blocks=0)
    with pytest.raises(InvalidSetting, match="unknown setting no_such_field"):
        s.with_overrides(no_such_field=1)
    assert issubclass(InvalidSetting, UserError)


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAGCTL_GOLDEN_EVERY", "7")
    s = Settings()
    assert s.with_overrides(golden_every=2).golden_every == 2
    assert s.with_overrides(answer_max_tokens=9).golden_every == 7


def test_bad_flag_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--kv-cache-blocks", "0", "index", "--dataset", "squad"])
    assert exit_.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting kv_cache_blocks")


def test_bad_environment_value_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RAGCTL_KV_CACHE_BLOCKS", "0")
    with pytest.raises(SystemExit) as exit_:
        main(["index"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith("error: invalid setting kv_cache_blocks")
