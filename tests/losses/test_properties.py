"""Property tests (hypothesis) for the objective library (issue 3, section 2)."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from jaxalign import losses as L
from jaxalign.losses import dpo_variants, kto, reference_free

from . import reference as ref

PROPS = settings(max_examples=25, deadline=None)
FEW = settings(max_examples=10, deadline=None)  # each example checks every loss of a family
floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)
f32_floats = lambda lo, hi: st.floats(float(np.float32(lo)), float(np.float32(hi)), width=32)
vec = lambda n, lo, hi: hnp.arrays(np.float32, n, elements=f32_floats(lo, hi))


def pairs_from_margin(h):
  """PairStats whose DPO log-ratio margin is h [B] (reference log-probs fixed)."""
  h = jnp.asarray(h, jnp.float32)
  zeros = jnp.zeros_like(h)
  return L.PairStats(policy_chosen=h - 10.0, policy_rejected=zeros - 10.0, ref_chosen=zeros - 10.0,
                     ref_rejected=zeros - 10.0, n_chosen=zeros + 4, n_rejected=zeros + 6)


@functools.lru_cache(maxsize=None)
def jitted(specs, wrt_logps=False):
  """One jit(value_and_grad) over several registry losses, cached across hypothesis examples.

  specs: tuple of (name, static hyper-parameter items); strings, ints and structure are static.
  `dyn` keyword arguments (floats, step counts) are traced, so new values do not recompile; each
  loss receives the ones its signature accepts. With wrt_logps the gradient is taken with respect
  to the token log-probs only, else the whole batch. Compiling a family at once is much cheaper
  than one compile per loss.
  """
  def all_losses(x, batch, dyn):
    outs = []
    for name, static_items in specs:
      fn = L.get(name)
      params = inspect.signature(fn).parameters
      kw = {**dict(static_items), **{k: v for k, v in dyn.items() if k in params}}
      if wrt_logps:
        loss = lambda lp, fn=fn, kw=kw: fn(batch._replace(logps=lp), **kw)
      else:
        loss = lambda b, fn=fn, kw=kw: fn(b, **kw)
      outs.append(jax.value_and_grad(loss, has_aux=True, allow_int=True)(x))
    return outs
  return jax.jit(all_losses)


def run_many(specs, batch, dyn=None, wrt_logps=False):
  """[((loss, metrics), grads)] for specs = [(name, static hp dict)], jitted together."""
  key = tuple((name, tuple(sorted(hp.items()))) for name, hp in specs)
  return jitted(key, wrt_logps)(batch.logps if wrt_logps else batch, batch, dyn or {})


def run(name, batch, dyn=None, wrt_logps=False, **static):
  """((loss, metrics), grads) of registry loss `name`, jitted."""
  return run_many([(name, static)], batch, dyn, wrt_logps)[0]


def loss_of(name, batch, **dyn):
  return run(name, batch, dyn)[0][0]


# ---- DPO / IPO shape of the loss ---------------------------------------------------------------


@PROPS
@given(h1=floats(-50, 50), dh=floats(1e-3, 50), beta=floats(0.01, 1.0))
def test_dpo_decreases_as_margin_grows(h1, dh, beta):
  (loss1, _), grad = run("dpo", pairs_from_margin([h1]), dict(beta=beta))
  loss2 = loss_of("dpo", pairs_from_margin([h1 + dh]), beta=beta)
  assert loss2 <= loss1
  assert grad.policy_chosen[0] < 0 < grad.policy_rejected[0]


@PROPS
@given(h=vec(4, -30, 30), beta=floats(0.01, 1.0), eps=floats(0.0, 0.45))
def test_swapping_chosen_and_rejected_mirrors_dpo(h, beta, eps):
  batch = pairs_from_margin(h)
  swapped = batch._replace(policy_chosen=batch.policy_rejected, policy_rejected=batch.policy_chosen,
                           ref_chosen=batch.ref_rejected, ref_rejected=batch.ref_chosen)
  (loss, m), _ = run("dpo", batch, dict(beta=beta))
  (loss_s, m_s), _ = run("dpo", swapped, dict(beta=beta))
  # softplus(x) - softplus(-x) = x: the swapped loss exceeds the original by mean(beta * h).
  np.testing.assert_allclose(loss_s - loss, np.mean(beta * np.float64(h)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m_s["rewards/margins"], -m["rewards/margins"], atol=1e-5)
  np.testing.assert_allclose(m_s["rewards/chosen"], m["rewards/rejected"], atol=1e-6)
  # Label smoothing 1/2 is symmetric; cDPO on the swapped pairs equals the reference at -h.
  np.testing.assert_allclose(loss_of("dpo", swapped, beta=beta, label_smoothing=0.5),
                             loss_of("dpo", batch, beta=beta, label_smoothing=0.5), rtol=1e-5)
  h64 = np.float64(h)
  np.testing.assert_allclose(loss_of("cdpo", swapped, beta=beta, eps=eps),
                             ref.dpo(dict(pc=-h64, pr=0 * h64, rc=0 * h64, rr=0 * h64), beta, eps),
                             rtol=1e-4, atol=1e-5)


@PROPS
@given(h=floats(-40, 40), tau=floats(0.05, 2.0))
def test_ipo_is_minimal_at_half_inverse_tau(h, tau):
  target = 1.0 / (2.0 * tau)
  (at_target, _), grad = run("ipo", pairs_from_margin([target]), dict(tau=tau))
  assert at_target <= loss_of("ipo", pairs_from_margin([h]), tau=tau) + 1e-6
  np.testing.assert_allclose(grad.policy_chosen, 0.0, atol=1e-4)


# ---- detached quantities -----------------------------------------------------------------------


@PROPS
@given(policy=vec(6, -30, -1), shift=vec(6, -3, 3), kl=vec(6, -30, -1), kl_shift=vec(6, -3, 3))
def test_no_gradient_through_kto_reference_point(policy, shift, kl, kl_shift):
  batch = L.UnpairedStats(policy, policy - shift, np.arange(6) % 2 == 0, kl, kl - kl_shift)
  (_, metrics), grads = run("kto", batch)
  assert np.all(np.asarray(grads.kl_policy) == 0) and np.all(np.asarray(grads.kl_ref) == 0)
  np.testing.assert_array_equal(grads.policy, -grads.ref)  # l = S - S_ref carries the gradient
  assert metrics["kl"] >= 0


@PROPS
@given(lp=vec((3, 4), -4, -0.01), dlp=vec((3, 4), -1, 1), adv=vec(3, -2, 2),
       eps_max=floats(1.01, 2.0))
def test_no_gradient_through_cispo_clipped_weight(lp, dlp, adv, eps_max):
  mask = np.asarray([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
  batch = L.TokenBatch(lp, mask, old_logps=lp - dlp, advantages=adv)
  (_, _), grads = run("cispo", batch, dict(eps_max=eps_max))
  assert np.all(np.asarray(grads.old_logps) == 0)
  weight = np.minimum(np.exp(np.float64(lp) - np.float64(lp - dlp)), eps_max)
  expected = -weight * np.float64(adv)[:, None] * mask / mask.sum()
  np.testing.assert_allclose(grads.logps, expected, rtol=1e-4, atol=1e-6)


# ---- advantages ----------------------------------------------------------------------------------

gae_jit = jax.jit(L.gae)


@PROPS
@given(rewards=vec((3, 7), -2, 2), values=vec((3, 7), -2, 2),
       mask=hnp.arrays(np.bool_, (3, 7)), gamma=floats(0.5, 1.0), lam=floats(0.0, 1.0))
def test_gae_equals_naive_loop(rewards, values, mask, gamma, lam):
  mask = mask.astype(np.float32)
  adv, ret = gae_jit(rewards, values, mask, gamma=gamma, lam=lam)
  ref_adv, ref_ret = ref.gae(np.float64(rewards), np.float64(values), mask, gamma, lam)
  np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)


rloo_jit = jax.jit(L.rloo_advantages, static_argnums=2)


@PROPS
@given(rewards=vec(8, -3, 3), i=st.integers(0, 7), bump=floats(-5, 5))
def test_rloo_baseline_excludes_the_sample(rewards, i, bump):
  ids = np.asarray([0, 0, 0, 0, 1, 1, 1, 1])
  baseline = rewards - rloo_jit(rewards, ids, 2)
  bumped = rewards.copy()
  bumped[i] += bump
  baseline_b = bumped - rloo_jit(bumped, ids, 2)
  np.testing.assert_allclose(baseline_b[i], baseline[i], atol=1e-5)  # R_i is not in b_i
  group = [j for j in range(8) if ids[j] == ids[i] and j != i]
  np.testing.assert_allclose(baseline[i], np.mean(rewards[group]), atol=1e-5)


grpo_adv_jit = jax.jit(L.grpo_advantages, static_argnums=2, static_argnames=("scale", "ddof"))


@PROPS
@given(value=floats(-5, 5), group=st.integers(1, 6), ddof=st.sampled_from([0, 1]))
def test_equal_rewards_give_zero_advantage(value, group, ddof):
  rewards = np.full((8,), value, np.float32)
  ids = np.minimum(np.arange(8) // group, 7)  # groups of `group` equal rewards
  for scale in ("group", "batch", "none"):
    adv = grpo_adv_jit(rewards, ids, 8, scale=scale, ddof=ddof)
    assert np.all(np.isfinite(adv)) and np.all(adv == 0), scale
  adv = rloo_jit(rewards, ids, 8)
  assert np.all(np.isfinite(adv)) and np.all(adv == 0)
  assert np.asarray(L.group_metrics(rewards, ids, 8)["frac_reward_zero_std"]) == 1.0


# ---- masking -----------------------------------------------------------------------------------

TOKEN_HP = {"dr_grpo": dict(max_len=5), "cispo": dict(eps_max=1.2)}
TOKEN_LOSSES = [n for n in L.available() if L.input_type(n) is L.TokenBatch]
TOKEN_SPECS = [(n, TOKEN_HP.get(n, {})) for n in TOKEN_LOSSES]


def token_batch(seed, mask):
  rng = np.random.default_rng(seed)
  shape = mask.shape
  f = lambda x: np.asarray(x, np.float32)
  lp = f(-rng.uniform(0.1, 3, shape))
  return L.TokenBatch(lp, f(mask), old_logps=f(lp + rng.normal(0, .3, shape)),
                      ref_logps=f(lp + rng.normal(0, .3, shape)),
                      advantages=f(rng.normal(0, 1, shape[0])), returns=f(rng.normal(0, 1, shape)),
                      values=f(rng.normal(0, 1, shape)), old_values=f(rng.normal(0, 1, shape)),
                      entropy=f(rng.uniform(0, 2, shape)), correct=f(rng.random(shape) < 0.5))


@FEW
@given(seed=st.integers(0, 2**16), rows=hnp.arrays(np.bool_, 4))
def test_fully_masked_rows_give_no_nan(seed, rows):
  mask = np.ones((4, 5), np.float32)
  mask[~rows] = 0.0  # some (possibly all) rows fully masked
  batch = token_batch(seed, mask)
  for name, ((loss, metrics), grads) in zip(TOKEN_LOSSES, run_many(TOKEN_SPECS, batch)):
    assert np.isfinite(loss), name
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), name
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), name
    assert np.all(np.asarray(grads.logps)[~rows] == 0), name
    if not rows.any():
      assert loss == 0, name
  adv, ret = gae_jit(batch.returns, batch.values, mask)
  assert np.all(np.isfinite(adv)) and np.all(np.asarray(adv)[~rows] == 0)
  for x in (L.whiten(batch.values, mask), L.reinforce_pp_advantages(batch.returns, mask)):
    assert np.all(np.isfinite(x)) and np.all(np.asarray(x)[~rows] == 0)


def test_masked_positions_do_not_count():
  mask = np.asarray([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],
                    np.float32)
  batch = token_batch(0, mask)  # same shape as above: reuses the compiled losses
  garbage = batch._replace(logps=np.where(batch.mask > 0, batch.logps, -np.inf))
  results = zip(TOKEN_LOSSES, run_many(TOKEN_SPECS, garbage), run_many(TOKEN_SPECS, batch))
  for name, ((loss, _), grads), ((clean_loss, _), _) in results:
    np.testing.assert_allclose(loss, clean_loss, err_msg=name)
    assert np.all(np.isfinite(grads.logps)), name


# ---- gradient accumulation ---------------------------------------------------------------------

ACCUM_TOKEN = [("sft", {}), ("sft", dict(reduction="sequence_mean")),
               ("sft", dict(reduction="sequence_sum")), ("ppo", {}), ("grpo", {}),
               ("grpo", dict(aggregation="token_mean")), ("dr_grpo", dict(max_len=5)),
               ("dapo", {}), ("gspo", dict(eps_low=0.2, eps_high=0.2)),
               ("gspo", dict(eps_low=0.2, eps_high=0.2, aggregation="token_mean")),
               ("gspo_token", dict(eps_low=0.2, eps_high=0.2)), ("cispo", dict(eps_max=1.2)),
               ("reinforce", {}), ("rloo", {}), ("reinforce_pp", {}), ("rkl", {})]


def step_counts(n_rows, n_tokens):
  """Step-level counts; each loss picks the ones its signature accepts."""
  return {k: np.float32(v) for k, v in dict(num_tokens=n_tokens, num_sequences=n_rows,
                                            num_pairs=n_rows, num_lists=n_rows,
                                            num_examples=n_rows).items()}


def split(batch, cuts):
  bounds = [0, *cuts, len(batch[0])]
  return [jax.tree.map(lambda x: x[a:b], batch) for a, b in zip(bounds[:-1], bounds[1:])]


def pad_rows(batch, rows):
  """Pads a TokenBatch with fully masked rows to a static row count, as a trainer would."""
  extra = rows - batch.mask.shape[0]
  pad = lambda x: None if x is None else np.concatenate([x, np.full((extra,) + x.shape[1:], 7.0,
                                                                     np.float32)])
  return jax.tree.map(pad, batch)._replace(mask=np.concatenate([batch.mask, np.zeros((extra, 5),
                                                                                     np.float32)]))


@FEW
@given(seed=st.integers(0, 2**16), cut=st.integers(1, 5), mask=hnp.arrays(np.bool_, (6, 5)))
def test_token_accumulation_equals_full_batch(seed, cut, mask):
  """Two unequal micro-batches, each padded to 5 rows, with the step's counts == full batch."""
  batch = token_batch(seed, mask.astype(np.float32))
  full = run_many(ACCUM_TOKEN, batch, wrt_logps=True)
  micro = [run_many(ACCUM_TOKEN, pad_rows(m, 5), step_counts(6, mask.sum()), wrt_logps=True)
           for m in split(batch, [cut])]
  for i, (name, _) in enumerate(ACCUM_TOKEN):
    (full_loss, full_m), full_grad = full[i]
    (loss_a, m_a), grad_a = micro[0][i]
    (loss_b, m_b), grad_b = micro[1][i]
    np.testing.assert_allclose(loss_a + loss_b, full_loss, rtol=1e-5, atol=1e-6, err_msg=name)
    grads = np.concatenate([grad_a[:cut], grad_b[:6 - cut]])
    np.testing.assert_allclose(grads, full_grad, rtol=1e-5, atol=1e-6, err_msg=name)
    if "numerator" in full_m:  # summed micro-batch numerators over the step's denominator
      np.testing.assert_allclose(m_a["denominator"], full_m["denominator"], err_msg=name)
      num = m_a["numerator"] + m_b["numerator"]
      total = num / full_m["denominator"] if full_m["denominator"] > 0 else 0.0 * num
      np.testing.assert_allclose(total, full_loss, rtol=1e-5, atol=1e-6, err_msg=name)


