"""Agreement of jaxalign's losses with TRL's own loss code: values and gradients on identical float64 inputs.

  python bench/trl_agreement.py --trl-python /tmp/trl-venv/bin/python [--seeds 0 1 2] [--out table.md]

For every registered jaxalign loss with a TRL counterpart (and the TRL options that map onto its parameters),
both sides evaluate the loss on the same random float64 statistics, several seeds: per-pair summed log-probs,
completion token counts and reference sums (DPO / CPO / ORPO / KTO families), reward-model scores (reward
model), token log-probs, masks, old / reference log-probs, entropies and per-sequence advantages (SFT, GRPO
family, RLOO). jaxalign runs here (jax x64); TRL runs in its own virtual environment
(bench/peers/trl_loss_run.py, which calls TRL's real loss methods on a stand-in trainer object, see its
docstring), so no process imports both torch and jax.

Printed: a markdown table, one row per case: the jaxalign loss and parameters, TRL's trainer and options, the
largest relative value error over the seeds |v_jax - v_trl| / |v_trl|, the largest relative gradient error
max_i |g_jax_i - g_trl_i| / max_i |g_trl_i| (gradients with respect to the policy's summed log-probs, token
log-probs or reward scores), and a note on stubs and conventions. A few "convention" rows put jaxalign's
default against TRL's default where they deliberately differ (GRPO KL estimator, RPO NLL reduction, IPO
length normalisation), to show the size of that gap; every other row should agree to rounding. TRL losses
with no jaxalign counterpart and jaxalign losses with no TRL counterpart are listed after the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import subprocess
import tempfile

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from jaxalign import losses  # noqa: E402
from jaxalign.algorithms import forward  # noqa: E402
from jaxalign.algorithms.objectives import weighted_pair_loss  # noqa: E402
from jaxalign.losses.stats import PairStats, RewardPair, TokenBatch, UnpairedStats  # noqa: E402

PAIRS, TOKENS, SEQS = 8, 16, 8  # pairs / unpaired examples; token positions; RL sequences (2 groups of 4)
T_RL = 12


# ------------------------------------------------------------------------------------------------ inputs

def make_inputs(seed: int) -> dict[str, np.ndarray]:
  """Random float64 statistics of one seed, keyed "group|field"."""
  rng = np.random.default_rng(seed)
  out = {}

  def tokens(n_rows, t, lo=0.05, hi=2.5):
    lengths = rng.integers(1, t, n_rows)
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float64)
    return -rng.uniform(lo, hi, (n_rows, t)) * mask, mask

  # pairs: per-token log-probs (so TRL's models can return them), each position's log sum_v p_v^2 (WPO),
  # reference sequence sums
  for side in ("chosen", "rejected"):
    tok, mask = tokens(PAIRS, TOKENS)
    out[f"pair|tok_{side}"], out[f"pair|mask_{side}"] = tok, mask
    out[f"pair|log_sum_sq_{side}"] = -rng.uniform(0.05, 1.5, (PAIRS, TOKENS))
    out[f"pair|ref_{side}"] = tok.sum(1) - rng.normal(0.0, 2.0, PAIRS)
  # unpaired (KTO): policy tokens, reference sums, labels (both classes present), mismatched KL completions
  tok, mask = tokens(PAIRS, TOKENS)
  desirable = rng.permutation(np.arange(PAIRS) < rng.integers(2, PAIRS - 1))
  kl_tok, kl_mask = tokens(PAIRS, TOKENS)
  out.update({"unpaired|tok": tok, "unpaired|mask": mask, "unpaired|desirable": desirable,
              "unpaired|ref": tok.sum(1) - rng.normal(0.0, 2.0, PAIRS), "unpaired|kl_tok": kl_tok,
              "unpaired|kl_mask": kl_mask,
              "unpaired|kl_ref": kl_tok.sum(1) - rng.normal(rng.normal(0.5, 1.0), 1.0, PAIRS)})
  # reward model
  out.update({"reward|score_chosen": rng.normal(0.5, 2.0, PAIRS), "reward|score_rejected": rng.normal(0, 2.0, PAIRS),
              "reward|margin": rng.uniform(0.0, 1.0, PAIRS)})
  # SFT tokens
  tok, mask = tokens(SEQS, TOKENS)
  out.update({"sft|logps": tok, "sft|mask": mask})
  # RL tokens: off-policy old log-probs (so clipping and masking trigger), reference, advantages, entropies
  lp, mask = tokens(SEQS, T_RL)
  lp = np.where(mask > 0, lp, -rng.uniform(0.05, 2.5, lp.shape))  # finite garbage on padding
  # entropies on the float32 grid: TRL's get_high_entropy_mask takes the quantile of `.float()` entropies
  entropy = rng.uniform(0.0, 3.0, lp.shape).astype(np.float32).astype(np.float64)
  out.update({"rl|logps": lp, "rl|mask": mask, "rl|old_logps": lp + rng.normal(0.0, 0.12, lp.shape),
              "rl|ref_logps": lp + rng.normal(0.0, 0.3, lp.shape), "rl|advantages": rng.normal(0.0, 1.0, SEQS),
              "rl|entropy": entropy})
  return out


# ------------------------------------------------------------------------------------------------ cases

@dataclasses.dataclass
class Case:
  loss: str  # jaxalign registered name
  params: dict  # jaxalign loss.params
  trl: str  # the runner in bench/peers/trl_loss_run.py
  trl_options: dict
  trl_label: str  # TRL trainer + loss_type / option, for the table
  note: str = ""
  inputs: str = ""  # input group; from the runner when empty
  zero_ref: bool = False  # jaxalign side gets S_ref := 0 (reference-free TRL loss mapped to a reference loss)
  counts: tuple = ()  # step counts passed to jaxalign: "num_tokens" (the batch's loss-token count)
  differs: bool = False  # a convention row: jaxalign's default against TRL's default, expected to differ
  id: str = ""
  # loss.wpo / loss.ld_alpha: the pair statistics come from the token log-probs through jaxalign's forward helpers
  pair_options: dict = dataclasses.field(default_factory=dict)


GROUP = {"dpo": "pair", "dpo_f32": "pair", "dpo_patched": "pair", "cpo": "pair", "cdpo": "pair", "orpo": "pair",
         "orpo_patched": "pair", "kto": "unpaired", "reward": "reward", "sft": "sft", "grpo": "rl", "rloo": "rl"}
FDIV = {"forward_kl": "forward_kl", "js": "js_divergence", "alpha": "alpha_divergence"}


def dpo_case(loss, params, loss_type, note="", **opts):
  trl_opts = dict(loss_type=[loss_type], beta=params.get("beta", params.get("tau", 0.1)), **opts)
  div = params.get("divergence")
  if div and div != "reverse_kl":
    trl_opts["f_divergence_type"] = FDIV[div]
    if div == "alpha":
      trl_opts["f_alpha_divergence_coef"] = 1.0 - params["alpha"]
  label = f"DPOTrainer loss_type={loss_type}" + "".join(f", {k}={v}" for k, v in opts.items())
  if div and div != "reverse_kl":
    label += f", f_divergence_type={trl_opts['f_divergence_type']}"
    if div == "alpha":
      label += f", f_alpha_divergence_coef={trl_opts['f_alpha_divergence_coef']:g}"
  return Case(loss, params, "dpo", trl_opts, label, note)


def build_cases() -> list[Case]:
  c = []
  b = dict(beta=0.1)
  c.append(dpo_case("dpo", b, "sigmoid"))
  c.append(dpo_case("f_dpo", dict(beta=0.1, divergence="reverse_kl"), "sigmoid"))
  for div in ("forward_kl", "js"):
    c.append(dpo_case("f_dpo", dict(beta=0.1, divergence=div), "sigmoid"))
  alpha = dict(beta=0.1, divergence="alpha", alpha=0.3)
  f32 = dpo_case("f_dpo", alpha, "sigmoid", "TRL computes exp() in float32 (`.float()`); float64 is not in its "
                 "clamp table (KeyError), so TRL runs on float32 inputs here: f32 rounding, not a formula gap")
  f32.trl, f32.trl_label = "dpo_f32", f32.trl_label + " [float32]"
  c.append(f32)
  patched = dpo_case("f_dpo", alpha, "sigmoid", "TRL's source patched: float64 clamp-table key, no `.float()`")
  patched.trl, patched.trl_label = "dpo_patched", patched.trl_label + " [f64-patched]"
  c.append(patched)
  c.append(dpo_case("hinge", b, "hinge"))
  c.append(dpo_case("ipo", dict(tau=0.1, length_normalize=True), "ipo",
                    "jaxalign ipo default length_normalize=False (paper); TRL = length_normalize=True, tau = beta"))
  c.append(dpo_case("robust_dpo", dict(beta=0.1, eps=0.1), "robust", label_smoothing=0.1))
  c.append(dpo_case("bco", dict(beta=0.1, delta=0.0), "bco_pair",
                    "TRL bco_pair has no running reward mean: jaxalign delta = 0 (its value at the first step)"))
  c.append(dpo_case("sppo_hard", b, "sppo_hard"))
  c.append(dpo_case("nca", b, "nca_pair"))
  c.append(dpo_case("aot", b, "aot"))
  c.append(dpo_case("aot", dict(beta=0.1, label_smoothing=0.1), "aot", label_smoothing=0.1))
  c.append(dpo_case("aot_unpaired", b, "aot_unpaired"))
  c.append(dpo_case("aot_unpaired", dict(beta=0.1, label_smoothing=0.2), "aot_unpaired", label_smoothing=0.2))
  c.append(dpo_case("apo_zero", b, "apo_zero"))
  c.append(dpo_case("apo_down", b, "apo_down"))
  c.append(dpo_case("discopop", dict(beta=0.1, tau=0.05), "discopop"))
  c.append(dpo_case("discopop", dict(beta=0.1, tau=0.5), "discopop", discopop_tau=0.5))
  c.append(dpo_case("sigmoid_norm", b, "sigmoid_norm"))
  c.append(dpo_case("exo_pair", dict(beta=0.1, label_smoothing=1e-3), "exo_pair", label_smoothing=1e-3))
  c.append(dpo_case("exo_pair", dict(beta=0.1, label_smoothing=0.1), "exo_pair", label_smoothing=0.1))
  for div in ("forward_kl", "js"):  # the other losses TRL allows an f-divergence for
    c.append(dpo_case("hinge", dict(beta=0.1, divergence=div), "hinge"))
    c.append(dpo_case("ipo", dict(tau=0.1, length_normalize=True, divergence=div), "ipo"))
    c.append(dpo_case("robust_dpo", dict(beta=0.1, eps=0.1, divergence=div), "robust", label_smoothing=0.1))
    c.append(dpo_case("exo_pair", dict(beta=0.1, label_smoothing=1e-3, divergence=div), "exo_pair",
                      label_smoothing=1e-3))
    c.append(dpo_case("discopop", dict(beta=0.1, tau=0.05, divergence=div), "discopop"))
    c.append(dpo_case("sigmoid_norm", dict(beta=0.1, divergence=div), "sigmoid_norm"))
  for a in (1.0, 0.5):
    c.append(Case("rpo", dict(beta=0.1, alpha=a, nll_reduction="token_mean"), "dpo",
                  dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, a], beta=0.1),
                  f"DPOTrainer loss_type=[sigmoid, sft], loss_weights=[1, {a}]",
                  "TRL 1.16 has no rpo_alpha: RPO = sigmoid + weighted sft (token-mean NLL); jaxalign's default "
                  "nll_reduction is the paper's sequence_mean", counts=("num_tokens",)))
  for formula, types, weights in (("0.8*dpo + 0.2*bco + chosen_nll", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),
                                  ("dpo + 0.5*hinge", ["sigmoid", "hinge"], [1.0, 0.5])):
    c.append(Case(formula, dict(beta=0.1), "dpo", dict(loss_type=types, loss_weights=weights, beta=0.1),
                  f"DPOTrainer loss_type={types}, loss_weights={weights}",
                  "a loss mixture named by its formula (bco's delta 0, as TRL's bco_pair)",
                  counts=("num_tokens",)))
  for name, trl_type in (("dpo", "sigmoid"), ("apo_zero", "apo_zero"), ("sppo_hard", "sppo_hard")):
    c.append(dpo_case(name, b, trl_type, "WPO: each pair's term weighted by exp(mean_t [lp - log sum p^2]) of both "
                      "responses (`forward.wpo_log_weights`, `objectives.weighted_pair_loss`)", use_weighting=True))
    c[-1].pair_options = {"wpo": True}
  for alpha in (0.0, 0.5):
    c.append(dpo_case("dpo", b, "sigmoid", "LD-DPO: token weights from `forward.ld_weights`", ld_alpha=alpha))
    c[-1].pair_options = {"ld_alpha": alpha}
  for name, params in (("cdpo", dict(beta=0.1, eps=0.1)), ("dpo", dict(beta=0.1, label_smoothing=0.1))):
    c.append(Case(name, params, "cdpo", dict(beta=0.1, label_smoothing=0.1),
                  "CPOTrainer.cpo_loss sigmoid, label_smoothing=0.1, on log-ratios",
                  "stub: TRL 1.16 DPOTrainer has no cDPO label smoothing for sigmoid; TRL's cDPO formula is called "
                  "via CPOTrainer.cpo_loss fed S - S_ref"))
  # CPO family (TRL experimental CPOTrainer; NLL stubbed as the chosen completion token mean)
  cpo_note = "stub: concatenated_forward (NLL = chosen completion token mean, as TRL's CPO labels)"
  for params, opts in ((dict(beta=0.1, alpha=1.0), dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0)),
                       (dict(beta=0.1, alpha=1.0, label_smoothing=0.1),
                        dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, label_smoothing=0.1)),
                       (dict(beta=0.1, alpha=0.5, reward_alpha=0.05),
                        dict(loss_type="sigmoid", beta=0.1, cpo_alpha=0.5, alpha=0.05))):
    c.append(Case("cpo", params, "cpo", opts, "CPOTrainer " + ", ".join(f"{k}={v}" for k, v in opts.items()),
                  cpo_note, counts=("num_tokens",)))
  c.append(Case("hinge", dict(beta=0.1), "cpo", dict(loss_type="hinge", beta=0.1, cpo_alpha=0.0),
                "CPOTrainer loss_type=hinge, cpo_alpha=0", "jaxalign has no CPO-hinge: `hinge` with S_ref := 0",
                zero_ref=True))
  c.append(Case("ipo", dict(tau=0.1, length_normalize=True), "cpo", dict(loss_type="ipo", beta=0.1, cpo_alpha=0.0),
                "CPOTrainer loss_type=ipo, cpo_alpha=0",
                "jaxalign has no CPO-ipo: `ipo` (length_normalize) with S_ref := 0", zero_ref=True))
  for params, opts in ((dict(beta=2.0, gamma=0.5), dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0)),
                       (dict(beta=2.0, gamma=0.5, alpha=1.0),
                        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0)),
                       (dict(beta=2.0, gamma=0.5, label_smoothing=0.1),
                        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, label_smoothing=0.1))):
    c.append(Case("simpo", params, "cpo", opts, "CPOTrainer " + ", ".join(f"{k}={v}" for k, v in opts.items()),
                  cpo_note + "; gamma = TRL simpo_gamma (= beta * gamma_beta_ratio of the SimPO code)",
                  counts=("num_tokens",)))
  for params, opts in ((dict(beta=2.5, gamma=0.1, reward_alpha=0.25),
                        dict(loss_type="alphapo", beta=2.5, simpo_gamma=0.1, alpha=0.25)),
                       (dict(beta=2.5, gamma=0.1, reward_alpha=-0.1),
                        dict(loss_type="alphapo", beta=2.5, simpo_gamma=0.1, alpha=-0.1))):
    c.append(Case("alphapo", params, "cpo", opts, "CPOTrainer " + ", ".join(f"{k}={v}" for k, v in opts.items()),
                  "stub: concatenated_forward; CPOConfig turns alphapo into simpo with cpo_alpha=0"))
  orpo_note = ("stub: concatenated_forward with a completion-only NLL (TRL's ORPO NLL covers prompt + completion); "
               "lam = TRL beta")
  c.append(Case("orpo", dict(lam=0.1), "orpo", dict(beta=0.1), "ORPOTrainer beta=0.1 (odds_ratio_loss)",
                orpo_note + "; TRL casts the log-probs to float32 (`.float()`)", counts=("num_tokens",)))
  c.append(Case("orpo", dict(lam=0.1), "orpo_patched", dict(beta=0.1),
                "ORPOTrainer beta=0.1 [f64-patched: no `.float()`]", orpo_note, counts=("num_tokens",)))
  # KTO
  for name, params, opts in (("kto", dict(beta=0.1), dict(loss_type="kto", beta=0.1)),
                             ("kto", dict(beta=0.3, lambda_u=1.33),
                              dict(loss_type="kto", beta=0.3, undesirable_weight=1.33)),
                             ("apo_zero_unpaired", dict(beta=0.1), dict(loss_type="apo_zero_unpaired", beta=0.1)),
                             ("apo_zero_unpaired", dict(beta=0.3, lambda_d=0.8),
                              dict(loss_type="apo_zero_unpaired", beta=0.3, desirable_weight=0.8))):
    c.append(Case(name, params, "kto", opts, "KTOTrainer " + ", ".join(f"{k}={v}" for k, v in opts.items()),
                  "lambda_d / lambda_u = desirable_weight / undesirable_weight; z0 from the mismatched pairs "
                  "(TRL's calculate_KL)" if name == "kto" else "lambda_d / lambda_u = desirable / undesirable_weight"))
  # reward model
  c.append(Case("bradley_terry", dict(center_coef=0.01), "reward", dict(center_rewards_coefficient=0.01, margin=True),
                "RewardTrainer center_rewards_coefficient=0.01, margin column", ""))
  c.append(Case("bradley_terry", dict(center_coef=0.0), "reward", dict(center_rewards_coefficient=None),
                "RewardTrainer center_rewards_coefficient=None, no margin", ""))
  # SFT
  c.append(Case("sft", {}, "sft", dict(loss_type="nll"), "SFTTrainer loss_type=nll", ""))
  c.append(Case("dft", {}, "sft", dict(loss_type="dft"), "SFTTrainer loss_type=dft", ""))
  # GRPO family
  T = T_RL

  def rl(name, params, opts, note="", counts=()):
    label = "GRPOTrainer " + ", ".join(f"{k}={v}" for k, v in opts.items())
    return Case(name, params, "grpo", opts, label, note, counts=counts)

  kl_note = ("TRL default use_bias_correction_kl=True (k3 times the ratio) = jaxalign kl_bias_correction=True "
             "(jaxalign default False)")
  c.append(rl("grpo", dict(beta=0.0), dict(loss_type="grpo", beta=0.0)))
  c.append(rl("grpo", dict(beta=0.04, kl_bias_correction=True), dict(loss_type="grpo", beta=0.04), kl_note))
  c.append(rl("grpo", dict(beta=0.04), dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False)))
  c.append(rl("grpo", dict(beta=0.0, eps_high=0.28), dict(loss_type="grpo", epsilon_high=0.28, beta=0.0)))
  c.append(rl("dr_grpo", dict(max_len=T), dict(loss_type="dr_grpo", beta=0.0, max_completion_length=T),
              "max_len = max_completion_length"))
  c.append(rl("dr_grpo", dict(max_len=T, beta=0.04, kl_bias_correction=True),
              dict(loss_type="dr_grpo", beta=0.04, max_completion_length=T), kl_note))
  c.append(rl("dapo", {}, dict(loss_type="dapo", epsilon_high=0.28, beta=0.0),
              "num_tokens = the batch's loss tokens (TRL num_items_in_batch)", counts=("num_tokens",)))
  c.append(rl("dapo", dict(beta=0.04, kl_bias_correction=True), dict(loss_type="dapo", epsilon_high=0.28, beta=0.04),
              kl_note, counts=("num_tokens",)))
  c.append(rl("dapo", {}, dict(loss_type="bnpo", epsilon_high=0.28, beta=0.0),
              "jaxalign has no `bnpo` name: dapo without num_tokens (local token mean)"))
  c.append(rl("gspo", {}, dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4,
                               epsilon_high=4e-4, beta=0.0), "GSPO = TRL grpo at sequence level"))
  c.append(rl("gspo", dict(beta=0.04), dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4,
                                            epsilon_high=4e-4, beta=0.04, use_bias_correction_kl=False),
              "jaxalign gspo has no kl_bias_correction option"))
  c.append(rl("gspo", dict(aggregation="token_mean"),
              dict(loss_type="dapo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4,
                   beta=0.0), "token_mean aggregation = TRL dapo reduction", counts=("num_tokens",)))
  c.append(rl("gspo_token", {}, dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4,
                                     epsilon_high=4e-4, beta=0.0),
              "TRL has no GSPO-token; same loss and gradient as GSPO with per-sequence advantages"))
  c.append(rl("cispo", dict(eps_max=5.0), dict(loss_type="cispo", epsilon_high=5.0, beta=0.0),
              "eps_max = TRL epsilon_high", counts=("num_tokens",)))
  c.append(rl("cispo", dict(eps_max=1.05), dict(loss_type="cispo", epsilon_high=1.05, beta=0.0),
              "eps_max = TRL epsilon_high (clips here)", counts=("num_tokens",)))
  c.append(rl("cispo", dict(eps_max=1.05, beta=0.04), dict(loss_type="cispo", epsilon_high=1.05, beta=0.04,
                                                           use_bias_correction_kl=False),
              "jaxalign cispo has no kl_bias_correction option", counts=("num_tokens",)))
  c.append(rl("sapo", {}, dict(loss_type="sapo", beta=0.0)))
  c.append(rl("sapo", dict(tau_pos=0.5, tau_neg=2.0, beta=0.04, kl_bias_correction=True),
              dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, beta=0.04), kl_note))
  c.append(rl("vespo", {}, dict(loss_type="vespo", beta=0.0), "", counts=("num_tokens",)))
  c.append(rl("vespo", dict(beta=0.04, kl_bias_correction=True), dict(loss_type="vespo", beta=0.04), kl_note,
              counts=("num_tokens",)))
  c.append(rl("luspo", {}, dict(loss_type="luspo", importance_sampling_level="sequence", epsilon_low=2e-3,
                                epsilon_high=2.5e-3, beta=0.0)))
  c.append(rl("luspo", dict(beta=0.04), dict(loss_type="luspo", importance_sampling_level="sequence",
                                             epsilon_low=2e-3, epsilon_high=2.5e-3, beta=0.04,
                                             use_bias_correction_kl=False),
              "jaxalign luspo has no kl_bias_correction option"))
  # token filters
  for name, params, opts, counts in (
      ("grpo", dict(beta=0.04, kl_bias_correction=True), dict(loss_type="grpo", beta=0.04), ()),
      ("dapo", {}, dict(loss_type="dapo", epsilon_high=0.28, beta=0.0), ("num_tokens",)),
      ("gspo", {}, dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_low=3e-4, epsilon_high=4e-4,
                        beta=0.0), ()),
      ("cispo", dict(eps_max=1.05), dict(loss_type="cispo", epsilon_high=1.05, beta=0.0), ("num_tokens",)),
      ("sapo", {}, dict(loss_type="sapo", beta=0.0), ()),
      ("vespo", {}, dict(loss_type="vespo", beta=0.0), ("num_tokens",)),
      ("luspo", {}, dict(loss_type="luspo", importance_sampling_level="sequence", epsilon_low=2e-3,
                         epsilon_high=2.5e-3, beta=0.0), ())):
    for extra in (dict(top_entropy_quantile=0.2), dict(off_policy_mask_threshold=0.02)):
      c.append(rl(name, {**params, **extra}, {**opts, **extra},
                  "entropies on the float32 grid (TRL takes the quantile of `.float()` entropies)"
                  if "top_entropy_quantile" in extra else "", counts=counts))
  c.append(Case("rloo", dict(clip_eps=0.2), "rloo", dict(epsilon_low=0.2, epsilon_high=0.2),
                "RLOOTrainer epsilon=0.2 (_compute_loss)",
                "loss only: RLOO's leave-one-out advantages (and TRL's normalize_advantages) are computed before the "
                "loss and not compared"))
  # convention rows: jaxalign defaults against TRL defaults where they deliberately differ (size of the gap)
  conv = "convention, expected to differ: "
  c.append(rl("grpo", dict(beta=0.04), dict(loss_type="grpo", beta=0.04),
              conv + "jaxalign default kl_bias_correction=False (plain k3) vs TRL default use_bias_correction_kl=True"))
  c.append(Case("rpo", dict(beta=0.1, alpha=1.0), "dpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                                                              beta=0.1),
                "DPOTrainer loss_type=[sigmoid, sft], loss_weights=[1, 1.0]",
                conv + "jaxalign default nll_reduction=sequence_mean (paper: mean_b S_w/n_w) vs TRL token mean"))
  c.append(dpo_case("ipo", dict(tau=0.1), "ipo", conv + "jaxalign default length_normalize=False (paper, summed "
                    "log-ratios) vs TRL per-token averages"))
  c.append(Case("dpo + chosen_nll", dict(beta=0.1), "dpo", dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                                                                beta=0.1, use_weighting=True),
                "DPOTrainer loss_type=[sigmoid, sft], use_weighting=True",
                conv + "WPO on the token-mean NLL: jaxalign weighs each pair's NLL (sum_b w_b NLL_b / tokens); TRL "
                "1.16's code would scale the batch's token-mean NLL by the mean weight, but its in-place `*=` on "
                "the expanded sft loss raises", counts=("num_tokens",), pair_options={"wpo": True}))
  for case in c[-4:]:
    case.differs = True
  for i, case in enumerate(c):
    case.inputs = case.inputs or GROUP[case.trl]
    case.id = f"{i:03d}-{case.loss}"
  return c


NOT_COMPARED = [
    ("-", "BCOTrainer (running-mean delta)", "TRL 1.16 ships no BCOTrainer; `bco` is compared against DPO "
     "bco_pair with delta = 0"),
]


# ------------------------------------------------------------------------------------------------ jaxalign side

def jax_eval(case: Case, d: dict) -> tuple[float, dict]:
  """jaxalign's loss value and its gradient with respect to the policy statistics."""
  spec = losses.spec(case.loss)
  fn = lambda batch, **kw: spec.fn(batch, **case.params, **kw)[0]  # noqa: E731
  a = {k: jnp.asarray(v) for k, v in d.items()}
  if case.pair_options:
    return jax_eval_from_tokens(case, a)
  if case.inputs == "pair":
    n_c, n_r = a["mask_chosen"].sum(1), a["mask_rejected"].sum(1)
    ref_c, ref_r = (jnp.zeros(PAIRS), jnp.zeros(PAIRS)) if case.zero_ref else (a["ref_chosen"], a["ref_rejected"])
    kw = {"num_tokens": jnp.sum(n_c)} if "num_tokens" in case.counts else {}
    f = lambda s_c, s_r: fn(PairStats(s_c, s_r, ref_c, ref_r, n_c, n_r), **kw)  # noqa: E731
    value, (g_c, g_r) = jax.value_and_grad(f, argnums=(0, 1))(a["tok_chosen"].sum(1), a["tok_rejected"].sum(1))
    return float(value), {"grad_chosen": np.asarray(g_c), "grad_rejected": np.asarray(g_r)}
  if case.inputs == "unpaired":
    kl_policy = a["kl_tok"].sum(1)
    f = lambda s: fn(UnpairedStats(s, a["ref"], a["desirable"], kl_policy, a["kl_ref"]))  # noqa: E731
    value, g = jax.value_and_grad(f)(a["tok"].sum(1))
    return float(value), {"grad": np.asarray(g)}
  if case.inputs == "reward":
    margin = a["margin"] if case.trl_options.get("margin") else None
    f = lambda r_c, r_r: fn(RewardPair(r_c, r_r, margin))  # noqa: E731
    value, (g_c, g_r) = jax.value_and_grad(f, argnums=(0, 1))(a["score_chosen"], a["score_rejected"])
    return float(value), {"grad_chosen": np.asarray(g_c), "grad_rejected": np.asarray(g_r)}
  kw = {"num_tokens": jnp.sum(a["mask"])} if "num_tokens" in case.counts else {}
  if case.inputs == "sft":
    f = lambda lp: fn(TokenBatch(lp, a["mask"]), **kw)  # noqa: E731
    value, g = jax.value_and_grad(f)(a["logps"])
    return float(value), {"grad": np.asarray(g)}
  f = lambda lp: fn(TokenBatch(lp, a["mask"], old_logps=a["old_logps"], ref_logps=a["ref_logps"],  # noqa: E731
                               advantages=a["advantages"], entropy=a["entropy"]), **kw)
  value, g = jax.value_and_grad(f)(a["logps"])
  return float(value), {"grad": np.asarray(g)}


