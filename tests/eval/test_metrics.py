"""jaxalign.eval.metrics against independent references: hand-computed cases, the SQuAD definitions, a
longest-common-subsequence table, exact integer binomials, Monte-Carlo draws, a float64 logistic fit (sklearn) and
the bootstrap's sampling behaviour on a known distribution."""

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

from jaxalign.eval import metrics as M

# ---- rule metrics ------------------------------------------------------------------------------------------------


def test_normalize_answer_squad_rules():
  assert M.normalize_answer("The  Cat's, hat!") == "cats hat"
  assert M.normalize_answer("An apple a day\tkeeps...") == "apple day keeps"
  assert M.normalize_answer("Theater and anthem") == "theater and anthem"  # articles only as whole words
  assert M.normalize_answer("  ") == ""


def test_exact_match_per_example_and_best_reference():
  em = M.exact_match(["The Eiffel Tower!", "paris", "blue"], ["eiffel tower", ["Lyon", "Paris."], "red"])
  np.testing.assert_array_equal(em, [1.0, 1.0, 0.0])
  with pytest.raises(ValueError):
    M.exact_match(["a"], ["a", "b"])


def test_token_f1_hand_computed():
  # pred tokens [cat, sat, on, mat], ref [cat, on, mat]: common 3, P = 3/4, R = 1 -> F1 = 6/7.
  f1 = M.token_f1(["the cat sat on the mat", "x x y", "the", "the", "zebra"],
                  ["a cat on a mat", "x y y", "a", "cat", ["horse", "a zebra crossing"]])
  # "x x y" vs "x y y": multiset overlap {x, y} = 2, P = R = 2/3. Empty vs empty: 1 (SQuAD v2); empty vs "cat": 0.
  # "zebra" vs "zebra crossing": P = 1, R = 1/2 -> 2/3 (best of two references).
  np.testing.assert_allclose(f1, [6 / 7, 2 / 3, 1.0, 0.0, 2 / 3], rtol=1e-12)
  assert M.f1_score("Paris", "paris.") == 1.0


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def test_rouge_l_hand_computed_lcs():
  # ref "a b c d e f", pred "a x c y f": LCS "a c f" = 3, P = 3/5, R = 3/6, F = 2PR / (P + R) = 6/11.
  np.testing.assert_allclose(M.rouge_l(["a x c y f"], ["a b c d e f"]), [6 / 11], rtol=1e-12)
  # Lin (2004): "police kill the gunman" vs "police killed the gunman": LCS 3 of 4 -> 0.75; best of two references.
  np.testing.assert_allclose(M.rouge_l(["police kill the gunman"], [["the gunman police", "police killed the gunman"]]),
                             [0.75], rtol=1e-12)
  assert M.rouge_l(["nothing shared"], ["completely different"])[0] == 0.0


def test_rouge_l_matches_an_lcs_table_on_random_sequences():
  rng = np.random.default_rng(0)
  vocab = list("abcdefg")
  preds, refs, expected = [], [], []
  for _ in range(30):
    p = list(rng.choice(vocab, rng.integers(1, 12)))
    r = list(rng.choice(vocab, rng.integers(1, 12)))
    lcs = _lcs(p, r)
    expected.append(0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r)))  # F = 2 LCS / (|p| + |r|)
    preds.append(" ".join(p))
    refs.append(" ".join(r))
  np.testing.assert_allclose(M.rouge_l(preds, refs), expected, rtol=1e-12)


def test_rule_metrics_are_means_of_per_example_values():
  preds, refs = ["The cat sat.", "a b c", "q"], ["cat sat", ["x", "b c d"], "r"]
  means = M.rule_metrics(preds, refs)
  assert means["exact_match"] == pytest.approx(1 / 3)
  assert means["f1"] == pytest.approx((1.0 + 2 * (2 / 2) * (2 / 3) / (1 + 2 / 3) + 0.0) / 3)  # "b c" vs "b c d": 0.8
  assert means["rougeL"] == pytest.approx(M.rouge_l(preds, refs).mean())