def pair_batch(seed, b=6):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.uniform(*s).astype(np.float32)
  pc, pr = -f(5, 30, b), -f(5, 30, b)
  return L.PairStats(pc, pr, pc - f(-2, 2, b), pr - f(-2, 2, b), f(1, 20, b).round(),
                     f(1, 20, b).round(), f(-1, 1, b), f(-1, 1, b))


ACCUM_PAIR = [("dpo", {}), ("ipo", {}), ("cpo", {}), ("orpo", {}), ("simpo", {}),
              ("rpo", dict(nll_reduction="token_mean")), ("rpo", {}), ("dpop", {}),
              ("preference_distillation", {}), ("slic", dict(lambda_reg=0.5)),
              ("bco", {}), ("nca", {}), ("f_dpo", dict(divergence="js"))]


@FEW
@given(seed=st.integers(0, 2**16))
def test_pairwise_accumulation_equals_full_batch(seed):
  """Two micro-batches (unequal chosen-token counts) with the step's counts == the full batch."""
  batch, cuts = pair_batch(seed), (3,)
  full = run_many(ACCUM_PAIR, batch)
  counts = step_counts(6, batch.n_chosen.sum())
  micro = [run_many(ACCUM_PAIR, m, counts) for m in split(batch, cuts)]
  for i, (name, _) in enumerate(ACCUM_PAIR):
    (full_loss, _), full_grad = full[i]
    np.testing.assert_allclose(sum(m[i][0][0] for m in micro), full_loss, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.concatenate([m[i][1].policy_chosen for m in micro]),
                               full_grad.policy_chosen, rtol=1e-5, atol=1e-7, err_msg=name)


