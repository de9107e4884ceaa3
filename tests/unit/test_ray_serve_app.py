"""`serve --ray` before Ray starts: what cannot work is refused in one line, and the Serve
application is R replicas of the ragctl app with ragctl's in-flight limit (no cluster needed)."""

from __future__ import annotations

import pytest

from ragctl.cli import main
from ragctl.errors import InvalidSetting
from ragctl.settings import Settings


def test_serve_ray_without_an_engine_url_is_one_line_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--ray", "--replicas", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "needs --engine-url" in err and len(err.splitlines()) <= 3  # one wrapped line


def test_check_settings() -> None:
    pytest.importorskip("ray")
    from ragctl.distributed.serve import check_settings

    check_settings(Settings(engine_url="http://127.0.0.1:1"), 2)
    with pytest.raises(InvalidSetting, match="--engine-url"):
        check_settings(Settings(), 1)
    check_settings(Settings(engine_url="http://127.0.0.1:1,http://127.0.0.1:2"), 2)  # a pool
    with pytest.raises(InvalidSetting, match="--engine-url"):
        check_settings(Settings(engine_url="http://127.0.0.1:1,local"), 2)
    with pytest.raises(InvalidSetting, match="--replicas"):
        check_settings(Settings(engine_url="http://127.0.0.1:1"), 0)


def test_the_application_is_r_replicas_of_the_ragctl_app() -> None:
    pytest.importorskip("ray")
    from ragctl.distributed.serve import APP_NAME, application
    from ragctl.server import ServerOptions

    settings = Settings(engine_url="http://127.0.0.1:1")
    app = application(settings, ServerOptions("squad", max_inflight=7), replicas=3)
    deployment = app._bound_deployment  # the one deployment of the application
    assert deployment.name == APP_NAME and deployment.num_replicas == 3
    assert deployment.max_ongoing_requests == 7
    assert deployment.ray_actor_options["num_cpus"] == 1.0
