"""Evaluation statistics as small pure NumPy functions (no JAX): rule metrics, bootstrap intervals, win rates.

* Rule metrics, per example (arrays) and as means (`rule_metrics`): `exact_match` and `token_f1` with SQuAD's
  `normalize_answer`, `rouge_l` (F-measure of the maintained `rouge_score` library).
* `bootstrap_ci`: percentile bootstrap over examples, vectorised with an index matrix.
* Pairwise comparisons: `win_rate` (from per-prompt scores), `win_rate_from_outcomes` (judge verdicts +1 / 0 / -1),
  `length_controlled_win_rate` (AlpacaEval 2's LC idea) and `position_bias` (a judge run in both orders).
* Sampling: `pass_at_k` (Chen et al. 2021's unbiased estimator) and `majority_vote` (maj@k).

Every interval is a percentile bootstrap over prompts: `Interval(estimate, low, high)`, a NamedTuple that unpacks
as `(estimate, low, high)`. For one `seed` and one number of prompts, every function draws the same resamples.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import string
import warnings
from typing import Any, Callable, Hashable, NamedTuple, Optional, Sequence, Union

import numpy as np

_MAX_BOOTSTRAP_ELEMENTS = 1 << 22  # index-matrix elements per chunk of resamples (bounds memory, not a loop/resample)

Reference = Union[str, Sequence[str]]


class Interval(NamedTuple):
  """A point estimate and its bootstrap interval (floats, or arrays for a vector-valued statistic)."""
  estimate: Any
  low: Any
  high: Any


# ---- rule metrics ------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
  """SQuAD's `normalize_answer`: lower case, drop ASCII punctuation, drop the articles a / an / the, collapse
  whitespace (in that order, as the SQuAD v1.1 / v2.0 evaluation scripts do)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match_score(prediction: str, reference: str) -> float:
  """1.0 if the normalised prediction equals the normalised reference, else 0.0 (SQuAD)."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
  """SQuAD's token-level F1 on normalised, whitespace-split tokens.

  common = |multiset(pred) ∩ multiset(ref)|, P = common / |pred|, R = common / |ref|, F1 = 2PR / (P + R)
  (0 when common = 0). When either side normalises to no tokens, F1 = 1.0 if both are empty else 0.0 (SQuAD v2.0's
  rule; v1.1 scored two empty answers 0 although their exact match is 1).
  """
  pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


def _best_over_references(score: Callable[[str, str], float], predictions: Sequence[str],
                          references: Sequence[Reference]) -> np.ndarray:
  if isinstance(predictions, str) or isinstance(references, str):
    raise TypeError("predictions and references are sequences (one entry per example), not a single string")
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
  out = np.empty(len(predictions), np.float64)
  for i, (pred, ref) in enumerate(zip(predictions, references)):
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
      raise ValueError(f"example {i} has no reference")
    out[i] = max(score(pred, r) for r in refs)
  return out


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> np.ndarray:
  """Per-example SQuAD exact match [N] (0. / 1.); a reference may be a list of strings: the best one counts."""
  return _best_over_references(exact_match_score, predictions, references)


def token_f1(predictions: Sequence[str], references: Sequence[Reference]) -> np.ndarray:
  """Per-example SQuAD token F1 [N] (`f1_score`); a reference may be a list of strings: the best one counts."""
  return _best_over_references(f1_score, predictions, references)


@functools.lru_cache(maxsize=8)
def _rouge_l_scorer(use_stemmer: bool, tokenizer: Any):
  from rouge_score import rouge_scorer  # imported on first use: pulls in nltk / absl
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer, tokenizer=tokenizer)


def rouge_l(predictions: Sequence[str], references: Sequence[Reference], *, use_stemmer: bool = False,
            tokenizer: Any = None) -> np.ndarray:
  """Per-example ROUGE-L F-measure [N] from `rouge_score.rouge_scorer.RougeScorer(["rougeL"])`.

  With L = |LCS(pred tokens, ref tokens)| (longest common subsequence): P = L / |pred|, R = L / |ref|,
  F = 2PR / (P + R) (0 when L = 0). A reference may be a list of strings: the best F counts.
  rouge_score's default tokenizer lower-cases and keeps only [a-z0-9] runs, so text in other scripts scores 0:
  pass `tokenizer` (an object with `.tokenize(text) -> list[str]`) for such text.
  """
  scorer = _rouge_l_scorer(use_stemmer, tokenizer)
  # RougeScorer.score takes (target, prediction).
  return _best_over_references(lambda p, r: scorer.score(r, p)["rougeL"].fmeasure, predictions, references)


def rule_metrics(predictions: Sequence[str], references: Sequence[Reference]) -> dict[str, float]:
  """Means over examples: {"exact_match", "f1", "rougeL"} (per-example values: the functions above)."""
  return {"exact_match": float(exact_match(predictions, references).mean()),
          "f1": float(token_f1(predictions, references).mean()),
          "rougeL": float(rouge_l(predictions, references).mean())}


# ---- bootstrap ---------------------------------------------------------------------------------------------------


def _resample_indices(n: int, resamples: int, seed: int):
  """Yields [m, n] index matrices (rows: bootstrap resamples of n examples), `resamples` rows in all."""
  if resamples < 1:
    raise ValueError(f"resamples must be >= 1, got {resamples}")
  rng = np.random.default_rng(seed)
  chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // n)
  for start in range(0, resamples, chunk):
    yield rng.integers(0, n, size=(min(chunk, resamples - start), n))


def _quantiles(stats: np.ndarray, confidence: float):
  alpha = (1.0 - confidence) / 2.0
  return np.quantile(stats, [alpha, 1.0 - alpha], axis=0)


def _scalar(x):
  x = np.asarray(x)
  return float(x) if x.ndim == 0 else x


def _check_confidence(confidence: float):
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(values, *, statistic: Callable[..., Any] = np.mean, confidence: float = 0.95,
                 resamples: int = 1000, seed: int = 0) -> Interval:
  """Percentile bootstrap interval of `statistic` over examples.

  values: [N] or [N, ...] (rows are examples; resampled together, so paired columns stay paired).
  statistic: a NumPy reduction taking `axis` (np.mean, np.median, ...); it is called once on the whole data
    (`axis=0`: the estimate) and on stacks of resamples `values[idx]` of shape [m, N, ...] (`axis=1`).
  Resamples: idx ~ Uniform{0..N-1}^[resamples, N] from `np.random.default_rng(seed)` (drawn in chunks of rows to
  bound memory); low / high = the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled
  statistics (np.quantile's linear interpolation). Returns Interval(estimate, low, high).
  """
  _check_confidence(confidence)
  values = np.asarray(values, np.float64)
  if values.ndim == 0 or values.shape[0] == 0:
    raise ValueError("bootstrap_ci needs at least one example")
  stats = np.concatenate([np.asarray(statistic(values[idx], axis=1))
                          for idx in _resample_indices(values.shape[0], resamples, seed)], axis=0)
  low, high = _quantiles(stats, confidence)
  return Interval(_scalar(statistic(values, axis=0)), _scalar(low), _scalar(high))


# ---- pairwise win rates ------------------------------------------------------------------------------------------


def preference_outcomes(policy_scores, baseline_scores, *, tie_tolerance: float = 0.0) -> np.ndarray:
  """Per-prompt outcome [N] int8: +1 policy better, -1 worse, 0 tie (|policy - baseline| <= tie_tolerance)."""
  policy, baseline = np.asarray(policy_scores, np.float64), np.asarray(baseline_scores, np.float64)
  if policy.shape != baseline.shape or policy.ndim != 1:
    raise ValueError(f"policy and baseline scores must be 1-D of equal shape, got {policy.shape}, {baseline.shape}")
  if np.isnan(policy).any() or np.isnan(baseline).any():
    raise ValueError("scores contain NaN")
  diff = policy - baseline
  return np.where(np.abs(diff) <= tie_tolerance, 0, np.sign(diff)).astype(np.int8)


def _outcomes(outcomes) -> np.ndarray:
  o = np.asarray(outcomes, np.float64)
  if o.ndim != 1 or o.shape[0] == 0:
    raise ValueError(f"outcomes must be a non-empty 1-D array, got shape {o.shape}")
  if np.isnan(o).any() or (np.abs(o) > 1).any():
    raise ValueError("outcomes must lie in [-1, 1] (+1 policy better, 0 tie, -1 baseline better)")
  return o


def win_rate_from_outcomes(outcomes, *, confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> Interval:
  """Win rate of the policy from per-prompt outcomes o_i (+1 win, 0 tie, -1 loss; values in between, e.g. an
  average of several verdicts, are allowed): mean_i (o_i + 1) / 2, i.e. (wins + ties / 2) / N, with its
  percentile bootstrap interval over prompts (`bootstrap_ci`)."""
  return bootstrap_ci((_outcomes(outcomes) + 1.0) / 2.0, confidence=confidence, resamples=resamples, seed=seed)


def win_rate(policy_scores, baseline_scores, *, tie_tolerance: float = 0.0, confidence: float = 0.95,
             resamples: int = 1000, seed: int = 0) -> Interval:
  """Pairwise win rate of the policy against the baseline from per-prompt scores (e.g. reward-model scores):
  (#{policy > baseline} + #{tie} / 2) / N, ties within `tie_tolerance`, with its bootstrap interval over prompts."""
  outcomes = preference_outcomes(policy_scores, baseline_scores, tie_tolerance=tie_tolerance)
  return win_rate_from_outcomes(outcomes, confidence=confidence, resamples=resamples, seed=seed)


class LengthControlled(NamedTuple):
  """`length_controlled_win_rate`'s result: the LC win rate sigma(intercept) with its bootstrap interval, the raw
  win rate, and the fitted GLM (intercept, length_coef on tanh(length difference / length_scale))."""
  win_rate: float
  low: float
  high: float
  raw_win_rate: float
  intercept: float
  length_coef: float
  length_scale: float


def _log_sigmoid(z):
  return -np.logaddexp(0.0, -z)


def _fit_logistic(x: np.ndarray, y: np.ndarray, weights: np.ndarray, *, l2: float = 0.0, max_iter: int = 100,
                  tol: float = 1e-12) -> np.ndarray:
  """Weighted logistic regression of soft labels y [N] in [0, 1] on (1, x) by Newton's method (IRLS), batched over
  weight rows [R, N]: minimises  sum_i w_ri [softplus(z_ri) - y_i z_ri] + l2 / 2 b_r1^2,  z_ri = b_r0 + b_r1 x_i
  (the Bernoulli log-loss; a soft label 0.5 is a win and a loss of weight 0.5 each). Returns b [R, 2] (float64).

  Each step b <- b - t H^-1 g, g = X^T diag(w)(p - y) + (0, l2 b_1), H = X^T diag(w p (1 - p)) X + diag(0, l2),
  p = sigmoid(z); t halves (per row) until the loss does not increase. A row stops when its gradient, divided by its
  total weight, is below `tol` (for data separated by x the coefficients then stand large and finite).
  """
  X = np.stack([np.ones_like(x), x], axis=-1)                                   # [N, 2]
  penalty = np.array([0.0, l2])
  total = np.maximum(weights.sum(axis=1), 1e-300)                               # [R]
  beta = np.zeros((weights.shape[0], 2))

  def loss(b):
    z = b @ X.T
    return (weights * (np.logaddexp(0.0, z) - y * z)).sum(axis=1) + 0.5 * l2 * b[:, 1] ** 2

  current = loss(beta)
  for _ in range(max_iter):
    z = beta @ X.T                                                              # [R, N]
    p = np.exp(_log_sigmoid(z))
    grad = (weights * (p - y)) @ X + penalty * beta                             # [R, 2]
    active = np.abs(grad).max(axis=1) / total > tol
    if not active.any():
      break
    hess = np.einsum("rn,ni,nj->rij", weights * p * (1.0 - p), X, X) + np.diag(penalty)
    jitter = 1e-12 * (np.trace(hess, axis1=1, axis2=2) + 1e-300)[:, None, None] * np.eye(2)
    step = np.linalg.solve(hess + jitter, grad[..., None])[..., 0] * active[:, None]
    t = np.ones(len(beta))
    for _ in range(40):
      candidate = beta - t[:, None] * step
      new = loss(candidate)
      worse = new > current + 1e-12 * np.abs(current)
      if not worse.any():
        break
      t = np.where(worse, t / 2.0, t)
    beta, current = candidate, np.where(worse, current, new)
  return beta


def _mle_exists(x: np.ndarray, y: np.ndarray) -> bool:
  """Whether the unpenalised logistic MLE of y on (1, x) is finite: the labels overlap in x (Albert & Anderson 1984).

  A direction (b0, b1) != 0 with b0 + b1 x_i >= 0 on every point with y_i > 0 and <= 0 on every point with y_i < 1
  exists unless both label sets are non-empty and max(x | y < 1) > min(x | y > 0) and max(x | y > 0) > min(x | y < 1).
  """
  pos, neg = x[y > 0], x[y < 1]
  return bool(pos.size and neg.size and neg.max() > pos.min() and pos.max() > neg.min())


def length_controlled_win_rate(outcomes, policy_lengths, baseline_lengths, *, l2: float = 0.0,
                               confidence: float = 0.95, resamples: int = 1000, seed: int = 0) -> LengthControlled:
  """Length-controlled win rate (the idea of AlpacaEval 2's LC win rate, Dubois et al. 2024, arXiv:2404.04475):
  the win rate a GLM of the judge's preferences predicts when both responses have the same length.

  Per prompt i: y_i = (o_i + 1) / 2 (o_i: +1 policy better, 0 tie, -1 worse; y = 0.5 counts half a win and half a
  loss, as AlpacaEval weights its duplicated rows), d_i = policy_length_i - baseline_length_i,
  s = std(d) (sample std, ddof = 1, like pandas in AlpacaEval), x_i = tanh(d_i / s). Fit, by Newton's method,
      (b0, b1) = argmin  sum_i [ -y_i log sigma(b0 + b1 x_i) - (1 - y_i) log(1 - sigma(b0 + b1 x_i)) ] + l2 / 2 b1^2
  and report  LC = sigma(b0) = 1 / (1 + exp(-b0)),  the predicted P(policy preferred) at d = 0. (AlpacaEval also
  has a per-instruction difficulty term fitted across many models and an L1 penalty chosen by cross-validation; this
  is the single-pair version: intercept + length.) If every d_i is equal (s = 0), x = 0 and LC = mean(y), the raw
  win rate. If all outcomes are equal, LC = that value. If the outcomes are separated by the length difference the
  unpenalised MLE does not exist: a RuntimeWarning says so (pass l2 > 0 for a finite, shrunken fit).
  Interval: percentile bootstrap over prompts (the same resamples as `bootstrap_ci` with this seed), refitting the
  GLM on every resample (batched Newton on resample counts) with s held at the full-data value.
  """
  _check_confidence(confidence)
  o = _outcomes(outcomes)
  lp, lb = np.asarray(policy_lengths, np.float64), np.asarray(baseline_lengths, np.float64)
  if lp.shape != o.shape or lb.shape != o.shape:
    raise ValueError(f"lengths {lp.shape}, {lb.shape} must match outcomes {o.shape}")
  if l2 < 0:
    raise ValueError(f"l2 must be >= 0, got {l2}")
  y, d, n = (o + 1.0) / 2.0, lp - lb, o.shape[0]
  raw = float(y.mean())
  scale = float(d.std(ddof=1)) if n > 1 else 0.0
  x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)

  if scale == 0.0 or np.all(y == y[0]):
    intercept = float(np.log(raw) - np.log1p(-raw)) if 0.0 < raw < 1.0 else math.copysign(math.inf, raw - 0.5)
    beta = np.array([intercept, 0.0])
  else:
    if l2 == 0.0 and not _mle_exists(x, y):
      warnings.warn("length_controlled_win_rate: the preferences are separated by the length difference, so the "
                    "logistic fit has no finite maximum; its LC win rate is unreliable (pass l2 > 0)",
                    RuntimeWarning, stacklevel=2)
    beta = _fit_logistic(x, y, np.ones((1, n)), l2=l2)[0]

  rates = []
  for idx in _resample_indices(n, resamples, seed):
    m = idx.shape[0]
    counts = np.bincount((np.arange(m)[:, None] * n + idx).ravel(), minlength=m * n).reshape(m, n)
    rates.append(np.exp(_log_sigmoid(_fit_logistic(x, y, counts.astype(np.float64), l2=l2)[:, 0])))
  low, high = _quantiles(np.concatenate(rates), confidence)
  estimate = float(np.exp(_log_sigmoid(beta[0])))
  return LengthControlled(estimate, float(low), float(high), raw, float(beta[0]), float(beta[1]), scale)


class PositionBias(NamedTuple):
  """`position_bias`'s result (rates over prompts / judgements; outcomes [N] float64 in {-1, 0, +1})."""
  consistency: float
  first_position_win_rate: float
  second_position_win_rate: float
  outcomes: np.ndarray


def position_bias(a_first, b_first) -> PositionBias:
  """Position bias of a pairwise judge run in both orders (Zheng et al. 2023, MT-Bench / Chatbot Arena).

  a_first[i], b_first[i]: the verdict on prompt i with response A (the policy) shown first, and with B (the baseline)
  shown first, both stated about the RESPONSES: +1 A better, -1 B better, 0 tie.
  * consistency = mean_i [a_first_i == b_first_i].
  * first_position_win_rate = (#{a_first = +1} + #{b_first = -1}) / 2N: the share of the 2N judgements won by the
    response shown first (second_position_win_rate likewise; the rest are ties). An unbiased judge has them equal.
  * outcomes_i = a_first_i if a_first_i == b_first_i else 0: a win only if both orders agree, any disagreement a tie
    (MT-Bench's conservative rule); feed them to `win_rate_from_outcomes`.
  """
  a, b = np.asarray(a_first, np.float64), np.asarray(b_first, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.shape[0] == 0:
    raise ValueError(f"verdicts must be non-empty 1-D arrays of equal shape, got {a.shape}, {b.shape}")
  if not (np.isin(a, (-1, 0, 1)).all() and np.isin(b, (-1, 0, 1)).all()):
    raise ValueError("verdicts must be +1 (A better), 0 (tie) or -1 (B better)")
  agree = a == b
  n2 = 2.0 * a.shape[0]
  return PositionBias(consistency=float(agree.mean()),
                      first_position_win_rate=float(((a == 1).sum() + (b == -1).sum()) / n2),
                      second_position_win_rate=float(((a == -1).sum() + (b == 1).sum()) / n2),
                      outcomes=np.where(agree, a, 0.0))


# ---- sampling: pass@k and maj@k ----------------------------------------------------------------------------------


def pass_at_k(n, c, k: int):
  """Unbiased pass@k of Chen et al. 2021 (Codex) from n samples per prompt of which c are correct:
      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)   (= 1 when n - c < k),
  the probability that k of the n samples drawn without replacement contain a correct one (product form: no huge
  binomials). n, c: ints or integer arrays (broadcast; per prompt); 1 <= k <= n. Returns a float or an array [P]
  (pass@k of a benchmark: its mean).
  """
  n_arr, c_arr = np.broadcast_arrays(np.asarray(n), np.asarray(c))
  if not (np.issubdtype(n_arr.dtype, np.integer) and np.issubdtype(c_arr.dtype, np.integer)):
    raise TypeError("n and c must be integers")
  if int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k}")
  if (c_arr < 0).any() or (c_arr > n_arr).any() or (n_arr < k).any():
    raise ValueError("need 0 <= c <= n and k <= n")
  out = np.empty(n_arr.shape, np.float64)
  for i, (ni, ci) in enumerate(zip(n_arr.ravel().tolist(), c_arr.ravel().tolist())):
    out.flat[i] = 1.0 if ni - ci < k else 1.0 - float(np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1)))
  return _scalar(out)