@FEW
@given(seed=st.integers(0, 2**16))
def test_kto_and_listwise_accumulation(seed):
  p, cuts = pair_batch(seed), (3,)
  kto = L.UnpairedStats(p.policy_chosen, p.ref_chosen, np.arange(6) % 3 == 0, p.policy_rejected,
                        p.ref_rejected)
  z0 = np.float32(L.kto_reference_point(kto))  # the step-level reference point
  micro = sum(run("kto", m, dict(z0=z0, num_examples=6))[0][0] for m in split(kto, cuts))
  np.testing.assert_allclose(micro, run("kto", kto)[0][0], rtol=1e-5)
  lists = L.ListStats(np.stack([p.policy_chosen, p.policy_rejected], 1),
                      np.tile(np.asarray([1.0, 0.0], np.float32), (6, 1)),
                      np.stack([p.ref_chosen, p.ref_rejected], 1))
  for name in ("dpo_pl", "lipo_lambda"):
    micro = sum(run(name, m, dict(num_lists=6))[0][0] for m in split(lists, cuts))
    np.testing.assert_allclose(micro, run(name, lists)[0][0], rtol=1e-5)
  # K = 2 Plackett-Luce is DPO.
  np.testing.assert_allclose(run("dpo_pl", lists)[0][0], run("dpo", p)[0][0], rtol=1e-5)


