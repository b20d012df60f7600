"""JAX losses vs the independent float64 NumPy references (tests/losses/reference.py).

Fresh random inputs (seeded), float64 on both sides: values at rtol 1e-9, and jax.grad against
central finite differences of the reference at rtol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses as L
from jaxalign.losses import dpo as dpo_mod
from jaxalign.losses import dpo_variants, kto, margin, reference_free

from . import reference as ref

SEEDS = (11, 12)
VAL = dict(rtol=1e-9, atol=1e-12)
GRAD = dict(rtol=1e-5, atol=1e-8)


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def numgrad(f, x, h=1e-6):
  """Central finite differences of a scalar NumPy function."""
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    g[idx] = (f(up) - f(down)) / (2 * h)
  return g


def check(jax_loss, ref_loss, data, wrt):
  """jax_loss(dict of jnp arrays) and ref_loss(dict of np arrays, fixed dict) agree in value and in
  the gradient with respect to each key of `wrt`."""
  arrays = {k: jnp.asarray(v) for k, v in data.items()}
  value = jax_loss(arrays)
  assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), ref_loss(data, data), **VAL)
  grads = jax.grad(lambda sub: jax_loss({**arrays, **sub}))({k: arrays[k] for k in wrt})
  for k in wrt:
    expected = numgrad(lambda x: ref_loss({**data, k: x}, data), data[k])
    np.testing.assert_allclose(np.asarray(grads[k]), expected, **GRAD, err_msg=k)


# ---- random inputs -------------------------------------------------------------------------------


def pair_data(seed, b=5):
  rng = np.random.default_rng(seed)
  pc, pr = -rng.uniform(5, 30, b), -rng.uniform(5, 30, b)
  return dict(pc=pc, pr=pr, rc=pc - rng.normal(0, 2, b), rr=pr - rng.normal(0, 2, b),
              nc=rng.integers(1, 20, b).astype(float), nr=rng.integers(1, 20, b).astype(float),
              sc=rng.normal(0, 1, b), sr=rng.normal(0, 1, b))


def token_data(seed, b=4, t=6):
  rng = np.random.default_rng(seed)
  mask = (rng.random((b, t)) < 0.75).astype(float)
  mask[:, 0] = 1.0
  lp = -rng.uniform(0.05, 3.0, (b, t))
  return dict(lp=lp, mask=mask, old=lp + rng.normal(0, 0.3, (b, t)),
              refl=lp + rng.normal(0, 0.3, (b, t)), adv=rng.normal(0, 1, b),
              adv_tok=rng.normal(0, 1, (b, t)), values=rng.normal(0, 1, (b, t)),
              v_old=rng.normal(0, 1, (b, t)), returns=rng.normal(0, 1, (b, t)),
              entropy=rng.uniform(0, 3, (b, t)))


def pair_batch(d):
  return L.PairStats(d["pc"], d["pr"], d["rc"], d["rr"], d["nc"], d["nr"], d["sc"], d["sr"])


def token_batch(d, adv="adv"):
  return L.TokenBatch(d["lp"], d["mask"], old_logps=d["old"], ref_logps=d["refl"],
                      advantages=d[adv], returns=d["returns"], values=d["values"],
                      old_values=d["v_old"], entropy=d["entropy"])


# ---- pairwise direct objectives ----------------------------------------------------------------

PAIRWISE = [
    (L.dpo_loss, ref.dpo, dict(beta=0.1)),
    (L.dpo_loss, ref.dpo, dict(beta=0.3, label_smoothing=0.2)),
    (L.cdpo_loss, lambda P, beta, eps: ref.dpo(P, beta, eps), dict(beta=0.1, eps=0.1)),
    (L.robust_dpo_loss, ref.robust_dpo, dict(beta=0.2, eps=0.15)),
    (L.ipo_loss, ref.ipo, dict(tau=0.1)),
    (L.ipo_loss, ref.ipo, dict(tau=0.5, length_normalize=True)),
    (L.hinge_loss, ref.hinge, dict(beta=0.5)),
    (L.slic_loss, ref.slic, dict(delta=3.0, lambda_reg=0.1)),
    (L.rdpo_loss, ref.rdpo, dict(beta=0.1, alpha=0.05)),
    (L.dpop_loss, ref.dpop, dict(beta=0.1, lam=5.0)),
    (L.f_dpo_loss, ref.f_dpo, dict(beta=0.1, divergence="reverse_kl")),
    (L.f_dpo_loss, ref.f_dpo, dict(beta=0.1, divergence="forward_kl")),
    (L.f_dpo_loss, ref.f_dpo, dict(beta=0.1, divergence="js")),
    (L.f_dpo_loss, ref.f_dpo, dict(beta=0.1, divergence="alpha", alpha=0.3)),
    (L.nca_loss, ref.nca, dict(beta=0.1)),
    (L.bco_loss, ref.bco, dict(beta=0.1, delta=0.3)),
    (L.rpo_loss, ref.rpo, dict(beta=0.1, alpha=0.5)),
    (L.rpo_loss, ref.rpo, dict(beta=0.1, alpha=1.0, nll_reduction="token_mean")),
    (L.cpo_loss, ref.cpo, dict(beta=0.1, alpha=1.0)),
    (L.cpo_loss, ref.cpo, dict(beta=0.1, alpha=0.5, nll_reduction="sequence_sum")),
    (L.simpo_loss, ref.simpo, dict(beta=2.0, gamma=0.5)),
    (L.simpo_loss, ref.simpo, dict(beta=2.5, gamma=0.3, label_smoothing=0.1)),
    (L.orpo_loss, ref.orpo, dict(lam=0.1)),
    (L.pmle_loss, ref.pmle, dict(gamma=0.05)),
    (L.preference_distillation_loss, ref.preference_distillation, dict(gamma=0.1)),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, ref_fn, hp", PAIRWISE,
                         ids=[f"{f.__name__}-{i}" for i, (f, _, _) in enumerate(PAIRWISE)])
def test_pairwise(fn, ref_fn, hp, seed):
  check(lambda a: fn(pair_batch(a), **hp)[0], lambda d, _: ref_fn(d, **hp), pair_data(seed),
        wrt=("pc", "pr"))


# TRL DPOTrainer / CPOTrainer / KTOTrainer variants, imported from their modules.
TRL_VARIANTS = [
    (dpo_variants.exo_pair_loss, ref.exo_pair, dict(beta=0.1)),
    (dpo_variants.exo_pair_loss, ref.exo_pair, dict(beta=0.3, label_smoothing=0.1, divergence="js")),
    (dpo_variants.sppo_hard_loss, ref.sppo_hard, dict(beta=0.2)),
    (dpo_variants.aot_loss, ref.aot, dict(beta=0.1)),
    (dpo_variants.aot_loss, ref.aot, dict(beta=0.2, label_smoothing=0.1)),
    (dpo_variants.aot_unpaired_loss, ref.aot_unpaired, dict(beta=0.1)),
    (dpo_variants.aot_unpaired_loss, ref.aot_unpaired, dict(beta=0.3, label_smoothing=0.2)),
    (dpo_variants.apo_zero_loss, ref.apo_zero, dict(beta=0.1)),
    (dpo_variants.apo_down_loss, ref.apo_down, dict(beta=0.2)),
    (dpo_variants.discopop_loss, ref.discopop, dict(beta=0.1)),
    (dpo_variants.discopop_loss, ref.discopop, dict(beta=0.05, tau=0.5, divergence="alpha", alpha=0.3)),
    (dpo_variants.sigmoid_norm_loss, ref.sigmoid_norm, dict(beta=0.5)),
    (dpo_variants.sigmoid_norm_loss, ref.sigmoid_norm, dict(beta=0.5, divergence="forward_kl")),
    (dpo_variants.sigmoid_norm_loss, ref.sigmoid_norm, dict(beta=0.5, divergence="js")),
    (dpo_variants.sigmoid_norm_loss, ref.sigmoid_norm, dict(beta=0.5, divergence="alpha", alpha=0.3)),
    # f-divergence scores on the other losses TRL allows them with
    (margin.hinge_loss, ref.hinge_f, dict(beta=0.5, divergence="forward_kl")),
    (dpo_mod.robust_dpo_loss, ref.robust_dpo_f, dict(beta=0.2, eps=0.15, divergence="js")),
    (margin.ipo_loss, lambda P, length_normalize, **hp: ref.ipo_trl(P, **hp),
     dict(tau=0.5, length_normalize=True, divergence="forward_kl")),
    (margin.ipo_loss, lambda P, length_normalize, **hp: ref.ipo_trl(P, **hp),
     dict(tau=0.5, length_normalize=True, divergence="js")),
    # CPO options: label smoothing, AlphaPO reward shape; CPO-SimPO; AlphaPO
    (reference_free.cpo_loss, ref.cpo_trl, dict(beta=0.1, alpha=1.0, label_smoothing=0.1)),
    (reference_free.cpo_loss, ref.cpo_trl, dict(beta=0.1, alpha=0.5, reward_alpha=0.05)),
    (reference_free.simpo_loss, lambda P, gamma, **hp: ref.cpo_trl(P, average=True, gamma=gamma, **hp),
     dict(beta=2.0, gamma=0.5, alpha=1.0)),
    (reference_free.simpo_loss, lambda P, gamma, **hp: ref.cpo_trl(P, average=True, gamma=gamma, **hp),
     dict(beta=2.5, gamma=0.3, alpha=0.0, reward_alpha=0.25, label_smoothing=0.1)),
    (reference_free.alphapo_loss,
     lambda P, **hp: ref.cpo_trl(P, alpha=0.0, average=True, **hp),
     dict(beta=2.5, gamma=0.1, reward_alpha=0.25)),
    (reference_free.alphapo_loss,
     lambda P, **hp: ref.cpo_trl(P, alpha=0.0, average=True, **hp),
     dict(beta=2.0, gamma=0.5, reward_alpha=-0.1)),
]


def _ids(cases):
  return [f"{getattr(f, '__name__', 'fn')}-{i}" for i, (f, _, _) in enumerate(cases)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fn, ref_fn, hp", TRL_VARIANTS, ids=_ids(TRL_VARIANTS))
def test_trl_variants(fn, ref_fn, hp, seed):
  check(lambda a: fn(pair_batch(a), **hp)[0], lambda d, _: ref_fn(d, **hp), pair_data(seed),
        wrt=("pc", "pr"))


@pytest.mark.parametrize("seed", SEEDS)
def test_yun_objectives_with_kl_block(seed):
  data = {**pair_data(seed), **token_data(seed)}
  kl = lambda d: L.TokenBatch(d["lp"], d["mask"], ref_logps=d["refl"])
  for fn, ref_fn, hp in [(L.pmle_loss, ref.pmle, dict(gamma=0.05)),
                         (L.preference_distillation_loss, ref.preference_distillation,
                          dict(gamma=0.1))]:
    check(lambda a: fn(pair_batch(a), beta=0.3, kl_batch=kl(a), **hp)[0],
          lambda d, _: ref_fn(d, **hp) + 0.3 * ref.sequence_kl(d["lp"], d["refl"], d["mask"], "k2"),
          data, wrt=("pc", "pr", "lp"))


# ---- unpaired and listwise ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_kto(seed):
  rng = np.random.default_rng(seed)
  d = dict(policy=-rng.uniform(5, 30, 6), kl_policy=-rng.uniform(5, 30, 6))
  d.update(ref=d["policy"] - rng.normal(0, 3, 6), kl_ref=d["kl_policy"] - rng.normal(0.5, 2, 6),
           desirable=np.array([1, 0, 1, 1, 0, 0.0]))
  hp = dict(beta=0.2, lambda_d=1.0, lambda_u=1.3)
  check(lambda a: L.kto_loss(L.UnpairedStats(a["policy"], a["ref"], a["desirable"] > 0,
                                             a["kl_policy"], a["kl_ref"]), **hp)[0],
        lambda x, _: ref.kto(x["policy"], x["ref"], x["desirable"] > 0, x["kl_policy"],
                             x["kl_ref"], **hp), d, wrt=("policy",))


@pytest.mark.parametrize("seed", SEEDS)
def test_apo_zero_unpaired(seed):
  rng = np.random.default_rng(seed)
  d = dict(policy=-rng.uniform(5, 30, 6))
  d.update(ref=d["policy"] - rng.normal(0, 3, 6), desirable=np.array([1, 0, 1, 1, 0, 0.0]))
  hp = dict(beta=0.2, lambda_d=1.0, lambda_u=1.3)
  check(lambda a: kto.apo_zero_unpaired_loss(L.UnpairedStats(a["policy"], a["ref"], a["desirable"] > 0),
                                             **hp)[0],
        lambda x, _: ref.apo_zero_unpaired(x["policy"], x["ref"], x["desirable"] > 0, **hp), d,
        wrt=("policy", "ref"))


@pytest.mark.parametrize("seed", SEEDS)
def test_npo(seed):
  rng = np.random.default_rng(seed)
  d = dict(policy=-rng.uniform(5, 30, 5))
  d["ref"] = d["policy"] - rng.normal(0, 3, 5)
  check(lambda a: L.npo_loss(L.UnpairedStats(a["policy"], a["ref"]), beta=0.1)[0],
        lambda x, _: ref.npo(x["policy"], x["ref"], beta=0.1), d, wrt=("policy",))


def list_data(seed, b=3, c=4):
  rng = np.random.default_rng(seed)
  policy = -rng.uniform(5, 30, (b, c))
  labels = np.stack([rng.permutation(c) for _ in range(b)]).astype(float)
  labels[0, 1] = labels[0, 2]  # a tie in the graded labels
  return dict(policy=policy, ref=policy - rng.normal(0, 3, (b, c)), labels=labels)


@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_plackett_luce(seed):
  check(lambda a: L.dpo_pl_loss(L.ListStats(a["policy"], a["labels"], a["ref"]), beta=0.2)[0],
        lambda d, _: ref.dpo_pl(d["policy"], d["ref"], d["labels"], beta=0.2), list_data(seed),
        wrt=("policy",))


@pytest.mark.parametrize("log_base", [2.0, np.e])
@pytest.mark.parametrize("seed", SEEDS)
def test_lipo_lambda(seed, log_base):
  def ref_fn(d, fixed):
    scores = 0.5 * (fixed["policy"] - fixed["ref"])  # tau is detached: ranks of the fixed scores
    return ref.lipo_lambda(d["policy"], d["ref"], d["labels"], 0.5, log_base, scores)
  check(lambda a: L.lipo_lambda_loss(L.ListStats(a["policy"], a["labels"], a["ref"]), beta=0.5,
                                     log_base=log_base)[0], ref_fn, list_data(seed),
        wrt=("policy",))


# ---- reward models and SFT ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_models(seed):
  rng = np.random.default_rng(seed)
  d = dict(rw=rng.normal(0, 2, 5), rl=rng.normal(0, 2, 5), margin=rng.uniform(0, 1, 5))
  check(lambda a: L.bradley_terry_loss(L.RewardPair(a["rw"], a["rl"], a["margin"]),
                                       center_coef=0.05)[0],
        lambda x, _: ref.bradley_terry(x["rw"], x["rl"], x["margin"], 0.05), d, wrt=("rw", "rl"))
  for scale in (1.0, 0.6):
    check(lambda a: L.thurstone_loss(L.RewardPair(a["rw"], a["rl"], a["margin"]), scale=scale, center_coef=0.05)[0],
          lambda x, _: ref.thurstone(x["rw"], x["rl"], x["margin"], scale, 0.05), d, wrt=("rw", "rl"))
  lists = list_data(seed)
  d = dict(r=lists["policy"] / 10, labels=lists["labels"])
  check(lambda a: L.all_pairs_ranking_loss(L.RewardList(a["r"], a["labels"]))[0],
        lambda x, _: ref.all_pairs_ranking(x["r"], x["labels"]), d, wrt=("r",))
  check(lambda a: L.plackett_luce_ranking_loss(L.RewardList(a["r"], a["labels"]))[0],
        lambda x, _: ref.plackett_luce_ranking(x["r"], x["labels"]), d, wrt=("r",))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sequence_sum"])
@pytest.mark.parametrize("seed", SEEDS)
def test_sft(seed, reduction):
  check(lambda a: L.sft_loss(L.TokenBatch(a["lp"], a["mask"]), reduction=reduction)[0],
        lambda d, _: ref.sft(d["lp"], d["mask"], reduction), token_data(seed), wrt=("lp",))


# ---- policy-gradient losses --------------------------------------------------------------------


def _ppo_ref(d, adv="adv", values=True, **hp):
  kw = dict(values=d["values"], v_old=d["v_old"], returns=d["returns"]) if values else {}
  return ref.ppo(d["lp"], d["mask"], d["old"], d[adv], entropy=d["entropy"], **kw, **hp)


TOKEN_LOSSES = [
    ("ppo", lambda b: L.ppo_loss(b), lambda d, f: _ppo_ref(d), ("lp", "values")),
    ("ppo-dual-clip-ent", lambda b: L.ppo_loss(b, eps_high=0.28, dual_clip=3.0, ent_coef=0.01),
     lambda d, f: _ppo_ref(d, eps_high=0.28, dual_clip=3.0, ent_coef=0.01),
     ("lp", "values", "entropy")),
    ("ppo-token-adv-noclipv-seqmean",
     lambda b: L.ppo_loss(b, eps_v=None, aggregation="seq_mean_token_mean"),
     lambda d, f: _ppo_ref(d, adv="adv_tok", eps_v=None, aggregation="seq_mean_token_mean"),
     ("lp", "values")),
    ("reinforce_pp", lambda b: L.reinforce_pp_loss(b),
     lambda d, f: _ppo_ref(d, values=False), ("lp",)),
    ("rkl", lambda b: L.rkl_loss(b, gamma=0.02),
     lambda d, f: _ppo_ref(d, ent_coef=0.02), ("lp", "values", "entropy")),
    ("grpo", lambda b: L.grpo_loss(b),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"]), ("lp",)),
    ("grpo-token-mean", lambda b: L.grpo_loss(b, beta=0.1, eps_high=0.3, aggregation="token_mean"),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 0.2, 0.3, 0.1,
                           "token_mean"), ("lp",)),
    ("grpo-kl-bias-correction", lambda b: L.grpo_loss(b, beta=0.3, kl_bias_correction=True),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], beta=0.3, kl_bias_correction=True),
     ("lp",)),
    ("grpo-seq-sum", lambda b: L.grpo_loss(b, aggregation="seq_mean_token_sum"),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"],
                           aggregation="seq_mean_token_sum"), ("lp",)),
    ("grpo-on-policy", lambda b: L.grpo_loss(b._replace(old_logps=None)),
     lambda d, f: ref.grpo(d["lp"], d["mask"], f["lp"], d["refl"], d["adv"]), ("lp",)),
    ("dr_grpo", lambda b: L.dr_grpo_loss(b, max_len=8, beta=0.04),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], beta=0.04,
                           aggregation="constant", max_len=8), ("lp",)),
    ("dapo", lambda b: L.dapo_loss(b),
     lambda d, f: ref.grpo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 0.2, 0.28, 0.0,
                           "token_mean"), ("lp",)),
    ("gspo-eps0.2", lambda b: L.gspo_loss(b, eps_low=0.2, eps_high=0.2, beta=0.04),
     lambda d, f: ref.gspo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 0.2, 0.2, 0.04),
     ("lp",)),
    ("gspo-token-weighted", lambda b: L.gspo_loss(b, eps_low=0.1, eps_high=0.1,
                                                  aggregation="token_mean"),
     lambda d, f: ref.gspo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 0.1, 0.1,
                           aggregation="token_mean"), ("lp",)),
    ("gspo-default", lambda b: L.gspo_loss(b),
     lambda d, f: ref.gspo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"]), ("lp",)),
    ("gspo_token", lambda b: L.gspo_token_loss(b, eps_low=0.2, eps_high=0.2, beta=0.04),
     lambda d, f: ref.gspo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 0.2, 0.2, 0.04),
     ("lp",)),
    ("cispo", lambda b: L.cispo_loss(b, eps_max=1.2),
     lambda d, f: ref.cispo(d["lp"], d["mask"], d["old"], d["refl"], d["adv"], 1.2,
                            weight_lp=f["lp"]), ("lp",)),
    ("cispo-lower-kl-seqmean",
     lambda b: L.cispo_loss(b, eps_max=1.1, eps_min=0.9, beta=0.04,
                            aggregation="seq_mean_token_mean"),
     lambda d, f: ref.cispo(d["lp"], d["mask"], d["old"], d["refl"], d["adv_tok"], 1.1, 0.9, 0.04,
                            "seq_mean_token_mean", weight_lp=f["lp"]), ("lp",)),
    ("reinforce", lambda b: L.reinforce_loss(b),
     lambda d, f: ref.reinforce(d["lp"], d["mask"], d["adv"]), ("lp",)),
    ("rloo", lambda b: L.rloo_loss(b),
     lambda d, f: ref.reinforce(d["lp"], d["mask"], d["adv"], d["old"], 0.2), ("lp",)),
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, fn, ref_fn, wrt", TOKEN_LOSSES, ids=[c[0] for c in TOKEN_LOSSES])
def test_token_losses(name, fn, ref_fn, wrt, seed):
  adv = "adv_tok" if name in ("ppo-token-adv-noclipv-seqmean", "cispo-lower-kl-seqmean") else "adv"
  check(lambda a: fn(token_batch(a, adv))[0], ref_fn, token_data(seed), wrt=wrt)


# ---- building blocks (values; advantages are detached) -------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_building_blocks(seed):
  d = token_data(seed)
  rng = np.random.default_rng(seed)
  a = {k: jnp.asarray(v) for k, v in d.items()}
  close = lambda x, y: np.testing.assert_allclose(np.asarray(x), y, **VAL)
  for kind in ("k1", "k2", "k3"):
    close(L.kl_estimate(a["lp"], a["refl"], kind), ref.kl_token(d["lp"], d["refl"], kind))
  close(L.kl_penalty(L.TokenBatch(a["lp"], a["mask"], ref_logps=a["refl"])),
        ref.sequence_kl(d["lp"], d["refl"], d["mask"], "k2"))
  score = rng.normal(0, 1, 4)
  for kind in ("k1", "k3"):
    close(L.kl_shaped_rewards(score, a["old"], a["refl"], a["mask"], beta=0.1, estimator=kind)[0],
          ref.kl_shaped_rewards(score, d["old"], d["refl"], d["mask"], 0.1, kind))
  adv, ret = L.gae(a["returns"], a["values"], a["mask"], gamma=0.9, lam=0.8)
  ref_adv, ref_ret = ref.gae(d["returns"], d["values"], d["mask"], 0.9, 0.8)
  close(adv, ref_adv)
  close(ret, ref_ret)
  for ddof, shift in [(1, True), (0, True), (1, False)]:
    close(L.whiten(a["values"], a["mask"], ddof=ddof, shift_mean=shift),
          ref.whiten(d["values"], d["mask"], ddof, shift))
  small = d["values"] * 1e-3  # std near eps: the two placements of eps differ
  close(L.whiten(jnp.asarray(small), a["mask"], eps=1e-4, eps_on="std"),
        ref.whiten(small, d["mask"], 1, True, 1e-4, "std"))
  close(L.reinforce_pp_advantages(a["returns"], a["mask"]),
        ref.reinforce_pp_advantages(d["returns"], d["mask"]))
  lengths = rng.integers(0, 30, 8).astype(float)
  close(L.overlong_penalty(lengths, max_len=20, cache_len=8), ref.overlong_penalty(lengths, 20, 8))


@pytest.mark.parametrize("seed", SEEDS)
def test_group_advantages(seed):
  rng = np.random.default_rng(seed)
  ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # unequal groups, one singleton
  rewards = rng.normal(0, 1, ids.size)
  close = lambda x, y: np.testing.assert_allclose(np.asarray(x), y, **VAL)
  for scale in ("group", "batch", "none"):
    for ddof, eps in [(1, 1e-4), (0, 1e-2)]:
      close(L.grpo_advantages(rewards, ids, 4, scale=scale, ddof=ddof, eps=eps),
            ref.group_advantages(rewards, ids, scale, ddof, eps))
  close(L.rloo_advantages(rewards, ids, 4), ref.rloo_advantages(rewards, ids))
  d = token_data(seed, b=ids.size)
  step_mask = (rng.random(d["mask"].shape) < 0.4) * d["mask"]
  close(L.process_advantages(d["returns"], step_mask, d["mask"], ids, 4),
        ref.process_advantages(d["returns"], step_mask, d["mask"], ids))
  close(L.normalize_scores(rewards, mean=0.3, std=2.0, clip=0.4),
        np.clip((rewards - 0.3) / 2.0, -0.4, 0.4))


@pytest.mark.parametrize("seed", SEEDS)
def test_packing(seed):
  rng = np.random.default_rng(seed)
  seg = np.sort(rng.integers(0, 4, (3, 12)), axis=1)[:, ::-1].copy()  # segments 3,2,1 then pad 0
  loss_mask = (rng.random((3, 12)) < 0.8).astype(float)
  mask = L.packed_loss_mask(jnp.asarray(loss_mask), jnp.asarray(seg))
  np.testing.assert_array_equal(np.asarray(mask), ref.packed_loss_mask(loss_mask, seg))
  x = rng.normal(0, 1, (3, 11))
  np.testing.assert_allclose(np.asarray(L.segment_sums(x, mask, seg[:, 1:], 3)),
                             ref.segment_sums(x, np.asarray(mask), seg[:, 1:], 3), **VAL)


@pytest.mark.parametrize("seed", SEEDS)
def test_orpo_nll_on_prompt_and_completion(seed):
  data = {**pair_data(seed), "pp": -np.random.default_rng(seed).uniform(5, 40, 5),
          "np": np.random.default_rng(seed + 1).integers(3, 30, 5).astype(float)}
  batch = lambda a: pair_batch(a)._replace(prompt_chosen=a["pp"], n_prompt=a["np"])
  check(lambda a: L.orpo_loss(batch(a), lam=0.1, nll_tokens="prompt_and_completion")[0],
        lambda d, _: ref.orpo_prompt_nll(d, lam=0.1), data, wrt=("pc", "pr", "pp"))
  with pytest.raises(ValueError, match="prompt_chosen"):
    L.orpo_loss(pair_batch({k: jnp.asarray(v) for k, v in data.items()}), nll_tokens="prompt_and_completion")


@pytest.mark.parametrize("seed", SEEDS)
def test_rloo_empty_completions_conventions(seed):
  """An empty completion: TRL keeps its constant -A_i (ratio 1) in the loss value ("constant", which the
  float64 reference does too: it sums no tokens); "no_loss" leaves it out of the numerator, not out of N."""
  d = token_data(seed)
  d["mask"] = d["mask"].copy()
  d["mask"][1] = 0.0  # row 1 has no completion tokens
  for mode in ("constant", "no_loss"):
    def expected(x, _, mode=mode):
      value = ref.reinforce(x["lp"], x["mask"], x["adv"], x["old"], 0.2)
      return value if mode == "constant" else value + x["adv"][1] / len(x["adv"])  # drop its -A_1 / N
    check(lambda a, mode=mode: L.rloo_loss(token_batch(a), empty_completions=mode)[0], expected, d, wrt=("lp",))
  a = {k: jnp.asarray(v) for k, v in d.items()}
  assert abs(float(L.rloo_loss(token_batch(a), empty_completions="constant")[0]) - float(
      L.rloo_loss(token_batch(a))[0])) > 1e-6  # the two conventions differ here


@pytest.mark.parametrize("seed", SEEDS)
def test_mixture_is_the_weighted_sum_of_its_components(seed):
  """TRL's loss_type list with loss_weights (MPO: 0.8 sigmoid + 0.2 bco_pair + 1.0 sft), by formula name."""
  fn = L.get("0.8*dpo + 0.2 * bco + chosen_nll")
  expected = lambda d, _: (0.8 * ref.dpo(d, beta=0.2) + 0.2 * ref.bco(d, beta=0.2, delta=0.1)
                           + ref.chosen_nll(d, "token_mean"))
  check(lambda a: fn(pair_batch(a), beta=0.2, delta=0.1)[0], expected, pair_data(seed), wrt=("pc", "pr"))


def test_mixture_registration_is_derived_from_its_components():
  spec = L.spec("0.8*dpo + 0.2*bco + chosen_nll")
  assert spec.reference == "required" and spec.inputs is L.PairStats and spec.exact_accumulation
  assert set(spec.counts) == {"num_pairs", "num_tokens"} and spec.running == {"delta": "bco/bco/reward_mean"}
  assert L.spec("simpo + chosen_nll").reference == "none" and not L.spec("0.5*aot + dpo").exact_accumulation
  _, metrics = L.get("dpo + 0.5*chosen_nll")(pair_batch({k: jnp.asarray(v) for k, v in pair_data(11).items()}))
  assert {"loss", "dpo/loss", "chosen_nll/loss", "rewards/accuracies", "dpo/rewards/accuracies"} <= set(metrics)
  for bad, message in [("dpo + kto", "different inputs"), ("dpo + dpo", "twice"), ("0.x*dpo + sft", "term"),
                       ("dpo + nope", "unknown loss 'nope'")]:
    with pytest.raises(KeyError, match=message):
      L.spec(bad)
