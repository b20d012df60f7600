"""TRL's side of bench/trl_agreement.py: TRL's own loss code on the driver's float64 statistics.

  python trl_loss_run.py INPUTS.npz CASES.json OUT.npz

Run with the python of a virtual environment that has trl and torch (never imports jax). For every case and
seed it calls TRL's real loss code path on tensors and saves the loss value and its gradient with respect to the
policy log-probs (`{seed}|{case}|value`, `|grad_chosen`, `|grad_rejected` for pairs and reward scores, `|grad`
for token log-probs / unpaired sequences). Where a TRL method is written for a trainer instance, it is called
unbound on a minimal stand-in object that has only the attributes the method reads, and the model is a stand-in
callable that returns the given log-probs (no network, no tokenizer):

- dpo: `DPOTrainer._compute_loss` (precomputed reference log-probs; the stand-in model returns per-token
  log-probs [2B, T], zero off the completion mask, as TRL's fused LM head does). The gradient of a sequence
  loss with respect to the summed log-prob is read at the first completion token.
- dpo_patched: the same method with TRL's source text patched so that the alpha-divergence path runs in
  float64 (TRL's clamp table has no float64 key, and it casts to float32 with `.float()`).
- cpo: `CPOTrainer.get_batch_loss_metrics` -> the real `cpo_loss`; `concatenated_forward` is stubbed to
  return the (averaged for ipo/simpo, as TRL) log-probs and the chosen token-mean NLL.
- cdpo: `CPOTrainer.cpo_loss` (sigmoid + label_smoothing) fed the reference log-ratios (TRL 1.16's DPO has no
  label smoothing for `sigmoid`).
- orpo: `ORPOTrainer.get_batch_loss_metrics` -> the real `odds_ratio_loss` (`concatenated_forward` stubbed:
  average log-probs and the completion-only chosen NLL); orpo_patched: `odds_ratio_loss` without its `.float()`.
- kto: `KTOTrainer._compute_loss` with the real `_compute_kl_logps` (precomputed reference log-probs).
- reward: `RewardTrainer.compute_loss` (the stand-in model returns the scores as logits).
- sft: `SFTTrainer.compute_loss` (fused-LM-head path: nll or dft).
- grpo: `GRPOTrainer._compute_loss` with the real `get_high_entropy_mask`, `get_off_policy_mask`,
  `get_gamma_weights`; `_get_per_token_logps_and_entropies` returns the given log-probs and entropies.
- rloo: `RLOOTrainer._compute_loss`.

torch's default dtype is float64 here, so the scalars TRL builds with `torch.tensor(...)` are float64 too.
"""

import collections
import inspect
import json
import sys
import textwrap
import types

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)

from trl.experimental.cpo import cpo_trainer  # noqa: E402
from trl.experimental.orpo import orpo_trainer  # noqa: E402
from trl.trainer import dpo_trainer, grpo_trainer, kto_trainer, reward_trainer, rloo_trainer, sft_trainer  # noqa: E402


def identity(x, *args, **kwargs):
  return x


ACCELERATOR = types.SimpleNamespace(device="cpu", num_processes=1, parallelism_config=None, sync_gradients=True,
                                    gather=identity, gather_for_metrics=identity, reduce=identity,
                                    pad_across_processes=identity, unwrap_model=identity)


def stand_in(**attrs):
  """A trainer stand-in: the attributes the loss methods read, plus the bookkeeping they write."""
  base = dict(accelerator=ACCELERATOR, model=types.SimpleNamespace(training=True), aux_loss_enabled=False,
              _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
              _total_train_tokens=0, _tp_size=1)
  base.update(attrs)
  return types.SimpleNamespace(**base)


def patched(cls, name, replacements):
  """`cls.name` recompiled from its source with textual `replacements` (in the defining module's globals)."""
  fn = getattr(cls, name)
  src = textwrap.dedent(inspect.getsource(fn))
  for old, new in replacements:
    assert old in src, (name, old)
    src = src.replace(old, new)
  scope = {}
  exec(compile(src, f"<patched {cls.__name__}.{name}>", "exec"), sys.modules[fn.__module__].__dict__, scope)
  return scope[name]


DPO_F64 = patched(dpo_trainer.DPOTrainer, "_compute_loss", [
    ("torch.float32: 80.0}", "torch.float32: 80.0, torch.float64: 80.0}"),
    ("t_chosen.float()", "t_chosen"), ("t_rejected.float()", "t_rejected")])
ORPO_F64 = patched(orpo_trainer.ORPOTrainer, "odds_ratio_loss", [
    ("policy_chosen_logps.float()", "policy_chosen_logps"),
    ("policy_rejected_logps.float()", "policy_rejected_logps")])