# ---- equivalences ------------------------------------------------------------------------------


@FEW
@given(seed=st.integers(0, 2**16))
def test_gspo_token_matches_gspo_value_and_gradient(seed):
  batch = token_batch(seed, np.tril(np.ones((4, 5), np.float32), 1))
  (va, _), ga = run("gspo", batch, dict(eps_low=0.2, eps_high=0.2), wrt_logps=True)
  (vb, _), gb = run("gspo_token", batch, dict(eps_low=0.2, eps_high=0.2), wrt_logps=True)
  np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)


def test_f_dpo_reverse_kl_is_dpo_and_alpha_limits():
  batch = pair_batch(3)
  dpo = L.dpo_loss(batch)[0]
  np.testing.assert_allclose(L.f_dpo_loss(batch, divergence="reverse_kl")[0], dpo, rtol=1e-6)
  np.testing.assert_allclose(L.f_dpo_loss(batch, divergence="alpha", alpha=1e-4)[0], dpo, rtol=1e-3)
  np.testing.assert_allclose(L.f_dpo_loss(batch, divergence="alpha", alpha=0.9999)[0],
                             L.f_dpo_loss(batch, divergence="forward_kl")[0], rtol=1e-3)


# ---- TRL DPO-family variants, CPO/SimPO options, unpaired APO (called from their modules) --------

