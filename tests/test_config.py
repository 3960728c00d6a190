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


def _leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in values.items():
        if isinstance(value, dict) and key != "simulator":
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_config_show_covers_every_key_of_both_files_with_a_description_and_unit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import yaml

    from agent.cli import config_models, main
    from agent.config import settings_of

    for name, model in config_models().items():
        rows = {row.key: row for row in settings_of(model)}
        shipped_text = (REPO / "configs" / f"{name}.yaml").read_text(encoding="utf-8")
        shipped = _leaf_keys(yaml.safe_load(shipped_text))
        assert shipped == set(rows), f"configs/{name}.yaml and the model disagree: {shipped ^ set(rows)}"
        assert not [key for key, row in rows.items() if not row.description]
        assert main(["config", "show", name, "--defaults"]) == 0
        printed = capsys.readouterr().out
        assert all(f"\n{key} " in printed for key in rows)
        # The shipped file is the generated one: every key under its description and unit.
        assert main(["config", "show", name, "--defaults", "--yaml"]) == 0
        assert capsys.readouterr().out == shipped_text, (
            f"configs/{name}.yaml is stale: micrography config show {name} --defaults --yaml"
        )
    session = {row.key: row for row in settings_of(config_models()["session"])}
    assert session["tiles.dwell_us"].unit == "µs" and session["tiles.dwell_us"].default == 8.0
    assert session["budget.max_mean_dose_e_per_a2"].unit == "e-/Å²"
    overridden = session["anomaly.warmup_steps"].description
    assert overridden.endswith("not used by a session, which warms up for `warmup_steps`")


def test_the_configuration_reference_page_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import main

    assert main(["config", "show", "--defaults", "--markdown"]) == 0
    generated = capsys.readouterr().out
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == generated, "docs/configuration.md is stale: micrography config show --defaults --markdown"


def test_config_show_marks_what_a_file_changes_and_refuses_keys_a_session_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main
    from agent.session import SessionConfig

    path = tmp_path / "session.yaml"
    path.write_text("tiles:\n  pixel_size_nm: 0.02\n  dwell_us: 2.0\n")
    assert main(["config", "show", "session", "--config", str(path)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tiles.dwell_us "))
    assert "= 2.0 [µs]" in line and line.endswith("(default 8.0)")
    path.write_text("anomaly:\n  warmup_steps: 20\n")
    with pytest.raises(ConfigError) as refused:
        load_config(path, SessionConfig)
    assert str(refused.value) == (
        f"{path}: <top level>: anomaly.warmup_steps is not used by a session, which warms up for "
        "`warmup_steps`; set that instead"
    )
