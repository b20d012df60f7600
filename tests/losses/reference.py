"""Independent float64 NumPy references, written from the formulas of OBJECTIVES.md.

Plain loops over rows, tokens and pairs; nothing here imports jaxalign. "Detached" quantities of the
JAX code (lp_old, CISPO's weight, KTO's z0, LiPO's lambda weights, BCO's delta) are explicit inputs
or are computed from inputs that the gradient tests hold fixed.
"""

import math

import numpy as np


def logsig(x):
  return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def sigmoid(x):
  return np.exp(logsig(x))


def lse(values):
  values = np.asarray(values, np.float64)
  top = values.max()
  return top + math.log(np.exp(values - top).sum())


# ---- §1 building blocks --------------------------------------------------------------------------


def kl_token(lp, lp_ref, kind):
  d = lp - lp_ref
  return {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) - 1.0 + d}[kind]


def valid_tokens(mask, b):
  return [t for t in range(mask.shape[1]) if mask[b, t] > 0]


def mean_var(values, ddof):
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return 0.0, 0.0
  mean = values.mean()
  dof = values.size - ddof
  return mean, (((values - mean) ** 2).sum() / dof if dof > 0 else 0.0)


def whiten(x, mask, ddof=1, shift_mean=True, eps=1e-8, eps_on="variance"):
  mean, var = mean_var(x[mask > 0], ddof)
  out = (x - mean) / (math.sqrt(var + eps) if eps_on == "variance" else math.sqrt(var) + eps)
  if not shift_mean:
    out = out + mean
  return np.where(mask > 0, out, 0.0)


def gae(rewards, values, mask, gamma, lam):
  """Naive backward loop over the valid tokens of each row."""
  adv = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    next_value, running = 0.0, 0.0
    for t in reversed(valid_tokens(mask, b)):
      delta = rewards[b, t] + gamma * next_value - values[b, t]
      running = delta + gamma * lam * running
      adv[b, t] = running
      next_value = values[b, t]
  return adv, np.where(mask > 0, adv + values, 0.0)


def packed_loss_mask(loss_mask, seg):
  b_size, t_size = seg.shape
  out = np.zeros((b_size, t_size - 1))
  for b in range(b_size):
    for t in range(t_size - 1):
      same = seg[b, t + 1] == seg[b, t] and seg[b, t + 1] != 0
      out[b, t] = loss_mask[b, t + 1] * float(same)
  return out


def segment_sums(x, mask, seg, num_segments):
  out = np.zeros((x.shape[0], num_segments))
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if seg[b, t] > 0 and mask[b, t] > 0:
        out[b, seg[b, t] - 1] += x[b, t]
  return out


def kl_shaped_rewards(score, lp_old, lp_ref, mask, beta, kind="k1"):
  rewards = np.zeros_like(lp_old)
  for b in range(lp_old.shape[0]):
    valid = valid_tokens(mask, b)
    for t in valid:
      rewards[b, t] = -beta * kl_token(lp_old[b, t], lp_ref[b, t], kind)
    if valid:
      rewards[b, valid[-1]] += score[b]
  return rewards


def group_advantages(rewards, ids, scale="group", ddof=1, eps=1e-4):
  adv = np.zeros_like(rewards)
  for i in range(rewards.size):
    group = rewards[ids == ids[i]]
    mean, var = mean_var(group, ddof)
    adv[i] = rewards[i] - mean
    if scale == "group":
      adv[i] /= math.sqrt(var) + eps
  if scale == "batch":
    adv /= math.sqrt(mean_var(rewards, ddof)[1]) + eps
  return adv


def process_advantages(step_rewards, step_mask, mask, ids, ddof=1, eps=1e-4):
  """DeepSeekMath process supervision: normalise all step rewards of a group, then suffix sums."""
  adv = np.zeros_like(step_rewards)
  for b in range(step_rewards.shape[0]):
    group = [step_rewards[j, t] for j in range(step_rewards.shape[0]) if ids[j] == ids[b]
             for t in range(step_rewards.shape[1]) if step_mask[j, t] > 0]
    mean, var = mean_var(group, ddof)
    for t in range(step_rewards.shape[1]):
      if mask[b, t] > 0:
        adv[b, t] = sum((step_rewards[b, s] - mean) / (math.sqrt(var) + eps)
                        for s in range(t, step_rewards.shape[1]) if step_mask[b, s] > 0)
  return adv