V = dpo_variants
DIVS = ("reverse_kl", "forward_kl", "js", "alpha")


@functools.lru_cache(maxsize=None)
def _vg_jit(fn, static_items):
  """jit(value_and_grad) of fn(batch, **static, **dyn) with respect to the whole batch; dyn is traced."""
  def f(batch, dyn):
    return jax.value_and_grad(lambda b: fn(b, **dict(static_items), **dyn), has_aux=True, allow_int=True)(batch)
  return jax.jit(f)


def vg(fn, batch, static=None, **dyn):
  """((loss, metrics), grads) of fn on batch; float hyper-parameters in dyn do not recompile."""
  return _vg_jit(fn, tuple(sorted((static or {}).items())))(batch, {k: np.float32(v) for k, v in dyn.items()})


def val(fn, batch, static=None, **dyn):
  return vg(fn, batch, static, **dyn)[0][0]


def swap(batch):
  return batch._replace(policy_chosen=batch.policy_rejected, policy_rejected=batch.policy_chosen,
                        ref_chosen=batch.ref_rejected, ref_rejected=batch.ref_chosen,
                        n_chosen=batch.n_rejected, n_rejected=batch.n_chosen)


MONOTONE = [(V.sigmoid_norm_loss, dict(divergence=d)) for d in DIVS] + [
    (V.aot_loss, {}), (V.aot_unpaired_loss, {}), (V.apo_zero_loss, {})]