class LogProbModel:
  """Stand-in causal LM for DPO / KTO / SFT: returns fixed per-token log-probs (by input_ids identity)."""

  def __init__(self, outputs, log_sum_sq=None):
    self.outputs = outputs  # id(input_ids) -> log_probs [N, T]
    self.log_sum_sq = log_sum_sq  # log sum_v p_v^2 [N, T] at every position (WPO), or None

  def __call__(self, input_ids, labels=None, **kwargs):
    lp = self.outputs[id(input_ids)]
    zeros = torch.zeros_like(lp.detach())
    return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                                 log_sum_sq_probs=self.log_sum_sq,
                                 label_mask=(labels != -100)[:, 1:] if labels is not None else None)


def token_tensor(mask_shift):
  """input_ids / completion_mask [N, T+1] for a shifted completion mask [N, T] (position 0 is the prompt)."""
  n = mask_shift.shape[0]
  completion = torch.cat([torch.zeros(n, 1), mask_shift], dim=1).long()
  input_ids = torch.ones_like(completion)
  return input_ids, completion


def run_dpo(d, opts, f32=False, fn=None):
  dtype = torch.float32 if f32 else torch.float64
  tok = torch.tensor(np.concatenate([d["tok_chosen"], d["tok_rejected"]]), dtype=dtype, requires_grad=True)
  mask = torch.tensor(np.concatenate([d["mask_chosen"], d["mask_rejected"]]), dtype=dtype)
  input_ids, completion = token_tensor(mask)
  inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion,
            "ref_chosen_logps": torch.tensor(d["ref_chosen"], dtype=dtype),
            "ref_rejected_logps": torch.tensor(d["ref_rejected"], dtype=dtype)}
  loss_types = opts["loss_type"]
  self = stand_in(precompute_ref_logps=True, ld_alpha=opts.get("ld_alpha"), beta=opts.get("beta", 0.1),
                  f_divergence_type=opts.get("f_divergence_type", "reverse_kl"),
                  f_alpha_divergence_coef=opts.get("f_alpha_divergence_coef", 0.5), loss_types=loss_types,
                  loss_weights=opts.get("loss_weights", [1.0] * len(loss_types)),
                  label_smoothing=opts.get("label_smoothing", 0.0),
                  use_weighting=opts.get("use_weighting", False),
                  args=types.SimpleNamespace(discopop_tau=opts.get("discopop_tau", 0.05),
                                             gradient_checkpointing_kwargs=None))
  log_sum_sq = torch.tensor(np.concatenate([d["log_sum_sq_chosen"], d["log_sum_sq_rejected"]]), dtype=dtype)
  model = LogProbModel({id(input_ids): tok * mask}, log_sum_sq)
  loss = (fn or dpo_trainer.DPOTrainer._compute_loss)(self, model, inputs, False)
  loss.backward()
  b = d["tok_chosen"].shape[0]
  grad = tok.grad[:, 0].double().numpy()  # d loss / d (summed log-prob): every completion token carries it
  return loss.item(), {"grad_chosen": grad[:b], "grad_rejected": grad[b:]}


def pair_leaves(d):
  s_c = torch.tensor(d["tok_chosen"].sum(1), requires_grad=True)
  s_r = torch.tensor(d["tok_rejected"].sum(1), requires_grad=True)
  n_c, n_r = torch.tensor(d["mask_chosen"].sum(1)), torch.tensor(d["mask_rejected"].sum(1))
  return s_c, s_r, n_c, n_r


def run_cpo(d, opts):
  s_c, s_r, n_c, n_r = pair_leaves(d)
  loss_type, cpo_alpha = opts["loss_type"], opts.get("cpo_alpha", 1.0)
  if loss_type == "alphapo":  # CPOConfig.__post_init__
    loss_type, cpo_alpha = "simpo", 0.0
  avg = loss_type in ("ipo", "simpo")  # CPOTrainer.concatenated_forward: average_log_prob

  def concatenated_forward(model, batch):
    nll = -s_c.sum() / n_c.sum() if cpo_alpha != 0 else torch.tensor(0.0)  # CE over the chosen completion tokens
    logits = torch.zeros(1)
    return (s_c / n_c if avg else s_c), (s_r / n_r if avg else s_r), logits, logits, nll

  self = stand_in(alpha=opts.get("alpha", 0.0), beta=opts.get("beta", 0.1), loss_type=loss_type,
                  label_smoothing=opts.get("label_smoothing", 0.0), simpo_gamma=opts.get("simpo_gamma", 0.5),
                  cpo_alpha=cpo_alpha, concatenated_forward=concatenated_forward)
  self.cpo_loss = types.MethodType(cpo_trainer.CPOTrainer.cpo_loss, self)
  loss, _ = cpo_trainer.CPOTrainer.get_batch_loss_metrics(self, None, {})
  loss.backward()
  return loss.item(), {"grad_chosen": s_c.grad.numpy(), "grad_rejected": s_r.grad.numpy()}


