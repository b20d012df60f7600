"""Every worked example of OBJECTIVES.md, in float32, at rtol=1e-5, atol=1e-6.

Expected numbers are copied from OBJECTIVES.md (section given in each test), never computed by the
code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses as L

RTOL, ATOL = 1e-5, 1e-6
f32 = lambda x: jnp.asarray(x, jnp.float32)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=rtol, atol=atol)


def p2(**kw):
  """The shared pairwise fixture P2 of OBJECTIVES.md §9.0."""
  return L.PairStats(policy_chosen=f32([-10.0, -9.0]), policy_rejected=f32([-12.0, -8.0]),
                     ref_chosen=f32([-11.0, -8.5]), ref_rejected=f32([-11.5, -7.8]),
                     n_chosen=f32([5, 4]), n_rejected=f32([8, 3]), **kw)


def per_pair(fn, batch, **hp):
  """Per-pair losses: the loss evaluated on each pair alone."""
  return [float(fn(jax.tree.map(lambda x: x[i:i + 1], batch), **hp)[0]) for i in range(2)]


# ---- §1 building blocks --------------------------------------------------------------------------


def test_packing_boundary_mask_1_3():
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
  lp = f32([[-0.9, -0.4, -3.0, -0.6, -0.2, -0.8]])
  m = L.packed_loss_mask(jnp.ones((1, 7)), seg)
  close(m, [[1, 1, 0, 1, 1, 1]])
  close(L.sft_loss(L.TokenBatch(lp, m))[0], 0.580000)
  close(L.sft_loss(L.TokenBatch(lp, jnp.ones_like(lp)))[0], 0.983333)
  close(L.segment_sums(lp, m, seg[:, 1:], 2), [[-1.3, -1.6]])
  close(L.segment_sums(jnp.ones_like(lp), m, seg[:, 1:], 2), [[2, 3]])


def test_kl_estimators_1_4():
  lq, lref = f32([-1.0, -2.0, -0.5]), f32([-1.2, -1.5, -0.5])
  close(L.k1(lq, lref), [0.2, -0.5, 0])
  close(L.k2(lq, lref), [0.02, 0.125, 0])
  close(L.k3(lq, lref), [0.0187308, 0.1487213, 0])
  close(L.sequence_kl(lq[None], lref[None], jnp.ones((1, 3)), "k1"), [-0.3])
  close(L.sequence_kl(lq[None], lref[None], jnp.ones((1, 3)), "k3"), [0.1674521])


# ---- §2 SFT, §3 reward models --------------------------------------------------------------------


def test_sft_reductions_2():
  batch = L.TokenBatch(f32([[-0.5, -1.0, -2.0, 0], [-0.2, -0.3, 0, 0]]),
                       f32([[1, 1, 1, 0], [1, 1, 0, 0]]))
  close(L.sft_loss(batch)[0], 0.800000)
  close(L.sft_loss(batch, reduction="sequence_mean")[0], 0.708333)
  close(L.sft_loss(batch, reduction="sequence_sum")[0], 2.000000)


def test_bradley_terry_3_1():
  r_w, r_l, margin = f32([1.2, 0.3]), f32([0.4, 0.5]), f32([0.5, 0.0])
  plain = L.RewardPair(r_w, r_l)
  close([L.bradley_terry_loss(L.RewardPair(r_w[i:i + 1], r_l[i:i + 1]), center_coef=0.0)[0]
         for i in range(2)], [0.371101, 0.798139])
  close(L.bradley_terry_loss(plain, center_coef=0.0)[0], 0.584620)
  close(L.bradley_terry_loss(L.RewardPair(r_w, r_l, margin), center_coef=0.0)[0], 0.676247)
  loss, metrics = L.bradley_terry_loss(L.RewardPair(r_w, r_l, margin), center_coef=0.01)
  close(0.01 * metrics["center_term"], 0.016000)
  close(loss, 0.692247)
  close(metrics["accuracy"], 0.5)


def test_kwise_reward_3_2():
  batch = L.RewardList(f32([[0.9, 0.2, -0.4]]), f32([[2, 1, 0]]))
  close(L.all_pairs_ranking_loss(batch)[0], 0.360561)
  close(L.plackett_luce_ranking_loss(batch)[0], 1.007969)


# ---- §4-§5 PPO -----------------------------------------------------------------------------------

LP_OLD = f32([[-1.0, -0.5, -2.0, -0.1]])
LP_REF = f32([[-1.1, -0.7, -1.5, -0.1]])
V_OLD = f32([[0.5, 0.6, 0.4, 0.8]])
MASK4 = jnp.ones((1, 4), jnp.float32)


def test_ppo_worked_example_5_3():
  rewards, _ = L.kl_shaped_rewards(f32([1.0]), LP_OLD, LP_REF, MASK4, beta=0.05)
  close(rewards, [[-0.005, -0.010, 0.025, 1.000]])
  adv, ret = L.gae(rewards, V_OLD, MASK4, gamma=1.0, lam=0.95)
  close(adv, [[0.450537, 0.374250, 0.615000, 0.200000]])
  close(ret, [[0.950537, 0.974250, 1.015000, 1.000000]])
  close(L.whiten(adv, MASK4, ddof=0), [[0.272049, -0.239250, 1.374321, -1.407120]])
  adv_w = L.whiten(adv, MASK4)
  close(adv_w, [[0.235602, -0.207197, 1.190197, -1.218602]])
  lp_new = f32([[-0.7, -0.5, -2.3, -0.05]])
  ratio = jnp.exp(lp_new - LP_OLD)
  close(ratio, [[1.349859, 1.0, 0.740818, 1.051271]])
  pg, _ = L.clipped_surrogate(ratio, adv_w, eps_low=0.2, eps_high=0.2)
  close(pg, [[-0.282722, 0.207197, -0.881720, 1.281081]])
  v_new = f32([[0.9, 0.5, 0.1, 1.0]])
  vf, _ = L.clipped_value_loss(v_new, V_OLD, ret, eps_v=0.2)
  close(vf, [[0.031385, 0.112457, 0.418613, 0.0]])
  batch = L.TokenBatch(lp_new, MASK4, old_logps=LP_OLD, advantages=adv_w, returns=ret,
                       values=v_new, old_values=V_OLD)
  loss, m = L.ppo_loss(batch, eps=0.2, eps_v=0.2, vf_coef=0.1)
  close(m["loss/policy"], 0.080959)
  close(m["policy/clipfrac"], 0.25)
  close(m["loss/value"], 0.140613)
  close(m["val/clipfrac"], 0.25)
  close(m["policy/approxkl"], 0.022812)
  close(loss, 0.095020)


# ---- §6 GRPO family ------------------------------------------------------------------------------

G_MASK = f32([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
G_OLD = f32([[-1.0, -0.5, 0], [-0.7, -1.2, -0.3], [-2.0, 0, 0], [-0.4, -0.9, 0]])
G_NEW = f32([[-0.8, -0.5, 0], [-0.9, -1.0, -0.3], [-2.2, 0, 0], [-0.1, -0.9, 0]])
G_REF = f32([[-1.1, -0.6, 0], [-0.7, -1.1, -0.4], [-1.9, 0, 0], [-0.5, -1.0, 0]])
G_R = f32([1, 0, 0, 1])
G_IDS = jnp.zeros(4, jnp.int32)
A_TRL = [0.865875, -0.865875, -0.865875, 0.865875]


def group_batch(adv):
  return L.TokenBatch(G_NEW, G_MASK, old_logps=G_OLD, ref_logps=G_REF, advantages=f32(adv))


def test_grpo_advantages_6_4():
  close(L.grpo_advantages(G_R, G_IDS, 1), A_TRL)
  close(L.grpo_advantages(G_R, G_IDS, 1, ddof=0), [0.999800, -0.999800, -0.999800, 0.999800])
  close(L.grpo_advantages(G_R, G_IDS, 1, scale="none"), [0.5, -0.5, -0.5, 0.5])


def test_grpo_losses_6_4():
  close(L.k3(G_NEW, G_REF) * G_MASK, [[0.040818, 0.004837, 0], [0.021403, 0.004837, 0.004837],
                                      [0.049859, 0, 0], [0.070320, 0.004837, 0]])
  loss, m = L.grpo_loss(group_batch(A_TRL), beta=0.04, eps_low=0.2, eps_high=0.2)
  close(loss, -0.078431)
  close(m["kl"], 0.025219)
  close(m["clip_ratio/high_mean"], 0.25)
  close(m["clip_ratio/low_mean"], 0.0)
  close(L.grpo_loss(group_batch(A_TRL), beta=0.04, aggregation="token_mean")[0], -0.057561)
  close(L.dr_grpo_loss(group_batch([0.5, -0.5, -0.5, 0.5]), beta=0.04, max_len=3)[0], -0.021875)
  loss, m = L.dapo_loss(group_batch(A_TRL))
  close(loss, -0.069545)
  close(m["clip_ratio/high_mean"], 0.125)


def test_gspo_6_5():
  rows = [jax.tree.map(lambda x: x[i:i + 1], group_batch(A_TRL)) for i in range(4)]
  close([L.gspo_loss(r, eps_low=0.2, eps_high=0.2)[1]["ratio/mean"] for r in rows],
        [1.105171, 1.0, 0.818731, 1.161834])
  close([L.gspo_loss(r, eps_low=0.2, eps_high=0.2)[0] for r in rows],
        [-0.956940, 0.865875, 0.708919, -1.006004])
  close(L.gspo_loss(group_batch(A_TRL), eps_low=0.2, eps_high=0.2)[0], -0.097037)
  close(L.gspo_loss(group_batch(A_TRL), eps_low=0.2, eps_high=0.2, aggregation="token_mean")[0],
        -0.077418)
  close(L.gspo_loss(group_batch(A_TRL))[0], -0.000238)  # default eps 3e-4 / 4e-4


def test_cispo_6_6():
  batch = group_batch(A_TRL)
  loss, m = L.cispo_loss(batch, eps_max=1.2)
  close(loss, -0.168636)
  close(m["cispo_clip_ratio"], 0.25)
  grad = jax.grad(lambda lp: L.cispo_loss(batch._replace(logps=lp), eps_max=1.2)[0])(G_NEW)
  expected = [[-1.039051, -0.865875, 0], [0.708919, 1.039051, 0.865875], [0.708919, 0, 0],
              [-1.039051, -0.865875, 0]]
  close(grad * 8.0, expected)
  w = (grad * 8.0) / -f32(A_TRL)[:, None]
  close(w, [[1.2, 1.0, 0], [0.818731, 1.2, 1.0], [0.818731, 0, 0], [1.2, 1.0, 0]])


# ---- §7 REINFORCE family -------------------------------------------------------------------------

S_THETA = f32([[-3.0], [-2.0], [-4.0], [-1.5]])  # sequence log-probs as one-token rows


def test_rloo_7_2():
  r = f32([1.0, 0.5, 0.0, 0.3])
  adv = L.rloo_advantages(r, G_IDS, 1)
  close(adv, [0.733333, 0.066667, -0.6, -0.2])
  close(r - adv, [0.266667, 0.433333, 0.6, 0.5])  # the baseline b_i
  close(L.reinforce_loss(L.TokenBatch(S_THETA, jnp.ones((4, 1)), advantages=adv))[0], -0.091667)


def test_remax_7_3():
  adv = L.remax_advantages(f32([1.0, 0.5, 0.0, 0.3]), f32(0.6))
  close(adv, [0.4, -0.1, -0.6, -0.3])
  close(L.reinforce_loss(L.TokenBatch(S_THETA, jnp.ones((4, 1)), advantages=adv))[0], -0.462500)


def test_reinforce_pp_7_4():
  lp_old = f32([[-1.0, -0.5, -2.0], [-0.3, -0.2, 0.0]])
  lp_ref = f32([[-1.1, -0.7, -1.5], [-0.2, -0.2, 0.0]])
  mask = f32([[1, 1, 1], [1, 1, 0]])
  rewards, _ = L.kl_shaped_rewards(f32([1.0, 0.2]), lp_old, lp_ref, mask, beta=0.01)
  returns, _ = L.gae(rewards, jnp.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
  close(returns, [[1.002, 1.003, 1.005], [0.201, 0.200, 0]])
  adv = L.reinforce_pp_advantages(rewards, mask)
  close(adv, [[0.727262, 0.729536, 0.734084], [-1.094304, -1.096579, 0]])


def test_best_of_n_8_1():
  best, worst, distinct = L.best_worst(f32([[0.2, 0.9, 0.5, 0.9]]))
  assert int(best[0]) == 1 and int(worst[0]) == 0 and bool(distinct[0])


# ---- §9 direct objectives ------------------------------------------------------------------------


def test_pair_metrics_9_0():
  _, m = L.dpo_loss(p2(), beta=0.1)
  close(m["rewards/chosen"], 0.025)
  close(m["rewards/rejected"], -0.035)
  close(m["rewards/margins"], 0.06)
  close(m["rewards/accuracies"], 0.5)
  close(m["logps/chosen"], -9.5)
  close(m["logps/rejected"], -10.0)


def test_dpo_9_1_and_gradient_coefficient_11():
  close(per_pair(L.dpo_loss, p2(), beta=0.1), [0.620957, 0.708260])
  close(L.dpo_loss(p2(), beta=0.1)[0], 0.664608)
  grad = jax.grad(lambda b: L.dpo_loss(b, beta=0.1)[0])(p2())
  close(2 * grad.policy_chosen, [-0.046257, -0.050750])
  close(2 * grad.policy_rejected, [0.046257, 0.050750])
  close(-2 * grad.policy_chosen[0], 0.046257)  # §11: c(y_w) for pair 1


@pytest.mark.parametrize("fn, hp, pairs, mean", [
    (L.cdpo_loss, dict(beta=0.1, eps=0.1), [0.635957, 0.705260], 0.670608),
    (L.robust_dpo_loss, dict(beta=0.1, eps=0.1), [0.602207, 0.712010], 0.657108),
    (L.ipo_loss, dict(tau=0.1), [12.25, 28.09], 20.170000),
    (L.ipo_loss, dict(tau=0.1, length_normalize=True), [22.443906, 25.586736], 24.015321),
    (L.hinge_loss, dict(beta=0.1), [0.85, 1.03], 0.940000),
    (L.slic_loss, dict(delta=1.0, lambda_reg=0.0), [0.0, 2.0], 1.000000),
    (L.rdpo_loss, dict(beta=0.1, alpha=0.02), [0.649159, 0.698160], 0.673660),
    (L.dpop_loss, dict(beta=0.1, lam=5.0), [0.620957, 0.842915], 0.731936),
    (L.f_dpo_loss, dict(divergence="forward_kl"), [0.631154, 0.714741], 0.672948),
    (L.f_dpo_loss, dict(divergence="js"), [0.660652, 0.701983], 0.681317),
    (L.f_dpo_loss, dict(divergence="alpha", alpha=0.5), [0.627691, 0.711193], 0.669442),
    (L.nca_loss, dict(beta=0.1), [1.350825, 1.394288], 1.372556),
    (L.bco_loss, dict(beta=0.1, delta=0.02), [1.312707, 1.402107], 1.357407),
    (L.simpo_loss, dict(beta=2.0, gamma=0.5), [1.701413, 0.540306], 1.120859),
])
def test_pairwise_examples_9(fn, hp, pairs, mean):
  close(per_pair(fn, p2(), **hp), pairs)
  close(fn(p2(), **hp)[0], mean)


def test_ipo_averaged_margin_9_4():
  _, m = L.ipo_loss(p2(), tau=1.0, length_normalize=True)
  close(m["rewards/margins"], np.mean([0.2625, -0.058333]))


def test_rdpo_sign_9_6():
  loss = L.rdpo_loss(p2(), beta=0.1, alpha=0.02)[0]
  assert abs(float(loss) - 0.656055) > 1e-3  # the sign-flipped implementation's value
  close(L.rdpo_loss(p2(), beta=0.1, alpha=-0.02)[0], 0.656055)


def test_dpop_penalty_9_7():
  _, m = L.dpop_loss(p2(), beta=0.1, lam=5.0)
  close(m["dpop/penalty"], np.mean([0.0, 0.5]))
  close(m["dpop/active_fraction"], 0.5)


def test_kto_9_11():
  batch = L.UnpairedStats(policy=f32([-6, -9, -7, -5]), ref=f32([-6.5, -9.2, -6.4, -5.3]),
                          desirable=jnp.array([True, True, False, False]),
                          kl_policy=f32([-8, -10, -7.5, -6]), kl_ref=f32([-8.1, -10.3, -7.4, -6.2]))
  close(L.kto_reference_point(batch), 0.125)
  per_example = [L.kto_loss(jax.tree.map(lambda x: x[i:i + 1], batch), z0=0.125)[0]
                 for i in range(4)]
  close(per_example, [0.490626, 0.498125, 0.481883, 0.504375])
  loss, m = L.kto_loss(batch, beta=0.1)
  close(loss, 0.493752)
  close(m["kl"], 0.125)
  close(L.kto_loss(batch, beta=0.1, lambda_u=1.33)[0], 0.575119)
  shifted = batch._replace(kl_policy=batch.kl_policy - 1.0)
  close(L.kto_reference_point(shifted), 0.0)


def test_cpo_9_12():
  close(per_pair(L.cpo_loss, p2(), alpha=0.0), [0.598139, 0.744397])
  loss, m = L.cpo_loss(p2())
  close(m["nll_loss"], 2.111111)
  close(loss, 2.782379)
  loss, m = L.cpo_loss(p2(), nll_reduction="sequence_sum")
  close(m["nll_loss"], 9.5)
  close(loss, 10.171268)


def test_simpo_rewards_and_gradient_9_13():
  _, m = L.simpo_loss(p2(), beta=2.0, gamma=0.5)
  close(m["rewards/chosen"], np.mean([-4.0, -4.5]))
  close(m["rewards/rejected"], np.mean([-3.0, -5.333333]))
  grad = jax.grad(lambda b: L.simpo_loss(b, beta=2.0, gamma=0.5)[0])(p2())
  close(2 * grad.policy_chosen, [-0.327030, -0.208715])


def test_orpo_9_14():
  odds = [L.orpo_loss(jax.tree.map(lambda x: x[i:i + 1], p2()))[1] for i in range(2)]
  close([m["log_odds_chosen"] for m in odds], [-0.607069, 0.456029])
  close([m["or_loss"] for m in odds], [1.042058, 0.490906])
  loss, m = L.orpo_loss(p2(), lam=0.1)
  close(m["nll_loss"], 2.111111)
  close(loss, 2.187759)


def test_rpo_9_15():
  close(L.rpo_loss(p2(), beta=0.1, alpha=1.0)[0], 2.789608)
  close(L.rpo_loss(p2(), beta=0.1, alpha=1.0, nll_reduction="token_mean")[0], 2.775719)


def test_npo_9_16():
  batch = L.UnpairedStats(policy=f32([-0.5, 1.0]), ref=f32([0.0, 0.0]))
  close([L.npo_loss(jax.tree.map(lambda x: x[i:i + 1], batch))[0] for i in range(2)],
        [13.369193, 14.887933])
  close(L.npo_loss(batch, beta=0.1)[0], 14.128563)


def test_dpo_plackett_luce_9_17():
  batch = L.ListStats(policy=f32([[0.4, -0.1, 0.2]]), labels=f32([[2, 1, 0]]),
                      ref=jnp.zeros((1, 3)))
  close(L.dpo_pl_loss(batch, beta=0.1)[0], 1.783749)


def test_lipo_lambda_9_18():
  batch = L.ListStats(policy=f32([[0.2, 0.5, -0.3, 0.1]]), labels=f32([[3, 1, 2, 0]]),
                      ref=jnp.zeros((1, 4)))
  assert L.descending_ranks(batch.policy).tolist() == [[2, 1, 4, 3]]
  close(L.lipo_lambda_loss(batch, beta=1.0)[0], 4.642097)
  close(L.lipo_lambda_loss(batch, beta=1.0, log_base=np.e)[0], 6.697130)


# ---- §10 Yun et al. ------------------------------------------------------------------------------


def test_pmle_10_2():
  batch = L.PairStats(policy_chosen=f32([-10.0]), policy_rejected=f32([-12.0]))
  close(L.pmle_loss(batch, gamma=0.5)[0], 0.313262)


def test_preference_distillation_10_3():
  batch = L.PairStats(policy_chosen=f32([-10.0]), policy_rejected=f32([-12.0]),
                      score_chosen=f32([1.3]), score_rejected=f32([-0.7]))
  loss, m = L.preference_distillation_loss(batch, gamma=0.5)
  close(loss, 0.432465)
  close(m["distill/kl"], 0.067131)
  close(loss - m["distill/kl"], 0.365334)
  close(m["distill/abs_error"], 0.880797 - 0.731059)


def test_rkl_10_4():
  rewards, m = L.rkl_token_rewards(f32([1.0]), f32([[-2.0, -3.0]]), f32([[-2.5, -3.0]]),
                                   jnp.ones((1, 2)), gamma=0.01, beta=0.05)
  close(jnp.sum(rewards), 1.025000)
  close(m["rkl/objective"], -1.025000)