def rloo_advantages(rewards, ids):
  adv = np.zeros_like(rewards)
  for i in range(rewards.size):
    others = [rewards[j] for j in range(rewards.size) if ids[j] == ids[i] and j != i]
    adv[i] = rewards[i] - np.mean(others) if others else 0.0
  return adv


def reinforce_pp_advantages(rewards, mask, ddof=1):
  returns = np.zeros_like(rewards)
  for b in range(rewards.shape[0]):
    total = 0.0
    for t in reversed(valid_tokens(mask, b)):
      total += rewards[b, t]
      returns[b, t] = total
  return whiten(returns, mask, ddof=ddof)


def overlong_penalty(lengths, max_len, cache_len):
  out = []
  for n in lengths:
    if n <= max_len - cache_len:
      out.append(0.0)
    elif n <= max_len:
      out.append(((max_len - cache_len) - n) / cache_len)
    else:
      out.append(-1.0)
  return np.array(out)


def aggregate(per_token, mask, mode, max_len=None):
  b_size = per_token.shape[0]
  rows = [sum(per_token[b, t] for t in valid_tokens(mask, b)) for b in range(b_size)]
  counts = [len(valid_tokens(mask, b)) for b in range(b_size)]
  if mode == "token_mean":
    return sum(rows) / max(sum(counts), 1)
  if mode == "seq_mean_token_mean":
    return sum(r / c for r, c in zip(rows, counts) if c > 0) / b_size
  if mode == "seq_mean_token_sum":
    return sum(rows) / b_size
  return sum(rows) / (b_size * max_len)


# ---- §2 SFT, §3 reward models --------------------------------------------------------------------


def sft(lp, mask, reduction="token_mean"):
  mode = {"token_mean": "token_mean", "sequence_mean": "seq_mean_token_mean",
          "sequence_sum": "seq_mean_token_sum"}[reduction]
  return aggregate(-lp, mask, mode)


def bradley_terry(r_w, r_l, margin=None, center_coef=0.0):
  margin = np.zeros_like(r_w) if margin is None else margin
  loss = np.mean([-logsig(r_w[b] - r_l[b] - margin[b]) for b in range(r_w.size)])
  return loss + center_coef * np.mean((r_w + r_l) ** 2)


def thurstone(r_w, r_l, margin, scale, center_coef):
  """-log Phi((r_w - r_l - margin) / scale), Phi from the complementary error function in float64."""
  z = (r_w - r_l - margin) / scale
  log_phi = [math.log(0.5 * math.erfc(-x / math.sqrt(2.0))) for x in z]
  return -np.mean(log_phi) + center_coef * np.mean((r_w + r_l) ** 2)


def ranking(labels_row):
  """Indices best first; Python's sort is stable, so ties keep list order."""
  return sorted(range(len(labels_row)), key=lambda i: -labels_row[i])


def plackett_luce_nll(scores_row, labels_row):
  order = ranking(labels_row)
  return sum(-(scores_row[order[k]] - lse([scores_row[j] for j in order[k:]]))
             for k in range(len(order)))


def all_pairs_ranking(r, labels):
  per_list = []
  for b in range(r.shape[0]):
    terms = [-logsig(r[b, i] - r[b, j]) for i in range(r.shape[1]) for j in range(r.shape[1])
             if labels[b, i] > labels[b, j]]
    per_list.append(np.mean(terms) if terms else 0.0)
  return np.mean(per_list)


def plackett_luce_ranking(r, labels):
  return np.mean([plackett_luce_nll(r[b], labels[b]) for b in range(r.shape[0])])


# ---- §5-§7 policy losses -------------------------------------------------------------------------


def surrogate(ratio, adv, eps_low, eps_high, dual_clip=None):
  loss = max(-adv * ratio, -adv * min(max(ratio, 1 - eps_low), 1 + eps_high))
  if dual_clip is not None and adv < 0:
    loss = min(loss, -dual_clip * adv)
  return loss


def per_token_adv(adv, shape):
  return np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, shape)