def run_cdpo(d, opts):
  s_c, s_r, _, _ = pair_leaves(d)
  self = stand_in(alpha=0.0, beta=opts["beta"], loss_type="sigmoid", label_smoothing=opts["label_smoothing"])
  losses, _, _ = cpo_trainer.CPOTrainer.cpo_loss(self, s_c - torch.tensor(d["ref_chosen"]),
                                                 s_r - torch.tensor(d["ref_rejected"]))
  loss = losses.mean()
  loss.backward()
  return loss.item(), {"grad_chosen": s_c.grad.numpy(), "grad_rejected": s_r.grad.numpy()}


def run_orpo(d, opts, f64=False):
  s_c, s_r, n_c, n_r = pair_leaves(d)

  def concatenated_forward(model, batch):
    logits = torch.zeros(1)  # average log-probs (average_log_prob=True); NLL on the chosen completion tokens
    return s_c / n_c, s_r / n_r, logits, logits, -s_c.sum() / n_c.sum()

  self = stand_in(beta=opts["beta"], concatenated_forward=concatenated_forward)
  self.odds_ratio_loss = types.MethodType(ORPO_F64 if f64 else orpo_trainer.ORPOTrainer.odds_ratio_loss, self)
  loss, _ = orpo_trainer.ORPOTrainer.get_batch_loss_metrics(self, None, {})
  loss.backward()
  return loss.item(), {"grad_chosen": s_c.grad.numpy(), "grad_rejected": s_r.grad.numpy()}


def run_kto(d, opts):
  tok = torch.tensor(d["tok"], requires_grad=True)
  mask = torch.tensor(d["mask"])
  input_ids, completion = token_tensor(mask)
  kl_mask = torch.tensor(d["kl_mask"])
  kl_input_ids, kl_completion = token_tensor(kl_mask)
  batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": completion,
           "KL_input_ids": kl_input_ids, "KL_attention_mask": torch.ones_like(kl_input_ids),
           "KL_completion_mask": kl_completion, "label": torch.tensor(d["desirable"]),
           "ref_logps": torch.tensor(d["ref"]), "ref_KL_logps": torch.tensor(d["kl_ref"])}
  self = stand_in(precompute_ref_logps=True, calculate_KL=opts["loss_type"] == "kto", beta=opts["beta"],
                  loss_type=opts["loss_type"], desirable_weight=opts.get("desirable_weight", 1.0),
                  undesirable_weight=opts.get("undesirable_weight", 1.0))
  self._compute_kl_logps = types.MethodType(kto_trainer.KTOTrainer._compute_kl_logps, self)
  model = LogProbModel({id(input_ids): tok * mask, id(kl_input_ids): torch.tensor(d["kl_tok"]) * kl_mask})
  loss = kto_trainer.KTOTrainer._compute_loss(self, model, batch, False)
  loss.backward()
  return loss.item(), {"grad": tok.grad[:, 0].numpy()}


def run_reward(d, opts):
  r_c = torch.tensor(d["score_chosen"], requires_grad=True)
  r_r = torch.tensor(d["score_rejected"], requires_grad=True)
  inputs = {"input_ids": torch.ones(2 * len(r_c), 4).long(), "attention_mask": torch.ones(2 * len(r_c), 4).long()}
  if opts.get("margin"):
    inputs["margin"] = torch.tensor(d["margin"])
  model = lambda **kw: types.SimpleNamespace(logits=torch.cat([r_c, r_r])[:, None])  # noqa: E731
  self = stand_in(args=types.SimpleNamespace(center_rewards_coefficient=opts.get("center_rewards_coefficient")))
  loss = reward_trainer.RewardTrainer.compute_loss(self, model, inputs)
  loss.backward()
  return loss.item(), {"grad_chosen": r_c.grad.numpy(), "grad_rejected": r_r.grad.numpy()}


def run_sft(d, opts):
  tok = torch.tensor(d["logps"], requires_grad=True)
  mask = torch.tensor(d["mask"])
  input_ids, completion = token_tensor(mask)
  labels = input_ids.masked_fill(completion == 0, -100)
  inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
  self = stand_in(compute_loss_func=None, label_smoother=None,
                  args=types.SimpleNamespace(loss_type=opts["loss_type"], average_tokens_across_devices=False))
  model = LogProbModel({id(input_ids): tok * mask})
  loss = sft_trainer.SFTTrainer.compute_loss(self, model, inputs)
  loss.backward()
  return loss.item(), {"grad": tok.grad.numpy()}


