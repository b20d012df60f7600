"""Typed configs: YAML + overrides, one-line errors naming the key, file or line."""

import pytest

from jaxalign.config import ConfigError, TrainConfig, apply_override, from_dict, load_yaml
from jaxalign.train import parse_stages


def test_overrides_reach_nested_keys_with_types():
  data = {}
  for o in ("optim.lr=3e-4", "data.batch_size=4", "lora.targets=[q_proj, v_proj]", "init_from=null"):
    apply_override(data, o)
  cfg = from_dict(TrainConfig, data)
  assert cfg.optim.lr == 3e-4 and cfg.data.batch_size == 4
  assert cfg.lora.targets == ("q_proj", "v_proj") and cfg.init_from is None


def test_unknown_key_names_it_and_suggests():
  with pytest.raises(ConfigError, match=r"config key 'optim.lrr' is unknown \(did you mean 'optim.lr'\?\)"):
    from_dict(TrainConfig, {"optim": {"lrr": 1.0}})


def test_bad_value_names_the_key():
  with pytest.raises(ConfigError, match=r"config key 'data.batch_size': expected int, got 'many'"):
    from_dict(TrainConfig, {"data": {"batch_size": "many"}})
  with pytest.raises(ConfigError, match=r"config key 'reference.mode': 'cached' is not one of"):
    from_dict(TrainConfig, {"reference": {"mode": "cached"}})
  with pytest.raises(ConfigError, match=r"algorithm='ppo_typo'"):
    from_dict(TrainConfig, {"algorithm": "ppo_typo"})


def test_yaml_syntax_error_names_file_and_line(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("steps: 3\noptim:\n  lr: [1e-3\n")
  with pytest.raises(ConfigError, match=r"bad.yaml:4:"):
    load_yaml(path)


def test_stage_overrides_target_one_stage():
  stages = parse_stages(None, ["stages.1.steps=7", "seed=3"])
  assert [s.steps for s in stages][1] == 7 and stages[0].steps != 7
  assert all(s.seed == 3 for s in stages)
  with pytest.raises(ConfigError, match="there are 2 stages"):
    parse_stages(None, ["stages.5.steps=1"])