# ---- bootstrap ---------------------------------------------------------------------------------------------------


def test_bootstrap_ci_is_the_percentile_bootstrap_of_its_index_matrix():
  values = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
  est, low, high = M.bootstrap_ci(values, resamples=500, seed=7)
  idx = np.random.default_rng(7).integers(0, len(values), size=(500, len(values)))  # reference: one draw
  stats = values[idx].mean(axis=1)
  assert est == values.mean()
  np.testing.assert_allclose([low, high], np.quantile(stats, [0.025, 0.975]), rtol=1e-12)
  med = M.bootstrap_ci(values, statistic=np.median, confidence=0.8, resamples=500, seed=7)
  np.testing.assert_allclose([med.low, med.high], np.quantile(np.median(values[idx], axis=1), [0.1, 0.9]))
  assert med.estimate == np.median(values)


def test_bootstrap_ci_chunks_and_paired_columns(monkeypatch):
  rng = np.random.default_rng(1)
  values = rng.normal(size=(50, 2))
  whole = M.bootstrap_ci(values, resamples=300, seed=3)
  monkeypatch.setattr(M, "_MAX_BOOTSTRAP_ELEMENTS", 50 * 7)  # 7 resamples per chunk
  chunked = M.bootstrap_ci(values, resamples=300, seed=3)
  assert whole.estimate.shape == (2,)
  np.testing.assert_allclose(np.stack(chunked), np.stack(whole))  # chunked draws continue the same stream
  assert np.all(whole.low <= whole.estimate) and np.all(whole.estimate <= whole.high)


def test_bootstrap_ci_covers_the_true_mean_and_shrinks_like_one_over_sqrt_n():
  sigma, mu = 2.0, 1.0
  covered = 0
  for trial in range(200):
    sample = np.random.default_rng(100 + trial).normal(mu, sigma, 60)
    _, low, high = M.bootstrap_ci(sample, resamples=400, seed=trial)
    covered += low <= mu <= high
  assert 0.88 <= covered / 200 <= 0.99
  widths = {}
  for n in (100, 1600):
    _, low, high = M.bootstrap_ci(np.random.default_rng(n).normal(mu, sigma, n), resamples=2000, seed=0)
    widths[n] = high - low
    assert widths[n] == pytest.approx(2 * 1.959964 * sigma / math.sqrt(n), rel=0.15)  # normal-theory width
  assert 3.3 < widths[100] / widths[1600] < 4.7  # sqrt(1600 / 100) = 4


# ---- win rates ---------------------------------------------------------------------------------------------------


def test_win_rate_ties_count_half():
  policy, baseline = [3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 4.0]  # win, tie, loss, win
  np.testing.assert_array_equal(M.preference_outcomes(policy, baseline), [1, 0, -1, 1])
  est, low, high = M.win_rate(policy, baseline)
  assert est == 2.5 / 4 and 0.0 <= low <= est <= high <= 1.0
  np.testing.assert_array_equal(M.preference_outcomes(policy, baseline, tie_tolerance=1.0), [1, 0, 0, 0])
  assert M.win_rate(policy, [2.0, 1.0, 3.0, 6.0]).estimate == 1.5 / 4
  assert M.win_rate_from_outcomes([1, 0, -1, 1]) == M.win_rate(policy, baseline)
  with pytest.raises(ValueError):
    M.win_rate_from_outcomes([2, 0])


def _loss(b, x, y, w):
  z = b[0] + b[1] * x
  return float(np.sum(w * (np.logaddexp(0, z) - y * z)))


def _synthetic(n, intercept, slope, shift, seed, tie_rate=0.1):
  """Judge outcomes with P(policy preferred) = sigmoid(intercept + slope tanh(d / std d)), d ~ N(shift, 200)."""
  rng = np.random.default_rng(seed)
  d = rng.normal(shift, 200.0, n)
  p = 1 / (1 + np.exp(-(intercept + slope * np.tanh(d / d.std(ddof=1)))))
  u = rng.random(n)
  outcomes = np.where(u < tie_rate, 0, np.where(rng.random(n) < p, 1, -1))
  return outcomes, 400.0 + d, np.full(n, 400.0)


