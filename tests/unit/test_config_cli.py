"""Settings and the CLI generated from them: env vars, flags, precedence, validation, --help."""

from __future__ import annotations

import pytest

from sidecar.cli import build_parser, main, settings_from_args
from sidecar.config import ENV_PREFIX, Settings, service_link_hint, unknown_env_vars


def test_help_lists_every_setting_with_its_env_var_and_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        assert "--" + name.replace("_", "-") in text
        shown = "unset" if field.default is None else field.default
        assert f"env {ENV_PREFIX}{name.upper()}; default: {shown}" in text


def test_defaults_match_the_design() -> None:
    s = Settings()
    assert (s.host, s.port, s.admin_port) == ("0.0.0.0", 8080, 8081)
    assert s.key_prefix == "sse:run:"
    assert s.dialect == "auto"
    assert s.on_client_disconnect == "continue"
    assert s.stream_ttl_seconds == 3 * 3600
    assert s.max_stream_events == 100000


def test_env_var_overrides_default_and_flag_overrides_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSE_SIDECAR_PORT", "9000")
    monkeypatch.setenv("SSE_SIDECAR_KEY_PREFIX", "from-env:")
    args = build_parser().parse_args(["serve", "--key-prefix", "from-flag:"])
    s = settings_from_args(args)
    assert s.port == 9000
    assert s.key_prefix == "from-flag:"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--upstream-url", "ftp://x", "http:// or https://"),
        ("--redis-url", "mysql://x", "redis://"),
        ("--port", "70000", "less than or equal to 65535"),
        ("--flush-max-events", "0", "greater than 0"),
        ("--dialect-routes", "/v1/chat=openai", "item 1: unknown dialect 'openai'"),
        ("--dialect-routes", "/a=letta,/v1/chat", "item 2 ('/v1/chat') must be <path glob>="),
    ],
)
def test_bad_settings_exit_2_with_a_clear_message(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert "invalid settings" in err
    assert message in err


def test_choice_settings_are_checked_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--on-client-disconnect", "explode"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_same_traffic_and_admin_port_is_refused() -> None:
    with pytest.raises(ValueError, match="must differ"):
        Settings(port=8080, admin_port=8080)


def test_an_empty_secret_is_refused_instead_of_turning_auth_off() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Settings(replay_token="")
    with pytest.raises(ValueError, match="must not be empty"):
        Settings(signing_key="  ")


def test_misspelt_env_vars_are_reported() -> None:
    env = {"SSE_SIDECAR_REDIS_URL": "redis://x", "SSE_SIDECAR_REDIS_ULR": "redis://y", "HOME": "/"}
    assert unknown_env_vars(env) == ["SSE_SIDECAR_REDIS_ULR"]


def test_a_kubernetes_service_link_gets_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SSE_SIDECAR_PORT", "tcp://10.0.0.1:8080")
    assert main(["serve"]) == 2
    assert "enableServiceLinks: false" in capsys.readouterr().err
    assert service_link_hint({"SSE_SIDECAR_PORT": "8080"}) is None
