"""relay.toml loading, environment overrides, validation and secret masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config
from relay.errors import ConfigError

TOML = """
[server]
port = 9000
public_url = "https://relay.example.com"

[twilio]
auth_token = "file-token-123456"

[numbers]
"+15550001111" = "gpt"

[agents.gpt]
type = "openai"
api_key = "sk-live-abcdef123456"
audio = "pcmu"

[agents.parrot]
type = "parrot"
"""


def write(tmp_path: Path, text: str = TOML) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_file_and_env_overrides(tmp_path: Path) -> None:
    env = {
        "RELAY_TWILIO_AUTH_TOKEN": "env-token-999999",
        "RELAY_SERVER_PORT": "9100",
        "RELAY_AGENTS_GPT_AUDIO": "pcm24k",
        "RELAY_MEDIA_MAX_LEAD_MS": "300",
    }
    cfg = config.load(write(tmp_path), env)
    cfg.validate()
    assert cfg.twilio.auth_token == "env-token-999999"
    assert cfg.server.port == 9100
    assert cfg.media.max_lead_ms == 300
    assert cfg.agents["gpt"]["audio"] == "pcm24k"
    assert cfg.agent_for("+15550001111") == "gpt"
    assert cfg.agent_for("+15550009999") == "parrot"
    assert cfg.stream_url == "wss://relay.example.com/twilio/stream"


def test_plain_http_public_url_gives_ws(tmp_path: Path) -> None:
    cfg = config.load(None, {"RELAY_SERVER_PUBLIC_URL": "http://127.0.0.1:8080/"})
    assert cfg.stream_url == "ws://127.0.0.1:8080/twilio/stream"


def test_secrets_are_masked_in_describe(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path), {})
    text = repr(cfg.describe())
    assert "sk-live-abcdef123456" not in text
    assert "file-token-123456" not in text
    assert "…3456" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nbogus = 1\n", "unknown key server.bogus"),
        ("[nope]\n", "unknown config section"),
        ("[server\n", "not valid TOML"),
        ("[calls]\ndefault_agent = 'x'\n", "default_agent"),
        ("[numbers]\n'+1555' = 'ghost'\n", "unknown agent"),
    ],
)
def test_invalid_config_gives_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg = config.load(write(tmp_path, "[twilio]\nauth_token='x'\n" + text), {})
        cfg.validate()


def test_serve_refuses_without_auth_token_when_no_store_can_hold_accounts() -> None:
    with pytest.raises(ConfigError, match="auth_token"):
        config.load(None, {"RELAY_STORE_URL": "memory"}).validate()
    # with a store, tenants' accounts may be the only ones: it starts (and warns)
    config.load(None, {}).validate()


def test_store_and_new_twilio_keys_load_from_the_environment() -> None:
    cfg = config.load(
        None,
        {
            "RELAY_STORE_URL": "postgresql://relay@db/relay",
            "RELAY_STORE_RETENTION_DAYS": "30",
            "RELAY_TWILIO_API_BASE_URL": "http://127.0.0.1:9",
            "RELAY_SECURITY_ENCRYPTION_KEY": "k1,k2",
        },
    )
    assert cfg.store.url == "postgresql://relay@db/relay" and cfg.store.retention_days == 30.0
    assert cfg.twilio.api_base_url == "http://127.0.0.1:9"
    assert "k1" not in str(cfg.describe())  # secrets masked