def test_lc_logistic_fit_matches_a_float64_reference_fit():
  outcomes, lp, lb = _synthetic(400, 0.3, 1.2, 50.0, seed=0)
  res = M.length_controlled_win_rate(outcomes, lp, lb, resamples=50)
  d = lp - lb
  x, y = np.tanh(d / d.std(ddof=1)), (outcomes + 1) / 2
  b = np.array([res.intercept, res.length_coef])
  # Score equations of the soft-label log-loss hold, and every nearby point has a larger loss.
  p = 1 / (1 + np.exp(-(b[0] + b[1] * x)))
  np.testing.assert_allclose([np.sum(y - p), np.sum((y - p) * x)], [0, 0], atol=1e-8)
  for delta in ([1e-3, 0], [-1e-3, 0], [0, 1e-3], [0, -1e-3], [1e-3, -1e-3]):
    assert _loss(b + delta, x, y, 1.0) > _loss(b, x, y, 1.0)
  assert res.win_rate == pytest.approx(1 / (1 + math.exp(-res.intercept)), rel=1e-14)
  assert res.raw_win_rate == y.mean() and res.length_scale == d.std(ddof=1)
  # sklearn, unpenalised: a tie is a win row and a loss row of weight 0.5 each (AlpacaEval's duplication).
  from sklearn import linear_model
  X2, y2, w2 = np.concatenate([x, x])[:, None], np.r_[np.ones_like(y), np.zeros_like(y)], np.r_[y, 1 - y]
  ref = linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(X2, y2, sample_weight=w2)
  np.testing.assert_allclose(b, [ref.intercept_[0], ref.coef_[0, 0]], rtol=1e-6, atol=1e-8)
  # l2 > 0 is a ridge on the length coefficient only: compare with a grid-free check of its score equations.
  pen = M.length_controlled_win_rate(outcomes, lp, lb, l2=5.0, resamples=10)
  p = 1 / (1 + np.exp(-(pen.intercept + pen.length_coef * x)))
  np.testing.assert_allclose([np.sum(y - p), np.sum((y - p) * x) - 5.0 * pen.length_coef], [0, 0], atol=1e-8)
  assert abs(pen.length_coef) < abs(res.length_coef)


def test_lc_equals_raw_win_rate_when_lengths_are_equal():
  outcomes = np.random.default_rng(2).choice([-1, 0, 1], size=300, p=[0.3, 0.1, 0.6])
  lengths = np.full(300, 123.0)
  res = M.length_controlled_win_rate(outcomes, lengths, lengths, resamples=300, seed=4)
  raw = M.win_rate_from_outcomes(outcomes, resamples=300, seed=4)
  assert res.win_rate == pytest.approx(raw.estimate, rel=1e-12) and res.raw_win_rate == raw.estimate
  assert res.length_coef == 0.0
  np.testing.assert_allclose([res.low, res.high], [raw.low, raw.high], rtol=1e-8)  # same resamples, refitted


def test_lc_removes_a_win_that_comes_only_from_length():
  # Equal quality (intercept 0), a judge that likes length, a policy ~150 characters longer: raw win rate >> 1/2.
  outcomes, lp, lb = _synthetic(3000, 0.0, 2.0, 150.0, seed=5)
  res = M.length_controlled_win_rate(outcomes, lp, lb, resamples=200)
  assert res.raw_win_rate > 0.63  # population value ~0.66
  assert abs(res.win_rate - 0.5) < 0.04 and res.low < 0.5 < res.high
  # A better policy (sigmoid(1) = 0.731 at equal length) that writes shorter answers: raw under-states it.
  outcomes, lp, lb = _synthetic(3000, 1.0, 2.0, -150.0, seed=6)
  res = M.length_controlled_win_rate(outcomes, lp, lb, resamples=200)
  truth = 0.5 * 0.1 + 0.9 / (1 + math.exp(-1.0))  # 10% judged ties count half
  assert res.raw_win_rate < 0.56 and abs(res.win_rate - truth) < 0.04 and res.low < truth < res.high