@PROPS
@given(h1=floats(-50, 50), dh=floats(1e-3, 50), beta=floats(0.01, 1.0))
def test_trl_variants_decrease_as_margin_grows(h1, dh, beta):
  """Non-increasing in h = l_w - l_l (l_l fixed); EXO only below its minimiser beta h* = log((1-eps)/eps)."""
  cases = MONOTONE + ([(V.exo_pair_loss, {})] if beta * (h1 + dh) <= np.log((1 - 1e-3) / 1e-3) else [])
  for fn, static in cases:
    (loss1, _), grad = vg(fn, pairs_from_margin([h1]), static, beta=beta)
    loss2 = val(fn, pairs_from_margin([h1 + dh]), static, beta=beta)
    assert loss2 <= loss1 + 1e-6 * abs(loss1), (fn.__name__, static)
    assert grad.policy_chosen[0] <= 0, (fn.__name__, static)


@PROPS
@given(h=vec(4, -30, 30), beta=floats(0.05, 1.0), eps=floats(1e-3, 0.45))
def test_swapping_chosen_and_rejected_in_trl_variants(h, beta, eps):
  """Swapping y_w and y_l changes each loss by a closed form that is positive when the margins are."""
  batch, h64 = pairs_from_margin(h), np.float64(h)  # l_w = h, l_l = 0, n_w = 4, n_l = 6
  z = beta * h64
  expected = {  # loss(swapped) - loss
      (V.sigmoid_norm_loss, ()): np.mean(beta * h64 / 4),
      (V.aot_loss, (("label_smoothing", eps),)): (1 - 2 * eps) * np.mean(z),
      (V.aot_unpaired_loss, (("label_smoothing", eps),)): (1 - 2 * eps) * np.mean(z),
      (V.sppo_hard_loss, ()): 2 / beta * np.mean(h64),
      (V.apo_zero_loss, ()): np.mean(np.tanh(z / 2)),
      (V.exo_pair_loss, (("label_smoothing", eps),)): np.mean(np.tanh(z / 2)) * np.log((1 - eps) / eps),
  }
  for (fn, dyn), diff in expected.items():
    loss, loss_s = val(fn, batch, beta=beta, **dict(dyn)), val(fn, swap(batch), beta=beta, **dict(dyn))
    scale = 1.0 + abs(float(loss)) + abs(float(loss_s))
    np.testing.assert_allclose(loss_s - loss, diff, rtol=1e-4, atol=1e-5 * scale, err_msg=fn.__name__)
    if np.all(h64 > 1e-2):
      assert loss_s > loss, fn.__name__


