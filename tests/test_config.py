"""Config mechanism: YAML + key=value overrides, errors that name the field. `pytest tests/test_config.py`"""

import pytest
import yaml

from dynboot.cli import main, normalise_args
from dynboot.config import ConfigError, load_config, save_config
from dynboot.world.generate import WorldConfig


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "w.yaml"
    cfg_file.write_text("gold: 7\nworld:\n  grid: 4\n")
    cfg = load_config(WorldConfig, [str(cfg_file), "test=3", "world.n_colours=2"])
    assert (cfg.gold, cfg.test, cfg.world.grid, cfg.world.n_colours) == (7, 3, 4, 2)
    save_config(cfg, tmp_path / "run")
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["world"]["grid"] == 4


@pytest.mark.parametrize(
    "override, fragment",
    [("vidoes=3", "unknown config key 'vidoes'"), ("world.gird=3", "unknown config key 'world.gird'"),
     ("gold=abc", "gold"), ("world.grid=2", "world.grid"), ("gold=-1", "gold"), ("gold=1 noequals", "key=value")],
)
def test_bad_config_names_the_field(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(WorldConfig, override.split())


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config(WorldConfig, ["vidoes=3"])
    assert "did you mean 'videos'" in str(err.value) and "actions_per_video" in str(err.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(WorldConfig, ["nope.yaml"])


def test_flag_spelling_is_key_value():
    assert normalise_args(["c.yaml", "--out", "d", "--gold=3", "x=1"]) == ["c.yaml", "out=d", "gold=3", "x=1"]


def test_cli_reports_bad_key(capsys):
    assert main(["world", "--vidoes", "3"]) == 2
    assert "unknown config key 'vidoes'" in capsys.readouterr().err
