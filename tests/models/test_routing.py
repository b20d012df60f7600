"""Mixture-of-experts routing: the router's auxiliary losses against float64 NumPy and transformers, and routing
replay: the training path, given the sampler's recorded experts, computes the sampler's log-probs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.algorithms.forward import shared_prompt_token_logps, token_logps
from jaxalign.algorithms.online.packing import packed_rows, plan, unpack
from jaxalign.models import CausalLM, save_hf, tiny
from jaxalign.models import routing
from jaxalign.rollout import SamplingConfig, generate, left_pad
from tests.models.test_hf_parity import padded_batch, randomize_jax

V = 50


def np_losses(logits, experts, mask):
  """float64 reference: transformers' load_balancing_loss_func (pooled over layers and tokens) and the mean
  squared logsumexp. logits [L, N, E], experts [L, N, k], mask [N]."""
  logits = np.asarray(logits, np.float64)
  e = logits.shape[-1]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  m = np.broadcast_to(np.asarray(mask, np.float64), logits.shape[:2])[..., None]
  onehot = np.eye(e)[np.asarray(experts)].sum(-2)  # [L, N, E] assignments
  tokens = m.sum()
  balance = e * np.sum((onehot * m).sum((0, 1)) / tokens * (probs * m).sum((0, 1)) / tokens)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return balance, np.sum(lse**2 * m[..., 0]) / tokens


def stats_of(logits, k, mask):
  stacked = [routing.router_stats(l, routing.route(l, k, False).experts, mask) for l in logits]
  return jax.tree.map(lambda *x: jnp.stack(x), *stacked)


def test_router_losses_and_their_gradients_equal_float64_references():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 2, (3, 40, 6)), jnp.float32)  # [L, N, E]
  mask = jnp.asarray(rng.random(40) < 0.7, jnp.float32)
  k = 2
  experts = jax.lax.top_k(logits, k)[1]
  balance, z = np_losses(logits, experts, mask)
  stats = stats_of(logits, k, mask)
  np.testing.assert_allclose(routing.balance_loss(stats), balance, rtol=1e-5)
  np.testing.assert_allclose(routing.z_loss(stats), z, rtol=1e-5)
  # Perfect balance gives k, and the balance loss has no gradient through the (integer) assignments.
  even = stats._replace(load=jnp.full_like(stats.load, 40 * k / 6), probs=jnp.full_like(stats.probs, 40 / 6),
                        tokens=jnp.full_like(stats.tokens, 40.0))
  np.testing.assert_allclose(routing.balance_loss(even), k, rtol=1e-6)

  def ours(x):
    s = jax.tree.map(lambda *a: jnp.stack(a), *[routing.router_stats(l, e, mask) for l, e in zip(x, experts)])
    return routing.balance_loss(s) + 0.3 * routing.z_loss(s)

  grad = np.asarray(jax.grad(ours)(logits), np.float64)
  x64, h = np.asarray(logits, np.float64), 1e-6
  for index in [(0, 3, 1), (1, 17, 5), (2, 39, 0), (0, 0, 2)]:
    plus, minus = x64.copy(), x64.copy()
    plus[index] += h
    minus[index] -= h
    fd = (sum(w * v for w, v in zip((1, 0.3), np_losses(plus, experts, mask)))
          - sum(w * v for w, v in zip((1, 0.3), np_losses(minus, experts, mask)))) / (2 * h)
    np.testing.assert_allclose(grad[index], fd, rtol=2e-3, atol=1e-6)


def test_router_stats_match_transformers_aux_loss_and_router_logits(tmp_path):
  """A padded batch through a tiny Qwen2-MoE: the balance loss equals transformers' `aux_loss` (its
  load_balancing_loss_func with the attention mask), the z-loss its router logits' mean squared logsumexp."""
  cfg = tiny("qwen2_moe", vocab_size=97, pad_token_id=0)
  model = CausalLM(cfg, rngs=nnx.Rngs(3))
  randomize_jax(model, 3)
  save_hf(model, cfg, tmp_path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  ids, mask = padded_batch(np.random.default_rng(4))
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
  router_logits = np.stack([r.double().numpy() for r in out.router_logits])  # [L, B*T, E]
  with routing.collecting() as collected:
    model(jnp.asarray(ids), jnp.asarray(mask))
  (stats,) = collected
  np.testing.assert_allclose(routing.balance_loss(stats), float(out.aux_loss), rtol=1e-5)
  experts = np.argsort(-router_logits, axis=-1, kind="stable")[..., :cfg.num_experts_per_tok]
  np.testing.assert_allclose(routing.z_loss(stats), np_losses(router_logits, experts, mask.reshape(-1))[1], rtol=1e-5)
  assert float(jnp.sum(stats.tokens)) == cfg.num_layers * mask.sum()  # padding counts nowhere


def near_tied_moe(scan_layers=False, seed=1, eps=1e-8):
  """A tiny Qwen3-MoE whose router scores experts 0 and 1 almost alike (gate columns eps apart): the cached
  sampler and the full training forward, equal up to float32 rounding, then route some tokens differently."""
  model = CausalLM(tiny("qwen3_moe", vocab_size=V, num_experts_per_tok=1, scan_layers=scan_layers),
                   rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(0)
  for gate in [model.model.layers.mlp.gate] if scan_layers else [b.mlp.gate for b in model.model.layers]:
    k = np.array(gate.kernel[...])
    k[..., 1] = k[..., 0] + eps * rng.standard_normal(k[..., 0].shape)
    gate.kernel[...] = jnp.asarray(k)
  return model


def rollout_of(model, group_size=1):
  rng = np.random.default_rng(1)
  ids, mask = left_pad([rng.integers(1, V, size=n).tolist() for n in (4, 9, 2, 6)], pad_id=0)
  cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, eos_token_id=(-1,))
  return nnx.jit(generate, static_argnames=("cfg", "group_size"))(model, ids, mask, jax.random.key(2), cfg,
                                                                  group_size=group_size)


def rows_of(rollout, replay):
  rows = {"input_ids": jnp.concatenate([rollout.prompt_ids, rollout.tokens], 1),
          "segment_ids": jnp.concatenate([rollout.prompt_mask, rollout.mask], 1),
          "loss_mask": jnp.concatenate([jnp.zeros_like(rollout.prompt_mask), rollout.mask], 1)}
  return {**rows, "routed_experts": rollout.routing} if replay else rows


@functools.partial(nnx.jit, static_argnames=("replay", "layout", "group"))
def completion_logps(model, rollout, replay, layout, group=1):
  """The training path's log-probs [R, N] of the sampled completions: rows run padded, packed, or with each
  group's prompt run once."""
  rows, p = rows_of(rollout, replay), rollout.prompt_ids.shape[1]
  if layout == "shared_prompt":
    return shared_prompt_token_logps(model, rows, p, group)[0]
  if layout == "packed":
    packing = plan(rows["segment_ids"], 0.8)
    return unpack(token_logps(model, packed_rows(rows, packing))[0], packing, targets=True)[:, p - 1:]
  return token_logps(model, rows)[0][:, p - 1:]


@pytest.mark.parametrize("layout,scan_layers,group", [("padded", False, 1), ("padded", True, 1),
                                                      ("packed", False, 1), ("shared_prompt", False, 3)])
def test_replayed_routing_gives_the_sampler_logprobs(layout, scan_layers, group):
  model = near_tied_moe(scan_layers)
  rollout = rollout_of(model, group)
  assert rollout.routing.shape == (4 * group, rollout.prompt_ids.shape[1] + 12, 2, 1)
  assert np.all(np.asarray(rollout.routing)[:, -1] == routing.NOT_RECORDED)  # the last token never ran
  on = np.asarray(rollout.mask) == 1
  gap = {replay: np.abs(np.where(on, completion_logps(model, rollout, replay, layout, group) - rollout.logprobs, 0))
         for replay in (False, True)}
  assert gap[False].max() > 1e-3  # near-tied routers flip between the two forwards...
  assert gap[True].max() < 1e-5  # ...unless the training path replays the sampler's choice


def test_replay_routes_recorded_tokens_and_leaves_the_rest_to_the_router():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  replay = jnp.asarray([[3, 2], [0, 1], [-1, -1], [2, 0], [-1, -1]], jnp.int8)
  out = jax.tree.map(np.asarray, routing.route(logits, 2, True, replay))
  own = jax.tree.map(np.asarray, routing.route(logits, 2, True))
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_array_equal(out.experts[[0, 1, 3]], np.asarray(replay)[[0, 1, 3]])
  np.testing.assert_array_equal(out.experts[[2, 4]], own.experts[[2, 4]])
  picked = np.take_along_axis(probs, out.experts, -1)
  np.testing.assert_allclose(out.weights, picked / picked.sum(-1, keepdims=True), rtol=1e-6)
