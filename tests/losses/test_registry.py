"""Registry and calling-convention tests: names, errors, jit, metric contract, spec defaults."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses as L
from jaxalign.losses import registry

REQUIRED = [
    "sft", "bradley_terry", "thurstone", "rm_all_pairs", "rm_plackett_luce", "ppo", "grpo", "dr_grpo", "dapo",
    "gspo", "cispo", "reinforce", "rloo", "reinforce_pp", "dpo", "cdpo", "robust_dpo", "ipo",
    "hinge", "slic", "rdpo", "dpop", "f_dpo", "nca", "bco", "kto", "cpo", "simpo", "orpo", "rpo",
    "npo", "dpo_pl", "lipo_lambda", "pmle", "preference_distillation", "rkl",
]
REQUIRED_HP = {"dr_grpo": dict(max_len=6)}


def example(kind, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *shape, lo=-3.0, hi=-0.1: rng.uniform(lo, hi, shape).astype(np.float32)
  if kind is L.PairStats:
    return L.PairStats(f(4, lo=-30, hi=-5), f(4, lo=-30, hi=-5), f(4, lo=-30, hi=-5),
                       f(4, lo=-30, hi=-5), f(4, lo=1, hi=20).round(), f(4, lo=1, hi=20).round(),
                       f(4, lo=-1, hi=1), f(4, lo=-1, hi=1))
  if kind is L.UnpairedStats:
    return L.UnpairedStats(f(4, lo=-30, hi=-5), f(4, lo=-30, hi=-5),
                           np.array([True, False, True, False]), f(4, lo=-30, hi=-5),
                           f(4, lo=-30, hi=-5))
  if kind is L.ListStats:
    return L.ListStats(f(2, 3, lo=-30, hi=-5), np.array([[2, 0, 1], [0, 1, 2]], np.float32),
                       f(2, 3, lo=-30, hi=-5))
  if kind is L.RewardPair:
    return L.RewardPair(f(4, lo=-2, hi=2), f(4, lo=-2, hi=2), f(4, lo=0, hi=1))
  if kind is L.RewardList:
    return L.RewardList(f(2, 3, lo=-2, hi=2), np.array([[2, 0, 1], [0, 1, 2]], np.float32))
  lp, mask = f(3, 6), np.tril(np.ones((3, 6), np.float32), 2)
  return L.TokenBatch(lp, mask, old_logps=lp + f(3, 6, lo=-.3, hi=.3),
                      ref_logps=lp + f(3, 6, lo=-.3, hi=.3), advantages=f(3, lo=-1, hi=1),
                      returns=f(3, 6, lo=-1, hi=1), values=f(3, 6, lo=-1, hi=1),
                      old_values=f(3, 6, lo=-1, hi=1), entropy=f(3, 6, lo=0, hi=2),
                      correct=(f(3, 6, lo=0, hi=1) > 0.5).astype(np.float32))


def test_required_names_are_registered():
  assert set(REQUIRED) <= set(L.available())
  assert L.available() == sorted(L.available())


def test_unknown_name_is_a_one_line_error_listing_the_names():
  with pytest.raises(KeyError) as err:
    L.get("dpoo")
  message = str(err.value)
  assert "dpoo" in message and "simpo" in message and "\n" not in message


def test_register_adds_a_variant_and_refuses_duplicates():
  def my_loss(batch, *, beta=0.1, num_pairs=None):
    return L.dpo_loss(batch, beta=2 * beta, num_pairs=num_pairs)

  try:
    L.register("my_dpo", my_loss, L.PairStats, reference="required")
    assert L.get("my_dpo") is my_loss and "my_dpo" in L.available()
    spec = L.spec("my_dpo")
    assert spec.data_format == "preference" and spec.counts == ("num_pairs",) and not spec.reward_model
    assert list(spec.params) == ["beta"] and spec.params["beta"].default == 0.1
    with pytest.raises(ValueError):
      L.register("my_dpo", my_loss, L.PairStats, reference="required")
  finally:
    registry._REGISTRY.pop("my_dpo", None)


def test_registration_declares_the_reference_use():
  def free(batch, *, beta=0.1):
    return L.simpo_loss(batch, beta=beta)

  with pytest.raises(TypeError, match="reference"):
    L.register("free", free, L.PairStats)  # no silent default: a reference-free loss would run a reference
  with pytest.raises(ValueError, match="reference"):
    L.register("free", free, L.PairStats, reference="sometimes")
  with pytest.raises(ValueError, match="beta"):
    L.register("free", lambda batch, *, tau=1.0: None, L.TokenBatch, reference="beta")
  assert "free" not in L.available()


def test_reference_use_follows_the_registration_and_the_params():
  assert L.spec("dpo").uses_reference({}) and not L.spec("dpo").uses_reference({"reference_free": True})
  assert not any(L.spec(n).uses_reference({}) for n in ("simpo", "cpo", "orpo", "slic", "pmle", "sft"))
  assert L.spec("grpo").uses_reference({}) and not L.spec("grpo").uses_reference({"beta": 0.0})
  assert not L.spec("dapo").uses_reference({}) and L.spec("dapo").uses_reference({"beta": 0.01})


def test_help_lists_every_loss_with_its_parameters():
  lines = L.help_lines()
  assert len(lines) == len(L.available())
  dpo = next(line for line in lines if line.split()[0] == "dpo")
  assert "beta=0.1" in dpo and "label_smoothing=0.0" in dpo and "num_pairs" not in dpo and "reference" in dpo
  assert "no reference" in next(line for line in lines if line.split()[0] == "simpo")
  assert "max_len (required)" in next(line for line in lines if line.split()[0] == "dr_grpo")


def test_missing_reference_is_an_error_not_zeros():
  batch = example(L.PairStats)._replace(ref_chosen=None)
  with pytest.raises(ValueError, match="ref_chosen"):
    L.dpo_loss(batch)
  L.simpo_loss(batch)  # reference-free losses ignore the field
  zero_ref = batch._replace(ref_chosen=np.zeros(4, np.float32), ref_rejected=np.zeros(4, np.float32))
  np.testing.assert_allclose(L.dpo_loss(batch, reference_free=True)[0], L.dpo_loss(zero_ref)[0])


def test_bad_options_raise():
  with pytest.raises(ValueError, match="aggregation"):
    L.grpo_loss(example(L.TokenBatch), aggregation="tokenmean")
  with pytest.raises(ValueError, match="eps"):
    L.robust_dpo_loss(example(L.PairStats), eps=0.5)
  with pytest.raises(ValueError, match="max_len"):
    L.grpo_loss(example(L.TokenBatch), aggregation="constant")


@pytest.mark.parametrize("name", L.available())
def test_every_loss_jits_and_returns_detached_scalar_metrics(name):
  fn, batch = L.get(name), example(L.input_type(name))
  hp = REQUIRED_HP.get(name, {})

  def metric_sum(b):  # the metrics are detached: their sum has zero gradient
    loss, metrics = fn(b, **hp)
    return sum(jnp.sum(v) for v in metrics.values()), (loss, metrics)

  (_, (loss, metrics)), grads = jax.jit(jax.value_and_grad(metric_sum, has_aux=True,
                                                           allow_int=True))(batch)
  assert loss.shape == () and np.isfinite(loss)
  assert "loss" in metrics and np.allclose(metrics["loss"], loss)
  for key, value in metrics.items():
    assert isinstance(key, str) and jnp.shape(value) == () and np.isfinite(value), key
  assert all(np.all(np.asarray(g, np.float32) == 0) for g in jax.tree.leaves(grads)
             if g.dtype != jax.dtypes.float0), name


def default(fn, name):
  return inspect.signature(fn).parameters[name].default


@pytest.mark.parametrize("fn, name, value", [
    (L.dpo_loss, "beta", 0.1), (L.cdpo_loss, "eps", 0.1), (L.robust_dpo_loss, "eps", 0.1),
    (L.ipo_loss, "tau", 0.1), (L.ipo_loss, "length_normalize", False), (L.dpop_loss, "lam", 50.0),
    (L.f_dpo_loss, "alpha", 0.5), (L.kto_loss, "beta", 0.1), (L.kto_loss, "lambda_d", 1.0),
    (L.kto_loss, "lambda_u", 1.0), (L.cpo_loss, "beta", 0.1), (L.cpo_loss, "alpha", 1.0),
    (L.cpo_loss, "nll_reduction", "token_mean"), (L.simpo_loss, "beta", 2.0),
    (L.simpo_loss, "gamma", 0.5), (L.orpo_loss, "lam", 0.1), (L.rpo_loss, "alpha", 1.0),
    (L.rpo_loss, "nll_reduction", "sequence_mean"), (L.npo_loss, "beta", 0.1),
    (L.bradley_terry_loss, "center_coef", 0.01), (L.sft_loss, "reduction", "token_mean"),
    (L.ppo_loss, "eps", 0.2), (L.ppo_loss, "eps_v", 0.2), (L.ppo_loss, "vf_coef", 0.1),
    (L.ppo_loss, "ent_coef", 0.0), (L.gae, "gamma", 1.0), (L.gae, "lam", 0.95),
    (L.kl_shaped_rewards, "beta", 0.05), (L.kl_shaped_rewards, "estimator", "k1"),
    (L.grpo_loss, "beta", 0.04), (L.grpo_loss, "eps_low", 0.2), (L.grpo_loss, "eps_high", 0.2),
    (L.grpo_loss, "aggregation", "seq_mean_token_mean"), (L.grpo_advantages, "ddof", 1),
    (L.grpo_advantages, "eps", 1e-4), (L.dr_grpo_loss, "beta", 0.0),
    (L.dapo_loss, "eps_low", 0.2), (L.dapo_loss, "eps_high", 0.28), (L.dapo_loss, "beta", 0.0),
    (L.gspo_loss, "eps_low", 3e-4), (L.gspo_loss, "eps_high", 4e-4), (L.rloo_loss, "clip_eps", 0.2),
    (L.preference_distillation_loss, "gamma", 0.1), (L.preference_distillation_loss, "beta", 0.05),
    (L.rkl_loss, "gamma", 0.01), (L.rkl_token_rewards, "beta", 0.05), (L.whiten, "ddof", 1),
])
def test_defaults_follow_objectives_md(fn, name, value):
  assert default(fn, name) == value
