"""Typed configs: YAML + overrides, one-line errors naming the key, file or line."""

import re
import subprocess
import sys

import pytest

from jaxalign.config import ConfigError, TrainConfig, apply_override, from_dict, load_stages, load_yaml
from jaxalign.train import check_stages, parse_stages
from jaxalign.trainer import check_combination, loss_params, objective_of


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
  # Algorithm names are the registered ones, checked before a run builds.
  with pytest.raises(ConfigError, match=r"algorithm='ppo_typo'; choose one of sft, reward, preference, ppo"):
    objective_of(from_dict(TrainConfig, {"algorithm": "ppo_typo"}))


def test_parsing_a_config_imports_no_algorithm():
  code = ("import sys, jaxalign.config, jaxalign.checkpoint; "
          "print([m for m in sys.modules if m.startswith('jaxalign.algorithms')])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_yaml_syntax_error_names_file_and_line(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("steps: 3\noptim:\n  lr: [1e-3\n")
  with pytest.raises(ConfigError, match=r"bad.yaml:4:"):
    load_yaml(path)


def test_stage_overrides_target_one_stage():
  stages = parse_stages(None, ["stages.1.steps=7", "seed=3"])
  assert [s.steps for s in stages][1] == 7 and stages[0].steps != 7
  assert all(s.seed == 3 for s in stages)
  with pytest.raises(ConfigError, match="the recipe has 2 stages"):
    parse_stages(None, ["stages.5.steps=1"])


def test_top_level_overrides_reach_every_stage_over_the_recipe():
  stages = parse_stages(None, ["steps=10", "optim.lr=1e-5", "run_dir=out/x", "stages.1.steps=3"])
  assert [s.steps for s in stages] == [10, 3]  # the recipe's 250 / 300 lose to steps=10; stages.1 wins over both
  assert all(s.optim.lr == 1e-5 for s in stages)
  assert [s.run_dir for s in stages] == ["out/x/sft", "out/x/dpo"]  # one run_dir: a subdirectory per stage


def test_naming_another_loss_drops_the_old_losss_parameters():
  for order in (["stages.1.loss.name=ipo", "stages.1.loss.params.tau=0.5"],
                ["stages.1.loss.params.tau=0.5", "stages.1.loss.name=ipo"]):
    ipo = parse_stages(None, order)[1]
    assert ipo.loss.name == "ipo" and ipo.loss.params == {"tau": 0.5}  # the recipe's DPO beta is not merged in
  same = parse_stages(None, ['stages.1.loss.name="dpo + chosen_nll"'])[1]
  assert same.loss.params == {"beta": 0.5}  # the same loss keeps them
  shared = {"loss": {"name": "dpo", "params": {"beta": 0.5}},
            "stages": [{"name": "a"}, {"name": "b", "loss": {"name": "ipo"}}, {"name": "c", "loss": {"name": "ipo",
                                                                                               "params": {"tau": 1}}}]}
  a, b, c = load_stages(shared)
  assert a.loss.params == {"beta": 0.5} and b.loss.params == {} and c.loss.params == {"tau": 1}


def test_every_stage_is_checked_before_the_first_one_trains():
  with pytest.raises(ConfigError, match=r"^stage 'dpo': loss.params.betta: loss 'dpo \+ chosen_nll' has no parameter 'betta'"):
    check_stages(parse_stages(None, ["stages.1.loss.params.betta=1"]))


def test_loss_parameters_take_the_losss_types():
  assert loss_params("dpo", {"beta": "1e-4", "reference_free": True}) == {"beta": 1e-4, "reference_free": True}


@pytest.mark.parametrize("override,message", [
  ("optim.lr=-1e-4", "optim.lr=-0.0001 must be a finite number > 0"),
  ("optim.lr=.nan", "config key 'optim.lr': expected a number, got nan"),
  ("data.batch_size=0", "data.batch_size"),
  ("log.every=0", "log.every must be >= 1"),
  ("checkpoint.keep=0", "checkpoint.keep >= 1"),
  ("data.eval_fraction=1.5", "data.eval_fraction=1.5 must be in [0, 1)"),
  ("mesh.process_id=3", "mesh.process_id=3 must be in [0, mesh.num_processes)"),
  ("model.num_kv_heads=0", "num_kv_heads=0: model sizes must be >= 1"),
  ("rl.temperature=0", "rl.temperature must be > 0"),
])
def test_bad_values_are_refused_before_training(override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    parse_stages(None, [override, "mesh.num_processes=2"] if "process_id" in override else [override])


@pytest.mark.parametrize("params,loss,message", [
  ({"beta": 0.5}, "ipo", "loss.params.beta: loss 'ipo' has no parameter 'beta'; it takes tau, length_normalize"),
  ({"betta": 0.5}, "dpo", "loss.params.betta: loss 'dpo' has no parameter 'betta' (did you mean 'beta'?)"),
  ({"beta": "high"}, "dpo", "config key 'loss.params.beta': expected float, got 'high'"),
  ({"num_pairs": 3}, "dpo", "loss 'dpo' has no parameter 'num_pairs'"),  # a step count, not a hyper-parameter
])
def test_loss_parameters_are_checked_against_the_losss_signature(params, loss, message):
  cfg = from_dict(TrainConfig, {"algorithm": "preference", "data": {"format": "preference"},
                                "loss": {"name": loss, "params": params}})
  with pytest.raises(ConfigError, match=re.escape(message)):
    check_combination(cfg, objective_of(cfg))


def test_unknown_loss_name_is_a_config_error():
  cfg = from_dict(TrainConfig, {"algorithm": "preference", "data": {"format": "preference"}, "loss": {"name": "dpoo"}})
  with pytest.raises(ConfigError, match="loss.name: unknown loss 'dpoo'; available: "):
    objective_of(cfg)


def test_help_explains_stages_and_overrides():
  from jaxalign.train import help_text

  text = help_text()
  assert "`stages.N.key=value`" in text and "applies to every stage" in text and "checkpoint.allow_changes" in text