def jax_eval_from_tokens(case: Case, a: dict) -> tuple[float, dict]:
  """loss.wpo / loss.ld_alpha: the pair statistics from per-token log-probs [B, T] through jaxalign's forward
  helpers (rows [B, 2, T], one sequence each), the loss through the objective; the gradient with respect to the
  first token's log-prob of each response (as TRL's runner reads it: that token counts with weight 1)."""
  wpo, ld_alpha = case.pair_options.get("wpo", False), case.pair_options.get("ld_alpha")
  mask = jnp.stack([a["mask_chosen"], a["mask_rejected"]], 1).reshape(2 * PAIRS, TOKENS)
  log_sum_sq = jnp.stack([a["log_sum_sq_chosen"], a["log_sum_sq_rejected"]], 1).reshape(2 * PAIRS, TOKENS)
  batch = {"segment_ids": jnp.ones((PAIRS, 2, TOKENS), jnp.int32)}

  def loss(tok_c, tok_r):
    tok = jnp.stack([tok_c, tok_r], 1).reshape(2 * PAIRS, TOKENS)
    weighted = tok * forward.ld_weights(mask, batch, ld_alpha) if ld_alpha is not None else tok
    s, n = forward.sequence_sums(weighted, mask, batch)  # [B, 2]
    stats = PairStats(s[:, 0], s[:, 1], a["ref_chosen"], a["ref_rejected"], n[:, 0], n[:, 1])
    if not wpo:
      return losses.spec(case.loss).fn(stats, **case.params)[0]
    log_w = forward.wpo_log_weights(tok, log_sum_sq, mask, batch)  # [B, 2]
    stats = stats._replace(weight=jnp.exp(jnp.sum(log_w, axis=1)))
    counts = {"num_pairs": PAIRS, "num_tokens": jnp.sum(n[:, 0])}
    return weighted_pair_loss(case.loss, stats, case.params, counts)[0]

  value, (g_c, g_r) = jax.value_and_grad(loss, argnums=(0, 1))(a["tok_chosen"], a["tok_rejected"])
  return float(value), {"grad_chosen": np.asarray(g_c[:, 0]), "grad_rejected": np.asarray(g_r[:, 0])}


