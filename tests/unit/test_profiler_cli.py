"""`ragctl profiler status` and the settings behind it (no engine): the state's per-field
figures as a table or JSON, the model the state is filed under, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragctl.cli import app
from ragctl.errors import InvalidSetting
from ragctl.settings import Settings, model_key
from ragctl.types import Config
from tests.unit.test_profiler_auto import _train


def test_model_key_is_the_last_path_component() -> None:
    assert model_key("/srv/models/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert model_key("HuggingFaceTB/SmolLM2-135M-Instruct/") == "SmolLM2-135M-Instruct"
    assert model_key("qwen2.5") == "qwen2.5"


def test_profiler_model_key_follows_where_the_profiler_runs() -> None:
    s = Settings()
    assert s.profiler_model_key() == "SmolLM2-135M-Instruct"  # the embedded default, in process
    assert s.with_overrides(model="org/Big-7B").profiler_model_key() == "Big-7B"
    remote = s.with_overrides(engine_url="http://127.0.0.1:1")
    assert remote.profiler_model_key() is None  # only the server knows its model
    assert remote.with_overrides(model="org/M").profiler_model_key() == "M"
    other = s.with_overrides(profiler_url="http://127.0.0.1:2", model="org/Serving")
    assert other.profiler_model_key() is None
    assert other.with_overrides(profiler_model="tiny").profiler_model_key() == "tiny"


def test_profiler_setting_is_checked() -> None:
    assert Settings().profiler == "auto"
    with pytest.raises(InvalidSetting, match="profiler"):
        Settings().with_overrides(profiler="gpt")


def _invoke(cache: Path, *args: str):
    return CliRunner().invoke(
        app, ["--cache-dir", str(cache), "--model", "org/m", "profiler", "status", *args],
        env={"COLUMNS": "200"},
    )


def test_status_of_an_empty_state_says_nothing_is_labelled(tmp_path: Path) -> None:
    result = _invoke(tmp_path, "--dataset", "squad")
    assert result.exit_code == 0, result.output
    assert "0 labelled queries" in result.output and "it uses: llm" in result.output


def test_status_shows_the_trained_state(tmp_path: Path) -> None:
    # `_train` files 60 labels under model "m", collection "c": put them where squad's are.
    _train(tmp_path)
    (tmp_path / "profiler" / "m" / "c").rename(tmp_path / "profiler" / "m" / "squad")
    result = _invoke(tmp_path, "--dataset", "squad", "--json")
    assert result.exit_code == 0, result.output
    st = json.loads(result.output)
    assert st["model"] == "m" and st["collection"] == "squad" and st["samples"] == 60
    joint = next(f for f in st["fields"] if f["name"] == "joint")
    assert joint["n"] == 60 and joint["learned_accuracy"] > 0.9
    assert st["in_use"] == "learned"
    table = _invoke(tmp_path, "--dataset", "squad")
    assert "60 labelled queries" in table.output and "it uses: learned" in table.output


def test_status_with_a_remote_profiler_needs_its_model_named(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--cache-dir", str(tmp_path), "--profiler-url", "http://127.0.0.1:9", "profiler",
              "status", "--dataset", "squad"],
    )  # fmt: skip
    assert isinstance(result.exception, InvalidSetting)
    assert "--profiler-model" in str(result.exception)


def test_feedback_budget_setting_is_checked_and_parsed() -> None:
    from ragctl.policy import AdaptivePolicy
    from ragctl.types import Config

    with pytest.raises(InvalidSetting, match="feedback_configs.*bogus"):
        Settings().with_overrides(feedback_configs="stuff:3,bogus:2")
    policy = AdaptivePolicy.from_settings(
        Settings().with_overrides(feedback_configs="stuff:3, map_rerank:9,stuff:3,")
    )
    assert policy.feedback_configs == (Config("stuff", 3), Config("map_rerank", 9))
    # Clipped to the chunks retrieved, duplicates merged.
    assert policy.feedback_for(3) == (Config("stuff", 3), Config("map_rerank", 3))
    assert AdaptivePolicy.from_settings(
        Settings().with_overrides(feedback_configs="")
    ).feedback_configs == ()


def test_train_labels_with_the_cards_grid_where_it_has_one() -> None:
    from ragctl.evaluation.grid import parse_configs
    from ragctl.evaluation.profiler_train import LABEL_CONFIGS, label_configs
    from ragctl.retrieval.collection import load_card

    qmsum, squad = load_card("qmsum"), load_card("squad")
    assert qmsum.grid and not squad.grid
    assert label_configs(qmsum, None) == parse_configs(",".join(qmsum.grid))
    assert all(c.num_chunks <= 6 for c in label_configs(qmsum, None) if c.method == "stuff")
    assert label_configs(squad, None) == parse_configs(LABEL_CONFIGS)
    assert label_configs(qmsum, "stuff:1,stuff:2") == (Config("stuff", 1), Config("stuff", 2))