def test_lc_separated_by_length_warns_and_degenerate_cases():
  d = np.array([-30.0, -20.0, -10.0, 10.0, 20.0, 30.0])
  outcomes = np.sign(d)  # the policy wins exactly when it is longer: no finite MLE
  with pytest.warns(RuntimeWarning, match="separated"):
    M.length_controlled_win_rate(outcomes, 100 + d, np.full(6, 100.0), resamples=20)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ridge = M.length_controlled_win_rate(outcomes, 100 + d, np.full(6, 100.0), l2=1.0, resamples=20)
    assert ridge.win_rate == pytest.approx(0.5, abs=1e-9) and np.isfinite(ridge.length_coef)  # symmetric data
    always = M.length_controlled_win_rate(np.ones(6), 100 + d, np.full(6, 100.0), resamples=20)
    assert always.win_rate == 1.0 and always.raw_win_rate == 1.0


# ---- position bias -----------------------------------------------------------------------------------------------


def test_position_bias_hand_computed():
  res = M.position_bias([1, 1, -1, 0], [1, -1, -1, 1])
  assert res.consistency == 0.5
  # First position wins: A in A-first order (prompts 0, 1) + B in B-first order (prompts 1, 2): 4 of 8 judgements.
  assert res.first_position_win_rate == 4 / 8
  assert res.second_position_win_rate == 3 / 8  # B in A-first (prompt 2) + A in B-first (prompts 0, 3)
  np.testing.assert_array_equal(res.outcomes, [1, 0, -1, 0])
  first_always = M.position_bias([1, 1, 1], [-1, -1, -1])
  assert (first_always.consistency, first_always.first_position_win_rate) == (0.0, 1.0)
  assert M.win_rate_from_outcomes(first_always.outcomes).estimate == 0.5
  with pytest.raises(ValueError):
    M.position_bias([1, 2], [1, 1])


# ---- pass@k and maj@k --------------------------------------------------------------------------------------------


def test_pass_at_k_equals_the_exact_combinatorial_formula():
  for n in range(1, 21):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert M.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
  exact = 1 - Fraction(math.comb(100, 50), math.comb(200, 50))  # binomials far beyond float range in between
  assert M.pass_at_k(200, 100, 50) == pytest.approx(float(exact), rel=1e-12)
  np.testing.assert_allclose(M.pass_at_k(np.array([10, 10, 5]), np.array([0, 3, 5]), 4),
                             [0.0, 1 - math.comb(7, 4) / math.comb(10, 4), 1.0])
  for bad in ((5, 6, 1), (5, 2, 6), (5, 2, 0)):
    with pytest.raises(ValueError):
      M.pass_at_k(*bad)


def test_pass_at_k_monte_carlo():
  n, c, k, draws = 10, 3, 4, 200_000
  rng = np.random.default_rng(0)
  chosen = np.argsort(rng.random((draws, n)), axis=1)[:, :k]  # k of n without replacement; samples 0..c-1 correct
  hit = (chosen < c).any(axis=1).mean()
  expected = M.pass_at_k(n, c, k)
  assert abs(hit - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)


def test_majority_vote_first_occurrence_breaks_ties():
  answers = [["b", "a", "a", "b"], ["7", None, "7", "3"], [None, None], ["x"]]
  correct = [[False, True, True, False], [True, False, True, False], [False, False], [True]]
  res = M.majority_vote(answers, correct)
  assert res.answers == ["b", "7", None, "x"]
  np.testing.assert_array_equal(res.correct, [False, True, False, True])
  assert res.correct.mean() == 0.5  # maj@k
  with pytest.raises(ValueError):
    M.majority_vote([["a"]], [[True, False]])