# ------------------------------------------------------------------------------------------------ driver

def rel_value(x: float, y: float) -> float:
  return abs(x - y) / max(abs(y), 1e-300)


def rel_grad(x: np.ndarray, y: np.ndarray) -> float:
  scale = np.max(np.abs(y))
  return float(np.max(np.abs(x - y)) / scale) if scale > 0 else float(np.max(np.abs(x)))


def fmt(x: float) -> str:
  return "0" if x == 0 else f"{x:.1e}"


def params_text(case: Case) -> str:
  return case.loss + ("(" + ", ".join(f"{k}={v}" for k, v in case.params.items()) + ")" if case.params else "")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--trl-python", required=True, help="python of a venv with trl and torch")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--out", help="also write the table to this file")
  args = parser.parse_args()

  cases = build_cases()
  registered = set(losses.available())
  unknown = sorted({c.loss for c in cases if not losses.mixture.is_mixture(c.loss)} - registered)
  if unknown:
    raise SystemExit(f"cases name unregistered losses: {unknown}")
  data = {f"{seed}|{k}": v for seed in args.seeds for k, v in make_inputs(seed).items()}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    np.savez(tmp / "inputs.npz", **data)
    (tmp / "cases.json").write_text(json.dumps([dataclasses.asdict(c) for c in cases]))
    worker = pathlib.Path(__file__).parent / "peers" / "trl_loss_run.py"
    run = subprocess.run([args.trl_python, str(worker), str(tmp / "inputs.npz"), str(tmp / "cases.json"),
                          str(tmp / "out.npz")], capture_output=True, text=True, check=False)
    if run.returncode:
      raise SystemExit(f"TRL worker failed:\n{run.stderr[-4000:]}")
    trl = dict(np.load(tmp / "out.npz"))

  lines = [f"jaxalign vs {trl['versions']}, jax {jax.__version__}; float64 inputs, seeds {args.seeds}; "
           f"{PAIRS} pairs x {TOKENS} tokens, {SEQS} RL sequences x {T_RL} tokens",
           "",
           "| jaxalign loss | TRL trainer + loss_type / option | max rel. value error | max rel. gradient error "
           "| note |",
           "|---|---|---|---|---|"]
  worst = []
  for case in cases:
    v_err, g_err, error = 0.0, 0.0, None
    for seed in args.seeds:
      key = f"{seed}|{case.id}"
      if f"{key}|error" in trl:
        error = str(trl[f"{key}|error"])
        break
      d = {k.split("|", 2)[2]: v for k, v in data.items() if k.startswith(f"{seed}|{case.inputs}|")}
      value, grads = jax_eval(case, d)
      v_err = max(v_err, rel_value(value, float(trl[f"{key}|value"])))
      g_err = max(g_err, max(rel_grad(g, trl[f"{key}|{k}"]) for k, g in grads.items()))
    if error:
      lines.append(f"| {params_text(case)} | {case.trl_label} | not compared | not compared | TRL raised {error} |")
      continue
    worst.append((max(v_err, g_err), case))
    lines.append(f"| {params_text(case)} | {case.trl_label} | {fmt(v_err)} | {fmt(g_err)} | {case.note} |")
  for name, trl_label, note in NOT_COMPARED:
    lines.append(f"| {name} | {trl_label} | not compared | not compared | {note} |")
  covered = {c.loss for c in cases}
  lines += ["", "jaxalign losses without a TRL counterpart (not compared): "
            + ", ".join(sorted(registered - covered))]
  over = [f"{params_text(c)} vs {c.trl_label}: {e:.1e}" for e, c in worst if e > 1e-6 and not c.differs]
  lines += ["", "cases above 1e-6 (convention rows aside): " + ("; ".join(over) if over else "none")]
  table = "\n".join(lines)
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
  main()