@FEW
@given(seed=st.integers(0, 2**16))
def test_aot_sorts_over_the_batch(seed):
  batch, rng = pair_batch(seed), np.random.default_rng(seed)
  p, q = rng.permutation(6), rng.permutation(6)
  unpaired = batch._replace(policy_chosen=batch.policy_chosen[p], ref_chosen=batch.ref_chosen[p],
                            policy_rejected=batch.policy_rejected[q], ref_rejected=batch.ref_rejected[q])
  np.testing.assert_allclose(val(V.aot_unpaired_loss, unpaired), val(V.aot_unpaired_loss, batch), rtol=1e-6)
  paired = batch._replace(ref_chosen=batch.ref_chosen[p], ref_rejected=batch.ref_rejected[p])
  np.testing.assert_allclose(val(V.aot_loss, paired), val(V.aot_loss, batch), rtol=1e-6)
  one = jax.tree.map(lambda x: x[:1], batch)  # B = 1: both are DPO with label smoothing
  for fn in (V.aot_loss, V.aot_unpaired_loss):
    np.testing.assert_allclose(val(fn, one, beta=0.3, label_smoothing=0.1),
                               L.dpo_loss(one, beta=0.3, label_smoothing=0.1)[0], rtol=1e-5)


EXTREME = [(V.exo_pair_loss, dict(divergence=d)) for d in DIVS] + [
    (V.discopop_loss, dict(divergence=d)) for d in DIVS] + [
    (V.sigmoid_norm_loss, dict(divergence=d)) for d in DIVS] + [
    (V.sppo_hard_loss, {}), (V.aot_loss, {}), (V.aot_unpaired_loss, {}), (V.apo_zero_loss, {}),
    (V.apo_down_loss, {}), (reference_free.cpo_loss, {}), (reference_free.simpo_loss, {}),
    (reference_free.alphapo_loss, {})]
extreme_logps = lambda: vec(4, -1e4, 0.0)


@FEW
@given(pc=extreme_logps(), pr=extreme_logps(), rc=extreme_logps(), rr=extreme_logps(),
       n=hnp.arrays(np.float32, 8, elements=st.sampled_from([1.0, 3.0, 4096.0])))
def test_trl_variants_finite_at_extreme_inputs(pc, pr, rc, rr, n):
  batch = L.PairStats(pc, pr, rc, rr, n[:4], n[4:])
  for fn, static in EXTREME:
    dyn = dict(label_smoothing=0.1) if fn is reference_free.cpo_loss else {}
    if fn is reference_free.simpo_loss:
      dyn = dict(reward_alpha=-0.5, alpha=1.0)
    (loss, metrics), grads = vg(fn, batch, static, **dyn)
    assert np.isfinite(loss), (fn.__name__, static)
    assert all(np.all(np.isfinite(v)) for v in metrics.values()), (fn.__name__, static)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)), (fn.__name__, static)
  desirable = np.asarray([True, False, True, False])
  (loss, _), grads = vg(kto.apo_zero_unpaired_loss, L.UnpairedStats(pc, rc, desirable))
  assert np.isfinite(loss) and np.all(np.isfinite(grads.policy))


ACCUM_VARIANTS = [(V.exo_pair_loss, {}), (V.sppo_hard_loss, {}), (V.apo_zero_loss, {}), (V.apo_down_loss, {}),
                  (V.discopop_loss, {}), (V.sigmoid_norm_loss, dict(divergence="js")),
                  (reference_free.simpo_loss, {}), (reference_free.alphapo_loss, {})]


@FEW
@given(seed=st.integers(0, 2**16))
def test_trl_variants_accumulate_exactly_except_aot(seed):
  batch = pair_batch(seed)
  cases = [(fn, static, {}) for fn, static in ACCUM_VARIANTS] + [  # CPO-SimPO: token-mean NLL
      (reference_free.simpo_loss, {}, dict(alpha=1.0, num_tokens=float(batch.n_chosen.sum())))]
  for fn, static, nll in cases:
    (full, _), full_grad = vg(fn, batch, static, **nll)
    micro = [vg(fn, m, static, num_pairs=6.0, **nll) for m in split(batch, (2,))]
    np.testing.assert_allclose(sum(m[0][0] for m in micro), full, rtol=1e-5, err_msg=fn.__name__)
    np.testing.assert_allclose(np.concatenate([m[1].policy_chosen for m in micro]), full_grad.policy_chosen,
                               rtol=1e-5, atol=1e-7, err_msg=fn.__name__)
  # AOT sorts over the batch: micro-batch losses do not sum to the full loss in general.
  zeros = np.zeros(4, np.float32)
  aot_batch = L.PairStats(np.asarray([3, 0, 0, 0], np.float32), zeros, np.asarray([0, 0, 0, 5], np.float32), zeros)
  micro = sum(val(V.aot_loss, m, num_pairs=4.0) for m in split(aot_batch, (2,)))
  assert abs(micro - val(V.aot_loss, aot_batch)) > 1e-3


