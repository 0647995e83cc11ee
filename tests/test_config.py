"""Settings: environment, overrides, and errors that name the variable and range."""
from __future__ import annotations

from pathlib import Path

import pytest

import shmkey
from shmkey.config import SETTINGS, Config, markdown_table


def test_defaults_without_environment() -> None:
    cfg = Config.load(env={})
    assert cfg.transport == "shm"
    assert cfg.slots == 16 and cfg.slot_size == 2048
    assert cfg.workers >= 1 and cfg.timeout_ms == 5000 and cfg.spin_us == 500


def test_environment_then_overrides() -> None:
    env = {"SHMKEY_SLOTS": "4", "SHMKEY_TRANSPORT": "SocketPair", "SHMKEY_SPIN_US": " 0 "}
    cfg = Config.load(env=env)
    assert (cfg.slots, cfg.transport, cfg.spin_us) == (4, "socketpair", 0)
    assert Config.load(env=env, slots=64, transport="shm").slots == 64
    assert Config.load(env=env, slots=None).slots == 4


@pytest.mark.parametrize("var,value,expected", [
    ("SHMKEY_SLOTS", "abc", "SHMKEY_SLOTS='abc' is not a whole number; valid range 1 to 1024"),
    ("SHMKEY_SLOTS", "0", "SHMKEY_SLOTS='0' is out of range; valid range 1 to 1024"),
    ("SHMKEY_SLOT_SIZE", "100", "SHMKEY_SLOT_SIZE='100' is out of range; valid range 256 to 65536"),
    ("SHMKEY_WORKERS", "-1", "SHMKEY_WORKERS='-1' is out of range"),
    ("SHMKEY_TIMEOUT_MS", "1.5", "SHMKEY_TIMEOUT_MS='1.5' is not a whole number"),
    ("SHMKEY_TRANSPORT", "tcp", "SHMKEY_TRANSPORT='tcp' is not valid; use shm or socketpair"),
])
def test_bad_environment_names_variable_and_range(var: str, value: str, expected: str) -> None:
    with pytest.raises(shmkey.ConfigError) as info:
        Config.load(env={var: value})
    assert expected in str(info.value)


def test_bad_override_names_argument_and_variable() -> None:
    with pytest.raises(shmkey.ConfigError, match=r"slots \(overrides SHMKEY_SLOTS\)=2000"):
        Config.load(env={}, slots=2000)
    with pytest.raises(shmkey.ConfigError, match="unknown setting"):
        Config.load(env={}, colour=3)


def test_bad_environment_stops_oracle_before_start(monkeypatch: pytest.MonkeyPatch,
                                                   rsa2048: Path) -> None:
    monkeypatch.setenv("SHMKEY_WORKERS", "lots")
    with pytest.raises(shmkey.ConfigError, match="SHMKEY_WORKERS"):
        shmkey.KeyOracle(rsa2048)


def test_slot_too_small_for_key(rsa4096: Path) -> None:
    with pytest.raises(shmkey.ConfigError, match=r"SHMKEY_SLOT_SIZE=512 is too small for an "
                                                 r"RSA-4096 key: it needs at least \d+ bytes"):
        shmkey.KeyOracle(rsa4096, slot_size=512, workers=1).start()


def test_readme_table_lists_every_setting() -> None:
    table = markdown_table()
    for s in SETTINGS:
        assert f"`{s.env}`" in table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert table in readme, "README's settings table is stale: paste `shmkey settings`"
