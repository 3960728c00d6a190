from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import dump_config, load_config
from agent.errors import ConfigError
from simulator.config import SimulatorConfig

REPO = Path(__file__).resolve().parents[1]


def test_shipped_simulator_config_matches_the_defaults() -> None:
    assert load_config(REPO / "configs" / "simulator.yaml", SimulatorConfig) == SimulatorConfig()


def test_unknown_key_names_the_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("specimen:\n  dislocashuns: 3\n")
    with pytest.raises(ConfigError, match=r"sim\.yaml: specimen\.dislocashuns: unknown key"):
        load_config(path, SimulatorConfig)


def test_wrong_type_names_the_key_value_and_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("imaging:\n  column_sigma_nm: wide\n")
    with pytest.raises(ConfigError, match=r"sim\.yaml: imaging\.column_sigma_nm: .*'wide'"):
        load_config(path, SimulatorConfig)


def test_out_of_range_value_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("specimen:\n  sm_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"specimen\.sm_fraction: Input should be less than or equal to 1"):
        load_config(path, SimulatorConfig)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "absent.yaml", SimulatorConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("specimen: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad, SimulatorConfig)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listing, SimulatorConfig)


def test_dump_then_load_round_trips(tmp_path: Path) -> None:
    config = SimulatorConfig(seed=11)
    dump_config(config, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml", SimulatorConfig) == config


def test_shipped_session_config_matches_the_defaults() -> None:
    from agent.session import SessionConfig

    assert load_config(REPO / "configs" / "session.yaml", SessionConfig) == SessionConfig()