def rl_inputs(d):
  lp = torch.tensor(d["logps"], requires_grad=True)
  mask = torch.tensor(d["mask"])
  b, t = mask.shape
  return lp, mask, {"prompt_ids": torch.ones(b, 2).long(), "prompt_mask": torch.ones(b, 2).long(),
                    "completion_ids": torch.ones(b, t).long(), "completion_mask": mask,
                    "advantages": torch.tensor(d["advantages"])}


def run_grpo(d, opts):
  lp, mask, inputs = rl_inputs(d)
  inputs.update(old_per_token_logps=torch.tensor(d["old_logps"]), ref_per_token_logps=torch.tensor(d["ref_logps"]),
                num_items_in_batch=mask.sum())
  entropies = torch.tensor(d["entropy"])
  args = types.SimpleNamespace(use_bias_correction_kl=opts.get("use_bias_correction_kl", True), delta=None,
                               steps_per_generation=1, sapo_temperature_pos=opts.get("sapo_temperature_pos", 1.0),
                               sapo_temperature_neg=opts.get("sapo_temperature_neg", 1.05),
                               vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
  self = stand_in(args=args, loss_type=opts["loss_type"], beta=opts.get("beta", 0.0),
                  epsilon_low=opts.get("epsilon_low", 0.2), epsilon_high=opts.get("epsilon_high", 0.2),
                  importance_sampling_level=opts.get("importance_sampling_level", "token"),
                  top_entropy_quantile=opts.get("top_entropy_quantile", 1.0),
                  off_policy_mask_threshold=opts.get("off_policy_mask_threshold"),
                  max_completion_length=opts.get("max_completion_length"), use_vllm=False,
                  vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1,
                  _entropy_bonus_enabled=False,
                  _get_per_token_logps_and_entropies=lambda *a, **k: (lp, entropies, None),
                  get_off_policy_mask=grpo_trainer.GRPOTrainer.get_off_policy_mask,
                  get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights)
  self.get_high_entropy_mask = types.MethodType(grpo_trainer.GRPOTrainer.get_high_entropy_mask, self)
  loss = grpo_trainer.GRPOTrainer._compute_loss(self, None, inputs)
  loss.backward()
  return loss.item(), {"grad": lp.grad.numpy()}


def run_rloo(d, opts):
  lp, mask, inputs = rl_inputs(d)
  inputs["old_logps"] = (torch.tensor(d["old_logps"]) * mask).sum(1)
  self = stand_in(epsilon_low=opts["epsilon_low"], epsilon_high=opts["epsilon_high"],
                  _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(mask), None))
  loss = rloo_trainer.RLOOTrainer._compute_loss(self, None, inputs)
  loss.backward()
  return loss.item(), {"grad": lp.grad.numpy()}


RUNNERS = {"dpo": run_dpo, "dpo_f32": lambda d, o: run_dpo(d, o, f32=True),
           "dpo_patched": lambda d, o: run_dpo(d, o, fn=DPO_F64), "cpo": run_cpo, "cdpo": run_cdpo,
           "orpo": run_orpo, "orpo_patched": lambda d, o: run_orpo(d, o, f64=True), "kto": run_kto,
           "reward": run_reward, "sft": run_sft, "grpo": run_grpo, "rloo": run_rloo}


def main():
  inputs_path, cases_path, out_path = sys.argv[1:4]
  data = np.load(inputs_path)
  cases = json.loads(open(cases_path).read())
  seeds = sorted({k.split("|")[0] for k in data.files})
  out = {}
  for case in cases:
    for seed in seeds:
      d = {k.split("|", 2)[2]: data[k] for k in data.files if k.startswith(f"{seed}|{case['inputs']}|")}
      try:
        value, grads = RUNNERS[case["trl"]](d, case["trl_options"])
      except Exception as e:  # reported in the table, not fatal
        out[f"{seed}|{case['id']}|error"] = np.array(f"{type(e).__name__}: {e}")
        continue
      out[f"{seed}|{case['id']}|value"] = np.array(value)
      for k, g in grads.items():
        out[f"{seed}|{case['id']}|{k}"] = np.asarray(g, dtype=np.float64)
  import trl
  out["versions"] = np.array(f"trl {trl.__version__}, torch {torch.__version__}")
  np.savez(out_path, **out)


if __name__ == "__main__":
  main()