class MajorityVote(NamedTuple):
  """`majority_vote`'s result: the voted answer per prompt (None when a prompt has no answer) and whether it is
  correct [P] bool; maj@k = correct.mean()."""
  answers: list
  correct: np.ndarray


def majority_vote(answers: Sequence[Sequence[Optional[Hashable]]], correct: Sequence[Sequence[bool]]) -> MajorityVote:
  """maj@k: per prompt, the most frequent canonical answer among its samples and whether it is correct.

  answers[i]: the canonical (already normalised / extracted, hashable) answers of prompt i's samples; None marks a
  sample without an answer and takes no part in the vote. correct[i]: per-sample correctness (the same length),
  e.g. from a verifier. Winner = the answer with the highest count, ties broken by first occurrence; its correctness
  = that of its first sample. A prompt without any answer votes None, incorrect.
  """
  if len(answers) != len(correct):
    raise ValueError(f"{len(answers)} prompts of answers but {len(correct)} of correctness")
  voted, is_correct = [], np.zeros(len(answers), bool)
  for i, (row, ok) in enumerate(zip(answers, correct)):
    if len(row) != len(ok):
      raise ValueError(f"prompt {i}: {len(row)} answers but {len(ok)} correctness flags")
    counts = collections.Counter(a for a in row if a is not None)
    if not counts:
      voted.append(None)
      continue
    best = max(counts.values())
    j = next(j for j, a in enumerate(row) if a is not None and counts[a] == best)  # first occurrence wins ties
    voted.append(row[j])
    is_correct[i] = bool(ok[j])
  return MajorityVote(voted, is_correct)