def test_trl_variant_equivalences():
  batch = pair_batch(5)
  equal = batch._replace(n_chosen=np.full(6, 4.0, np.float32), n_rejected=np.full(6, 4.0, np.float32))
  for d in DIVS:  # equal lengths: the length-normalised sigmoid is f-DPO at beta / n (constants cancel)
    np.testing.assert_allclose(val(V.sigmoid_norm_loss, equal, dict(divergence=d), beta=0.8),
                               L.f_dpo_loss(equal, beta=0.2, divergence=d)[0], rtol=1e-5, err_msg=d)
  simpo = reference_free.simpo_loss
  np.testing.assert_allclose(val(simpo, batch, reward_alpha=0.0), L.simpo_loss(batch)[0], rtol=1e-6)
  np.testing.assert_allclose(val(simpo, batch, reward_alpha=1e-4), L.simpo_loss(batch)[0], rtol=1e-3)
  (_, m), _ = vg(simpo, batch)
  np.testing.assert_allclose(val(simpo, batch, alpha=0.7), m["loss"] + 0.7 * m["nll_loss"], rtol=1e-6)
  np.testing.assert_allclose(val(reference_free.alphapo_loss, batch, reward_alpha=0.0, beta=2.0, gamma=0.5),
                             L.simpo_loss(batch)[0], rtol=1e-6)
  np.testing.assert_allclose(val(reference_free.cpo_loss, batch, reward_alpha=0.0, label_smoothing=0.0),
                             L.cpo_loss(batch)[0], rtol=1e-6)
  # cpo at label smoothing 1/2 without NLL is symmetric in chosen / rejected
  np.testing.assert_allclose(val(reference_free.cpo_loss, batch, label_smoothing=0.5, alpha=0.0),
                             val(reference_free.cpo_loss, swap(batch), label_smoothing=0.5, alpha=0.0), rtol=1e-6)
  # DiscoPOP: logistic for z << -tau, exponential for z >> tau (z = beta h, l_l = 0)
  for h, expected in [(-10.0, np.log1p(np.e)), (10.0, np.exp(-1.0))]:
    np.testing.assert_allclose(val(V.discopop_loss, pairs_from_margin([h])), expected, rtol=1e-4)


@PROPS
@given(h=floats(-40, 40), beta=floats(0.05, 1.0), eps=floats(1e-4, 0.45))
def test_exo_pair_is_zero_at_its_minimiser(h, beta, eps):
  target = np.log((1 - eps) / eps) / beta
  (at_target, _), grad = vg(V.exo_pair_loss, pairs_from_margin([target]), beta=beta, label_smoothing=eps)
  np.testing.assert_allclose(at_target, 0.0, atol=1e-5)
  np.testing.assert_allclose(grad.policy_chosen, 0.0, atol=1e-4)
  assert at_target <= val(V.exo_pair_loss, pairs_from_margin([h]), beta=beta, label_smoothing=eps) + 1e-5


@PROPS
@given(l=vec(4, -40, 40), dl=floats(1e-3, 20), beta=floats(0.01, 1.0), lambda_u=floats(0.5, 2.0))
def test_apo_zero_unpaired_is_bounded_and_monotone(l, dl, beta, lambda_u):
  desirable = np.asarray([True, False, True, False])
  zeros = np.zeros(4, np.float32)
  up = lambda x: L.UnpairedStats(x, zeros, desirable)
  (loss, _), grads = vg(kto.apo_zero_unpaired_loss, up(l), beta=beta, lambda_u=lambda_u)
  assert 0 <= loss <= max(1.0, lambda_u) + 1e-6
  g = np.asarray(grads.policy)
  assert np.all(g[desirable] <= 0) and np.all(g[~desirable] >= 0)  # raise desirable, lower undesirable
  loss_up = val(kto.apo_zero_unpaired_loss, up(np.where(desirable, l + dl, l)), beta=beta, lambda_u=lambda_u)
  assert loss_up <= loss + 1e-6