def ppo(lp, mask, lp_old, adv, values=None, v_old=None, returns=None, entropy=None, eps=0.2,
        eps_high=None, dual_clip=None, vf_coef=0.1, eps_v=0.2, ent_coef=0.0,
        aggregation="token_mean", max_len=None):
  eps_high = eps if eps_high is None else eps_high
  adv = per_token_adv(adv, lp.shape)
  total = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] == 0:
      continue
    total[b, t] = surrogate(math.exp(lp[b, t] - lp_old[b, t]), adv[b, t], eps, eps_high, dual_clip)
    if values is not None:
      err = (values[b, t] - returns[b, t]) ** 2
      if eps_v is not None:
        v_clip = v_old[b, t] + min(max(values[b, t] - v_old[b, t], -eps_v), eps_v)
        err = max(err, (v_clip - returns[b, t]) ** 2)
      total[b, t] += vf_coef * 0.5 * err
    if ent_coef:
      total[b, t] -= ent_coef * entropy[b, t]
  return aggregate(total, mask, aggregation, max_len)


def grpo(lp, mask, lp_old, lp_ref, adv, eps_low=0.2, eps_high=0.2, beta=0.04,
         aggregation="seq_mean_token_mean", max_len=None, kl_bias_correction=False):
  """kl_bias_correction: the k3 term times the ratio pi / pi_old (DeepSeek-V3.2 Eq. 7; TRL
  use_bias_correction_kl)."""
  adv = per_token_adv(adv, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      ratio = math.exp(lp[b, t] - lp_old[b, t])
      per_token[b, t] = surrogate(ratio, adv[b, t], eps_low, eps_high)
      per_token[b, t] += beta * kl_token(lp[b, t], lp_ref[b, t], "k3") * (ratio if kl_bias_correction else 1.0)
  return aggregate(per_token, mask, aggregation, max_len)


def gspo(lp, mask, lp_old, lp_ref, adv, eps_low=3e-4, eps_high=4e-4, beta=0.0,
         aggregation="sequence_mean"):
  total, tokens = 0.0, 0
  for b in range(lp.shape[0]):
    valid = valid_tokens(mask, b)
    if not valid:
      continue
    s = math.exp(np.mean([lp[b, t] - lp_old[b, t] for t in valid]))
    loss = surrogate(s, adv[b], eps_low, eps_high)
    loss += beta * np.mean([kl_token(lp[b, t], lp_ref[b, t], "k3") for t in valid])
    weight = len(valid) if aggregation == "token_mean" else 1
    total += weight * loss
    tokens += len(valid)
  return total / (tokens if aggregation == "token_mean" else lp.shape[0])


def cispo(lp, mask, lp_old, lp_ref, adv, eps_max=5.0, eps_min=None, beta=0.0,
          aggregation="token_mean", weight_lp=None):
  """weight_lp: log-probs used for the (detached) IS weight; defaults to lp."""
  weight_lp = lp if weight_lp is None else weight_lp
  adv = per_token_adv(adv, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      w = min(math.exp(weight_lp[b, t] - lp_old[b, t]), eps_max)
      w = w if eps_min is None else max(w, eps_min)
      per_token[b, t] = -w * adv[b, t] * lp[b, t] + beta * kl_token(lp[b, t], lp_ref[b, t], "k3")
  return aggregate(per_token, mask, aggregation)


def reinforce(lp, mask, adv, lp_old=None, clip_eps=None):
  losses = []
  for b in range(lp.shape[0]):
    s = sum(lp[b, t] for t in valid_tokens(mask, b))
    if clip_eps is None:
      losses.append(-adv[b] * s)
    else:
      s_old = sum(lp_old[b, t] for t in valid_tokens(mask, b))
      losses.append(surrogate(math.exp(s - s_old), adv[b], clip_eps, clip_eps))
  return np.mean(losses)


def sequence_kl(lp, lp_ref, mask, kind):
  return np.mean([sum(kl_token(lp[b, t], lp_ref[b, t], kind) for t in valid_tokens(mask, b))
                  for b in range(lp.shape[0])])


# ---- §9 pairwise direct objectives (P: dict pc, pr, rc, rr, nc, nr, sc, sr) ----------------------


def _h(P, b):
  return (P["pc"][b] - P["rc"][b]) - (P["pr"][b] - P["rr"][b])


def _pairs(P, fn):
  return np.mean([fn(b) for b in range(P["pc"].size)])


def dpo(P, beta=0.1, label_smoothing=0.0):
  return _pairs(P, lambda b: -(1 - label_smoothing) * logsig(beta * _h(P, b))
                - label_smoothing * logsig(-beta * _h(P, b)))


def robust_dpo(P, beta=0.1, eps=0.1):
  return _pairs(P, lambda b: (-(1 - eps) * logsig(beta * _h(P, b))
                              + eps * logsig(-beta * _h(P, b))) / (1 - 2 * eps))


def ipo(P, tau=0.1, length_normalize=False):
  def one(b):
    if length_normalize:
      h = (P["pc"][b] - P["rc"][b]) / P["nc"][b] - (P["pr"][b] - P["rr"][b]) / P["nr"][b]
    else:
      h = _h(P, b)
    return (h - 1 / (2 * tau)) ** 2
  return _pairs(P, one)


def hinge(P, beta=0.1):
  return _pairs(P, lambda b: max(0.0, 1 - beta * _h(P, b)))


def slic(P, delta=1.0, lambda_reg=0.0):
  return _pairs(P, lambda b: max(0.0, delta - P["pc"][b] + P["pr"][b]) - lambda_reg * P["pc"][b])


def rdpo(P, beta=0.1, alpha=0.02):
  return _pairs(P, lambda b: -logsig(beta * _h(P, b) + alpha * (P["nc"][b] - P["nr"][b])))


def dpop(P, beta=0.1, lam=50.0):
  return _pairs(P, lambda b: -logsig(beta * (_h(P, b) - lam * max(0.0, P["rc"][b] - P["pc"][b]))))


def f_dpo(P, beta=0.1, divergence="reverse_kl", alpha=0.5):
  def f_prime(u):
    return {"reverse_kl": math.log(u) + 1, "forward_kl": -1 / u,
            "js": math.log(2 * u / (1 + u)), "alpha": (1 - u ** (-alpha)) / alpha}[divergence]
  def one(b):
    u_w = math.exp(P["pc"][b] - P["rc"][b])
    u_l = math.exp(P["pr"][b] - P["rr"][b])
    return -logsig(beta * (f_prime(u_w) - f_prime(u_l)))
  return _pairs(P, one)


def nca(P, beta=0.1):
  def one(b):
    r_w, r_l = beta * (P["pc"][b] - P["rc"][b]), beta * (P["pr"][b] - P["rr"][b])
    return -logsig(r_w) - 0.5 * logsig(-r_w) - 0.5 * logsig(-r_l)
  return _pairs(P, one)


def bco(P, beta=0.1, delta=0.0):
  def one(b):
    r_w, r_l = beta * (P["pc"][b] - P["rc"][b]), beta * (P["pr"][b] - P["rr"][b])
    return -logsig(r_w - delta) - logsig(-(r_l - delta))
  return _pairs(P, one)


def chosen_nll(P, reduction):
  if reduction == "token_mean":
    return -P["pc"].sum() / P["nc"].sum()
  if reduction == "sequence_mean":
    return np.mean(-P["pc"] / P["nc"])
  return np.mean(-P["pc"])


def rpo(P, beta=0.1, alpha=1.0, nll_reduction="sequence_mean"):
  return dpo(P, beta) + alpha * chosen_nll(P, nll_reduction)


def cpo(P, beta=0.1, alpha=1.0, nll_reduction="token_mean"):
  pref = _pairs(P, lambda b: -logsig(beta * (P["pc"][b] - P["pr"][b])))
  return pref + alpha * chosen_nll(P, nll_reduction)


def simpo(P, beta=2.0, gamma=0.5, label_smoothing=0.0):
  def one(b):
    z = beta * (P["pc"][b] / P["nc"][b] - P["pr"][b] / P["nr"][b]) - gamma
    return -(1 - label_smoothing) * logsig(z) - label_smoothing * logsig(-z)
  return _pairs(P, one)


def orpo(P, lam=0.1):
  def log_odds(a):
    return a - math.log(1 - math.exp(a))
  def one(b):
    a_w, a_l = P["pc"][b] / P["nc"][b], P["pr"][b] / P["nr"][b]
    return -logsig(log_odds(a_w) - log_odds(a_l))
  return chosen_nll(P, "token_mean") + lam * _pairs(P, one)


def orpo_prompt_nll(P, lam=0.1):
  """ORPO with TRL's NLL on prompt and completion: -sum (S_w + S_prompt) / sum (n_w + n_prompt)."""
  nll = -(P["pc"].sum() + P["pp"].sum()) / (P["nc"].sum() + P["np"].sum())
  return orpo(P, lam) - chosen_nll(P, "token_mean") + nll


def pmle(P, gamma=0.01):
  return _pairs(P, lambda b: -logsig(gamma * (P["pc"][b] - P["pr"][b])))


# ---- TRL DPOTrainer / CPOTrainer variants (dpo_variants.py, f-divergence scores, CPO options) ------


def _l(P, b):
  """l(y_w), l(y_l) = S - S_ref of pair b."""
  return P["pc"][b] - P["rc"][b], P["pr"][b] - P["rr"][b]


def f_score(l, divergence="reverse_kl", alpha=0.5):
  """TRL's f-divergence score f'(u) at u = exp(l), additive constants included."""
  u = math.exp(l)
  return {"reverse_kl": math.log(u), "forward_kl": 1 - 1 / u, "js": math.log(2 * u / (1 + u)),
          "alpha": (1 - u ** (-alpha)) / alpha}[divergence]


def _h_f(P, b, divergence, alpha):
  l_w, l_l = _l(P, b)
  return f_score(l_w, divergence, alpha) - f_score(l_l, divergence, alpha)


def _smoothed(z, eps):
  return -(1 - eps) * logsig(z) - eps * logsig(-z)


def exo_pair(P, beta=0.1, label_smoothing=1e-3, divergence="reverse_kl", alpha=0.5):
  """KL(q || p) over {y_w, y_l}: q = softmax(beta * scores), p = (1 - eps, eps)."""
  def one(b):
    q_w = sigmoid(beta * _h_f(P, b, divergence, alpha))
    q = (q_w, 1 - q_w)
    p = (1 - label_smoothing, label_smoothing)
    return sum(q[k] * (math.log(q[k]) - math.log(p[k])) for k in range(2))
  return _pairs(P, one)


def sppo_hard(P, beta=0.1):
  def one(b):
    l_w, l_l = _l(P, b)
    return (l_w - 1 / (2 * beta)) ** 2 + (l_l + 1 / (2 * beta)) ** 2
  return _pairs(P, one)


def aot(P, beta=0.1, label_smoothing=0.0):
  margin = sorted(P["pc"][b] - P["pr"][b] for b in range(P["pc"].size))
  ref_margin = sorted(P["rc"][b] - P["rr"][b] for b in range(P["pc"].size))
  return np.mean([_smoothed(beta * (m - r), label_smoothing) for m, r in zip(margin, ref_margin)])


def aot_unpaired(P, beta=0.1, label_smoothing=0.0):
  chosen = sorted(_l(P, b)[0] for b in range(P["pc"].size))
  rejected = sorted(_l(P, b)[1] for b in range(P["pc"].size))
  return np.mean([_smoothed(beta * (w - l), label_smoothing) for w, l in zip(chosen, rejected)])


def apo_zero(P, beta=0.1):
  def one(b):
    l_w, l_l = _l(P, b)
    return (1 - sigmoid(beta * l_w)) + sigmoid(beta * l_l)
  return _pairs(P, one)


def apo_down(P, beta=0.1):
  def one(b):
    l_w, l_l = _l(P, b)
    return sigmoid(beta * l_w) + (1 - sigmoid(beta * (l_w - l_l)))
  return _pairs(P, one)


def discopop(P, beta=0.1, tau=0.05, divergence="reverse_kl", alpha=0.5):
  def one(b):
    z = beta * _h_f(P, b, divergence, alpha)
    m = sigmoid(z / tau)
    return (1 - m) * -logsig(z) + m * math.exp(-z)
  return _pairs(P, one)


def sigmoid_norm(P, beta=0.1, divergence="reverse_kl", alpha=0.5):
  def one(b):
    l_w, l_l = _l(P, b)
    z = beta * (f_score(l_w, divergence, alpha) / P["nc"][b] - f_score(l_l, divergence, alpha) / P["nr"][b])
    return -logsig(z)
  return _pairs(P, one)


def hinge_f(P, beta=0.1, divergence="reverse_kl", alpha=0.5):
  return _pairs(P, lambda b: max(0.0, 1 - beta * _h_f(P, b, divergence, alpha)))


def robust_dpo_f(P, beta=0.1, eps=0.1, divergence="reverse_kl", alpha=0.5):
  def one(b):
    z = beta * _h_f(P, b, divergence, alpha)
    return (-(1 - eps) * logsig(z) + eps * logsig(-z)) / (1 - 2 * eps)
  return _pairs(P, one)


def ipo_trl(P, tau=0.1, divergence="reverse_kl", alpha=0.5):
  """TRL's IPO: f-scores divided by the lengths."""
  def one(b):
    l_w, l_l = _l(P, b)
    h = f_score(l_w, divergence, alpha) / P["nc"][b] - f_score(l_l, divergence, alpha) / P["nr"][b]
    return (h - 1 / (2 * tau)) ** 2
  return _pairs(P, one)


def alphapo_reward(x, reward_alpha):
  """(1 - p^(-alpha)) / alpha with p = exp(x); x itself at alpha = 0."""
  if reward_alpha == 0:
    return x
  return (1 - math.exp(x) ** (-reward_alpha)) / reward_alpha


def cpo_trl(P, beta=0.1, alpha=1.0, label_smoothing=0.0, reward_alpha=0.0, average=False, gamma=0.0):
  """TRL CPOTrainer: sigmoid (summed log-probs) or simpo/alphapo (average = True, margin gamma), plus
  alpha * token-mean NLL of the chosen responses."""
  def one(b):
    x_w, x_l = P["pc"][b], P["pr"][b]
    if average:
      x_w, x_l = x_w / P["nc"][b], x_l / P["nr"][b]
    logits = alphapo_reward(x_w, reward_alpha) - alphapo_reward(x_l, reward_alpha) - gamma / beta
    return _smoothed(beta * logits, label_smoothing)
  return _pairs(P, one) + alpha * (-P["pc"].sum() / P["nc"].sum())


def apo_zero_unpaired(policy, ref, desirable, beta=0.1, lambda_d=1.0, lambda_u=1.0):
  losses = []
  for i in range(policy.size):
    l = policy[i] - ref[i]
    losses.append(lambda_d * (1 - sigmoid(beta * l)) if desirable[i] else lambda_u * sigmoid(beta * l))
  return np.mean(losses)


def preference_distillation(P, gamma=0.1):
  def one(b):
    p_hat = sigmoid(P["sc"][b] - P["sr"][b])
    q = sigmoid(gamma * (P["pc"][b] - P["pr"][b]))
    return -(p_hat * math.log(q) + (1 - p_hat) * math.log(1 - q))
  return _pairs(P, one)


# ---- unpaired and listwise ----------------------------------------------------------------------


def kto(policy, ref, desirable, kl_policy, kl_ref, beta=0.1, lambda_d=1.0, lambda_u=1.0):
  z0 = max(0.0, np.mean(kl_policy - kl_ref))
  losses = []
  for i in range(policy.size):
    l = policy[i] - ref[i]
    if desirable[i]:
      losses.append(lambda_d * (1 - sigmoid(beta * (l - z0))))
    else:
      losses.append(lambda_u * (1 - sigmoid(beta * (z0 - l))))
  return np.mean(losses)


def npo(policy, ref, beta=0.1):
  return np.mean([-(2 / beta) * logsig(-beta * (policy[i] - ref[i])) for i in range(policy.size)])


def dpo_pl(policy, ref, labels, beta=0.1):
  return np.mean([plackett_luce_nll(beta * (policy[b] - ref[b]), labels[b])
                  for b in range(policy.shape[0])])


def lipo_lambda(policy, ref, labels, beta=0.1, log_base=2.0, rank_scores=None):
  """rank_scores: scores that define tau (held fixed in gradient checks); default beta * l."""
  total = []
  for b in range(policy.shape[0]):
    s = beta * (policy[b] - ref[b])
    order = ranking(s if rank_scores is None else rank_scores[b])
    tau = {i: k + 1 for k, i in enumerate(order)}
    gain = [2.0 ** psi - 1 for psi in labels[b]]
    inv_d = {i: 1.0 / (math.log(1 + tau[i]) / math.log(log_base)) for i in tau}
    acc = 0.0
    for i in range(s.size):
      for j in range(s.size):
        if labels[b, i] > labels[b, j]:
          weight = abs(gain[i] - gain[j]) * abs(inv_d[i] - inv_d[j])
          acc += weight * -logsig(s[i] - s[j])
    total.append(acc)
  return np.mean(total)


# ---- GRPO-family variants (TRL 1.16) and SFT dft ----
# `keep` is the detached 0/1 token filter (top-entropy tokens, off-policy sequence mask) that multiplies the
# per-token policy term only; the reference computes it from the fixed (unperturbed) inputs.


def quantile_linear(values, q):
  """q-quantile, linear interpolation between order statistics at h = q (n - 1)."""
  ordered = sorted(values)
  h = q * (len(ordered) - 1)
  lo, hi = math.floor(h), math.ceil(h)
  return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def top_entropy_keep(entropy, mask, rho):
  """arXiv:2506.01939: 1 on loss tokens with entropy >= the (1 - rho) quantile of all loss tokens."""
  threshold = quantile_linear([entropy[b, t] for b, t in np.ndindex(mask.shape) if mask[b, t] > 0], 1.0 - rho)
  keep = np.zeros(mask.shape)
  for b, t in np.ndindex(mask.shape):
    if mask[b, t] > 0 and entropy[b, t] >= threshold:
      keep[b, t] = 1.0
  return keep


def off_policy_keep(lp, lp_old, adv, mask, delta):
  """DeepSeek-V3.2 Eq. (9): 0 where A < 0 and the row mean of log(pi_old / pi_theta) > delta, else 1."""
  adv = per_token_adv(adv, lp.shape)
  keep = np.ones(lp.shape)
  for b in range(lp.shape[0]):
    valid = valid_tokens(mask, b)
    drift = sum(lp_old[b, t] - lp[b, t] for t in valid) / max(len(valid), 1)
    for t in range(lp.shape[1]):
      if adv[b, t] < 0 and drift > delta:
        keep[b, t] = 0.0
  return keep


def _keep(keep, shape):
  return np.ones(shape) if keep is None else keep


def grpo_kept(lp, mask, lp_old, lp_ref, adv, keep=None, eps_low=0.2, eps_high=0.2, beta=0.04,
              aggregation="seq_mean_token_mean", max_len=None):
  """GRPO (DeepSeekMath Eq. (3)) with the policy term of each token multiplied by keep[b, t]."""
  adv, keep = per_token_adv(adv, lp.shape), _keep(keep, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      pg = surrogate(math.exp(lp[b, t] - lp_old[b, t]), adv[b, t], eps_low, eps_high)
      per_token[b, t] = keep[b, t] * pg + beta * kl_token(lp[b, t], lp_ref[b, t], "k3")
  return aggregate(per_token, mask, aggregation, max_len)


def gspo_kept(lp, mask, lp_old, lp_ref, adv, keep=None, eps_low=3e-4, eps_high=4e-4, beta=0.0,
              aggregation="sequence_mean"):
  """GSPO with TRL's broadcast-then-filter rule: the sequence loss l_i counts once per kept token.

  sequence_mean: (1/B) sum_i (k_i l_i / n_i + beta mean_t k3);  token_mean: sum_i (k_i l_i + beta
  sum_t k3) / sum_i n_i;  luspo (arXiv:2602.05261): (1/B) sum_i (k_i l_i + beta sum_t k3)."""
  keep = _keep(keep, lp.shape)
  total, tokens = 0.0, 0
  for b in range(lp.shape[0]):
    valid = valid_tokens(mask, b)
    if not valid:
      continue
    n = len(valid)
    s = math.exp(sum(lp[b, t] - lp_old[b, t] for t in valid) / n)
    kept = sum(keep[b, t] for t in valid)
    kl_sum = beta * sum(kl_token(lp[b, t], lp_ref[b, t], "k3") for t in valid)
    pg = surrogate(s, adv[b], eps_low, eps_high)
    total += (kept * pg + kl_sum) / (n if aggregation == "sequence_mean" else 1)
    tokens += n
  return total / (tokens if aggregation == "token_mean" else lp.shape[0])


def gspo_token_kept(lp, mask, lp_old, lp_ref, adv, fixed_lp, keep=None, eps_low=3e-4, eps_high=4e-4,
                    beta=0.0):
  """GSPO-token: s_{i,t} = s_i(fixed) * pi_theta(t) / pi_theta_fixed(t), token advantages, seq-mean."""
  adv, keep = per_token_adv(adv, lp.shape), _keep(keep, lp.shape)
  per_token = np.zeros_like(lp)
  for b in range(lp.shape[0]):
    valid = valid_tokens(mask, b)
    if not valid:
      continue
    s = math.exp(sum(fixed_lp[b, t] - lp_old[b, t] for t in valid) / len(valid))
    for t in valid:
      s_tok = s * math.exp(lp[b, t] - fixed_lp[b, t])
      per_token[b, t] = (keep[b, t] * surrogate(s_tok, adv[b, t], eps_low, eps_high)
                         + beta * kl_token(lp[b, t], lp_ref[b, t], "k3"))
  return aggregate(per_token, mask, "seq_mean_token_mean")


def cispo_kept(lp, mask, lp_old, lp_ref, adv, weight_lp, keep=None, eps_max=5.0, beta=0.0,
               aggregation="token_mean"):
  """CISPO with the filter on -w A lp; w = min(pi_fixed / pi_old, eps_max) is a fixed input."""
  adv, keep = per_token_adv(adv, lp.shape), _keep(keep, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      w = min(math.exp(weight_lp[b, t] - lp_old[b, t]), eps_max)
      per_token[b, t] = keep[b, t] * (-w * adv[b, t] * lp[b, t]) + beta * kl_token(lp[b, t], lp_ref[b, t], "k3")
  return aggregate(per_token, mask, aggregation)


def sapo(lp, mask, lp_old, lp_ref, adv, keep=None, tau_pos=1.0, tau_neg=1.05, beta=0.0,
         aggregation="seq_mean_token_mean", max_len=None, kl_bias_correction=False):
  """SAPO (arXiv:2511.20347): l = -f(r) A, f(r) = sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A."""
  adv, keep = per_token_adv(adv, lp.shape), _keep(keep, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      r = math.exp(lp[b, t] - lp_old[b, t])
      tau = tau_pos if adv[b, t] > 0 else tau_neg
      gate = 4.0 / tau / (1.0 + math.exp(-tau * (r - 1.0)))
      kl = kl_token(lp[b, t], lp_ref[b, t], "k3") * (r if kl_bias_correction else 1.0)
      per_token[b, t] = keep[b, t] * (-gate * adv[b, t]) + beta * kl
  return aggregate(per_token, mask, aggregation, max_len)


def vespo_phi(lp, lp_old, mask, adv_sign_nonneg, k_pos, lambda_pos, k_neg, lambda_neg):
  """phi(W) = W^k exp(lambda (1 - W)), W = prod_t pi / mu (log clamped as in the VESPO code)."""
  log_w = sum(min(max(lp[t] - lp_old[t], -20.0), 20.0) for t in range(lp.size) if mask[t] > 0)
  w = math.exp(min(max(log_w, math.log(1e-8)), 20.0))
  k, lam = (k_pos, lambda_pos) if adv_sign_nonneg else (k_neg, lambda_neg)
  lam = max(lam, 1e-4)
  return w ** k * math.exp(lam * (1.0 - w))


def vespo(lp, mask, lp_old, lp_ref, adv, weight_lp, keep=None, k_pos=2.0, lambda_pos=3.0, k_neg=3.0,
          lambda_neg=2.0, beta=0.0, aggregation="token_mean", kl_bias_correction=False):
  """VESPO (arXiv:2602.10693): l = -phi(W_i) A lp (phi from the fixed weight_lp) [+ beta k3]."""
  adv, keep = per_token_adv(adv, lp.shape), _keep(keep, lp.shape)
  per_token = np.zeros_like(lp)
  for b, t in np.ndindex(lp.shape):
    if mask[b, t] > 0:
      phi = vespo_phi(weight_lp[b], lp_old[b], mask[b], adv[b, t] >= 0, k_pos, lambda_pos, k_neg, lambda_neg)
      ratio = math.exp(lp[b, t] - lp_old[b, t]) if kl_bias_correction else 1.0
      per_token[b, t] = (keep[b, t] * (-phi * adv[b, t] * lp[b, t])
                         + beta * kl_token(lp[b, t], lp_ref[b, t], "k3") * ratio)
  return aggregate(per_token, mask, aggregation)


def dft(lp, mask, weight_lp, reduction="token_mean"):
  """DFT (arXiv:2508.05629): per-token NLL times the probability exp(weight_lp) (a fixed input)."""
  mode = {"token_mean": "token_mean", "sequence_mean": "seq_mean_token_mean",
          "sequence_sum": "seq_mean_token_sum"}[reduction]
  return aggregate(-np.exp(weight_lp) * lp, mask, mode)
