"""GRPO-family variants of TRL's GRPOTrainer (SAPO, VESPO, LUSPO, top-entropy tokens, off-policy
sequence masking) and SFT's DFT, against the float64 NumPy references in reference.py.

Values at rtol 1e-9 and jax.grad against central differences of the reference at rtol 1e-5 (the
`check` helper of test_reference.py), plus properties: defaults change nothing, the filters' rules,
exact micro-batch accumulation where documented.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses import grpo, policy_masks, sft, soft_gates
from jaxalign.losses.stats import TokenBatch

from . import reference as ref
from .test_reference import SEEDS, VAL, check, token_data


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def variant_data(seed):
  """token_data with mixed advantage signs and two rows whose old log-probs drift (off-policy)."""
  d = token_data(seed, b=6, t=7)
  d["adv"] = np.abs(d["adv"]) * np.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
  d["old"] = d["old"] + np.array([0.0, 0.3, 0.0, 0.0, 0.3, 0.3])[:, None]
  return d


def batch_of(d, adv="adv", old=True):
  return TokenBatch(d["lp"], d["mask"], old_logps=d["old"] if old else None, ref_logps=d["refl"],
                    advantages=d[adv], entropy=d["entropy"])


RHO, DELTA = 0.3, 0.1
FILTERS = {  # name -> (jax keyword arguments, reference keep(fixed data, advantage key))
    "entropy": (dict(top_entropy_quantile=RHO),
                lambda f, adv: ref.top_entropy_keep(f["entropy"], f["mask"], RHO)),
    "offpolicy": (dict(off_policy_mask_threshold=DELTA),
                  lambda f, adv: ref.off_policy_keep(f["lp"], f["old"], f[adv], f["mask"], DELTA)),
    "both": (dict(top_entropy_quantile=RHO, off_policy_mask_threshold=DELTA),
             lambda f, adv: ref.top_entropy_keep(f["entropy"], f["mask"], RHO)
             * ref.off_policy_keep(f["lp"], f["old"], f[adv], f["mask"], DELTA)),
    "none": ({}, lambda f, adv: None),
}

# name -> (jax loss(batch, **filter_kw), reference(d, fixed, keep), advantage key)
LOSSES = {
    "grpo": (lambda b, **kw: grpo.grpo_loss(b, **kw),
             lambda d, f, k: ref.grpo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k), "adv"),
    "grpo-token-adv": (lambda b, **kw: grpo.grpo_loss(b, beta=0.1, eps_high=0.3, **kw),
                       lambda d, f, k: ref.grpo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv_tok"], k,
                                                     0.2, 0.3, 0.1), "adv_tok"),
    "dr_grpo": (lambda b, **kw: grpo.dr_grpo_loss(b, max_len=8, beta=0.04, **kw),
                lambda d, f, k: ref.grpo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, beta=0.04,
                                              aggregation="constant", max_len=8), "adv"),
    "dapo": (lambda b, **kw: grpo.dapo_loss(b, **kw),
             lambda d, f, k: ref.grpo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, 0.2, 0.28, 0.0,
                                           "token_mean"), "adv"),
    "gspo": (lambda b, **kw: grpo.gspo_loss(b, eps_low=0.2, eps_high=0.2, beta=0.04, **kw),
             lambda d, f, k: ref.gspo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, 0.2, 0.2, 0.04),
             "adv"),
    "gspo-token-mean": (lambda b, **kw: grpo.gspo_loss(b, eps_low=0.1, eps_high=0.1, beta=0.02,
                                                       aggregation="token_mean", **kw),
                        lambda d, f, k: ref.gspo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, 0.1,
                                                      0.1, 0.02, "token_mean"), "adv"),
    "gspo_token": (lambda b, **kw: grpo.gspo_token_loss(b, eps_low=0.2, eps_high=0.2, beta=0.04, **kw),
                   lambda d, f, k: ref.gspo_token_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv_tok"],
                                                       f["lp"], k, 0.2, 0.2, 0.04), "adv_tok"),
    "luspo": (lambda b, **kw: grpo.luspo_loss(b, **kw),
              lambda d, f, k: ref.gspo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, 2e-3, 2.5e-3,
                                            aggregation="luspo"), "adv"),
    "luspo-eps0.2-kl": (lambda b, **kw: grpo.luspo_loss(b, eps_low=0.2, eps_high=0.2, beta=0.04, **kw),
                        lambda d, f, k: ref.gspo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k, 0.2,
                                                      0.2, 0.04, "luspo"), "adv"),
    "cispo": (lambda b, **kw: grpo.cispo_loss(b, eps_max=1.2, beta=0.04, **kw),
              lambda d, f, k: ref.cispo_kept(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], f["lp"], k, 1.2,
                                             0.04), "adv"),
    "sapo": (lambda b, **kw: soft_gates.sapo_loss(b, **kw),
             lambda d, f, k: ref.sapo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k), "adv"),
    "sapo-token-adv-kl": (lambda b, **kw: soft_gates.sapo_loss(b, tau_pos=0.5, tau_neg=2.0, beta=0.05,
                                                               kl_bias_correction=True, aggregation="token_mean",
                                                               **kw),
                          lambda d, f, k: ref.sapo(d["lp"], d["mask"], d["old"], d["refl"], d["adv_tok"], k, 0.5,
                                                   2.0, 0.05, "token_mean", kl_bias_correction=True), "adv_tok"),
    "sapo-constant": (lambda b, **kw: soft_gates.sapo_loss(b, aggregation="constant", max_len=8, **kw),
                      lambda d, f, k: ref.sapo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], k,
                                               aggregation="constant", max_len=8), "adv"),
    "vespo": (lambda b, **kw: soft_gates.vespo_loss(b, **kw),
              lambda d, f, k: ref.vespo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], f["lp"], k), "adv"),
    "vespo-token-adv-kl": (lambda b, **kw: soft_gates.vespo_loss(b, k_pos=1.5, lambda_pos=2.5, k_neg=2.0,
                                                                 lambda_neg=1.0, beta=0.05,
                                                                 kl_bias_correction=True,
                                                                 aggregation="seq_mean_token_mean", **kw),
                           lambda d, f, k: ref.vespo(d["lp"], d["mask"], d["old"], d["refl"], d["adv_tok"], f["lp"],
                                                     k, 1.5, 2.5, 2.0, 1.0, 0.05, "seq_mean_token_mean",
                                                     kl_bias_correction=True), "adv_tok"),
}

CASES = [(loss, flt) for loss in LOSSES for flt in FILTERS]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss, flt", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_value_and_gradient(loss, flt, seed):
  fn, ref_fn, adv = LOSSES[loss]
  kw, keep_fn = FILTERS[flt]
  check(lambda a: fn(batch_of(a, adv), **kw)[0], lambda d, f: ref_fn(d, f, keep_fn(f, adv)), variant_data(seed),
        wrt=("lp",))


@pytest.mark.parametrize("seed", SEEDS)
def test_filters_are_not_trivial(seed):
  """The fixtures drop some but not all tokens, so the filtered cases above test something."""
  d = variant_data(seed)
  valid = d["mask"] > 0
  for adv in ("adv", "adv_tok"):
    for _, keep_fn in (FILTERS["entropy"], FILTERS["offpolicy"]):
      kept = keep_fn(d, adv)[valid]
      assert 0 < kept.sum() < valid.sum()


@pytest.mark.parametrize("seed", SEEDS)
def test_on_policy_variants(seed):
  """old_logps = None: SAPO and VESPO read lp_old = sg(lp) (VESPO: phi = 1, plain -A lp)."""
  d = variant_data(seed)
  check(lambda a: soft_gates.sapo_loss(batch_of(a, old=False))[0],
        lambda x, f: ref.sapo(x["lp"], x["mask"], f["lp"], x["refl"], x["adv"]), d, wrt=("lp",))
  check(lambda a: soft_gates.vespo_loss(batch_of(a, old=False))[0],
        lambda x, f: ref.vespo(x["lp"], x["mask"], f["lp"], x["refl"], x["adv"], f["lp"]), d, wrt=("lp",))
  check(lambda a: soft_gates.vespo_loss(batch_of(a, old=False))[0],
        lambda x, f: ref.aggregate(-ref.per_token_adv(x["adv"], x["lp"].shape) * x["lp"], x["mask"], "token_mean"),
        d, wrt=("lp",))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sequence_sum"])
@pytest.mark.parametrize("seed", SEEDS)
def test_dft(seed, reduction):
  check(lambda a: sft.dft_loss(TokenBatch(a["lp"], a["mask"]), reduction=reduction)[0],
        lambda d, f: ref.dft(d["lp"], d["mask"], f["lp"], reduction), token_data(seed), wrt=("lp",))


# ---- properties ----------------------------------------------------------------------------------

FAMILY = [grpo.grpo_loss, grpo.dapo_loss, lambda b, **kw: grpo.dr_grpo_loss(b, max_len=8, **kw),
          grpo.gspo_loss, grpo.gspo_token_loss, grpo.luspo_loss, grpo.cispo_loss, soft_gates.sapo_loss,
          soft_gates.vespo_loss]


@pytest.mark.parametrize("fn", FAMILY)
def test_defaults_change_nothing_and_need_no_entropy(fn):
  d = {k: jnp.asarray(v) for k, v in variant_data(11).items()}
  batch = batch_of(d)._replace(entropy=None)
  base, base_metrics = fn(batch)
  same, same_metrics = fn(batch, top_entropy_quantile=1.0, off_policy_mask_threshold=None)
  assert float(base) == float(same) and base_metrics.keys() == same_metrics.keys()
  assert not any(k.startswith(("entropy_mask/", "off_policy_mask/")) for k in base_metrics)
  # a threshold no sequence reaches keeps every token
  np.testing.assert_allclose(float(fn(batch, off_policy_mask_threshold=1e6)[0]), float(base), **VAL)
  with pytest.raises(ValueError, match="entropy"):
    fn(batch, top_entropy_quantile=0.2)
  with pytest.raises(ValueError, match="top_entropy_quantile"):
    fn(batch_of(d), top_entropy_quantile=1.5)


def test_masked_quantile_matches_numpy():
  rng = np.random.default_rng(0)
  x, mask = rng.normal(size=(5, 9)), rng.random((5, 9)) < 0.6
  for q in (0.0, 0.2, 0.5, 0.8, 0.999, 1.0):
    np.testing.assert_allclose(float(policy_masks.masked_quantile(x, mask, q)), np.quantile(x[mask], q), **VAL)
  jitted = jax.jit(policy_masks.masked_quantile, static_argnums=2)
  np.testing.assert_allclose(float(jitted(x, mask, 0.8)), np.quantile(x[mask], 0.8), **VAL)
  assert float(policy_masks.masked_quantile(x, np.zeros_like(mask), 0.5)) == np.inf


def test_high_entropy_mask_extremes():
  entropy = jnp.array([[0.5, 2.0, 9.0], [1.0, 3.0, 0.1]])
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the 9.0 is padding
  keep = lambda rho: np.asarray(policy_masks.high_entropy_mask(entropy, mask, rho)[0])
  np.testing.assert_array_equal(keep(0.0), [[0, 0, 0], [0, 1, 0]])  # only the largest valid entropy
  np.testing.assert_array_equal(keep(1.0), np.asarray(mask))
  np.testing.assert_array_equal(keep(0.4), [[0, 1, 0], [0, 1, 0]])  # q = 0.6: 0.1 0.5 1 2 3 -> 1.4


def test_off_policy_mask_rule():
  """DeepSeek-V3.2 Eq. (9): drop only A < 0 AND mean log(pi_old / pi) > delta."""
  lp = jnp.array([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, 0.0]])
  old = jnp.array([[-0.5, -0.5], [-0.5, -0.5], [-0.9, -1.0], [-0.2, 0.0]])  # drifts 0.5 0.5 0.05 0.8 / 1
  adv = jnp.array([[1.0], [-1.0], [-1.0], [-1.0]]) * jnp.ones((4, 2))
  mask = jnp.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
  keep, drift = policy_masks.off_policy_mask(lp, old, adv, mask, 0.3)
  np.testing.assert_allclose(np.asarray(drift), [0.5, 0.5, 0.05, 0.8], **VAL)
  np.testing.assert_array_equal(np.asarray(keep), [[1, 1], [0, 0], [1, 1], [0, 0]])


def _split(d, rows):
  return {k: v[rows] for k, v in d.items()}


@pytest.mark.parametrize("name, fn, count", [
    ("grpo", grpo.grpo_loss, "num_sequences"), ("dapo", grpo.dapo_loss, "num_tokens"),
    ("luspo", grpo.luspo_loss, "num_sequences"), ("sapo", soft_gates.sapo_loss, "num_sequences"),
    ("vespo", soft_gates.vespo_loss, "num_tokens"), ("cispo", grpo.cispo_loss, "num_tokens")])
def test_off_policy_mask_accumulates_exactly(name, fn, count):
  d = variant_data(12)
  steps = {"num_sequences": float(d["lp"].shape[0]), "num_tokens": float(d["mask"].sum())}
  full, grads = jax.value_and_grad(lambda lp: fn(batch_of({**d, "lp": lp}), off_policy_mask_threshold=DELTA,
                                                 **{count: steps[count]})[0])(jnp.asarray(d["lp"]))
  parts, part_grads = 0.0, []
  for rows in (slice(0, 2), slice(2, 6)):
    part = _split(d, rows)
    value, g = jax.value_and_grad(lambda lp: fn(batch_of({**part, "lp": lp}), off_policy_mask_threshold=DELTA,
                                                **{count: steps[count]})[0])(jnp.asarray(part["lp"]))
    parts, part_grads = parts + float(value), part_grads + [np.asarray(g)]
  np.testing.assert_allclose(parts, float(full), **VAL)
  np.testing.assert_allclose(np.concatenate(part_grads), np.asarray(grads), **VAL)


def test_top_entropy_quantile_is_batch_level():
  """Documented: micro-batches use their own entropy thresholds, so their losses do not sum exactly."""
  d = variant_data(11)
  full = float(grpo.dapo_loss(batch_of(d), top_entropy_quantile=RHO, num_tokens=float(d["mask"].sum()))[0])
  parts = sum(float(grpo.dapo_loss(batch_of(_split(d, rows)), top_entropy_quantile=RHO,
                                   num_tokens=float(d["mask"].sum()))[0]) for rows in (slice(0, 3), slice(3, 6)))
  assert abs(parts - full) > 1e-6


def test_filters_under_jit_and_metrics():
  d = variant_data(11)
  kw = dict(top_entropy_quantile=RHO, off_policy_mask_threshold=DELTA)
  eager, metrics = grpo.grpo_loss(batch_of(d), **kw)
  jitted = jax.jit(lambda b: grpo.grpo_loss(b, **kw))(batch_of(d))
  np.testing.assert_allclose(float(jitted[0]), float(eager), **VAL)
  valid = d["mask"] > 0
  np.testing.assert_allclose(float(metrics["entropy_mask/kept_fraction"]),
                             ref.top_entropy_keep(d["entropy"], d["mask"], RHO)[valid].mean(), **VAL)
  np.testing.assert_allclose(float(metrics["off_policy_mask/dropped_fraction"]),
                             1 - ref.off_policy_keep(d["lp"], d["old"], d["adv"], d["mask"], DELTA)[valid].mean(),
                             **VAL)


def test_sapo_on_policy_gradient_is_grpo():
  """f'(1) = 1: with lp_old = sg(lp) and beta = 0, SAPO and GRPO have the same gradient."""
  d = variant_data(12)
  grad = lambda fn: jax.grad(lambda lp: fn(batch_of({**d, "lp": lp}, old=False), beta=0.0)[0])(jnp.asarray(d["lp"]))
  np.testing.assert_allclose(np.asarray(grad(soft_gates.sapo_loss)), np.asarray(grad(grpo.grpo_loss)), **VAL)


def test_vespo_kernel_is_one_at_unit_weight():
  lp = jnp.array([[-1.0, -2.0]])
  phi, log_w = soft_gates.vespo_weights(lp, lp, jnp.ones((1, 2)), jnp.ones((1, 2)), k_pos=2.0, lambda_pos=3.0,
                                        k_neg=3.0, lambda_neg=2.0)
  np.testing.assert_allclose(np.asarray(phi), 1.0, **VAL)
  assert float(log_w[0]) == 0.0
