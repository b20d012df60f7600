"""Benchmark of jaxalign.ops.token_logprobs: time and memory of naive, xla and pallas.

Times one jitted forward + backward (value and gradients with respect to hidden and weight of
sum(g * logp)) per impl, next to the matmul floor: 6 N D V FLOPs (forward logits, dhidden,
dweight) at this device's measured matmul rate. Memory: the compiled temporary buffers
(`memory_analysis().temp_size_in_bytes`) and, where the backend reports it
(`device.memory_stats()`, GPU/TPU), the peak bytes in use above the inputs.

Each measurement runs in its own subprocess so that peak-memory counters start clean.

  python bench/logprobs.py                                   # small CPU shape, < 1 minute
  python bench/logprobs.py --n 16384 --d 2048 --v 128256 --dtype bfloat16   # H100 anchors
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

H100_ANCHORS = """\
Anchors measured on an H100 at N=16384, D=2048, V=128256, bf16 (fwd+bwd):
  naive JAX 47.9 ms / 16.9 GiB extra; Liger fused linear CE 48.1 ms / 0.67 GiB;
  TRL chunked 54.5 ms / 1.9 GiB; matmul floor 35.7 ms. Goal: <= 45 ms and <= 1 GiB extra."""


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=1024, help="tokens N")
  p.add_argument("--d", type=int, default=256, help="model width D")
  p.add_argument("--v", type=int, default=8192, help="vocab V")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--impls", default="naive,xla,pallas", help="comma-separated impls")
  p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
  p.add_argument("--entropy", action="store_true", help="also return and use the entropy")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one measurement
  return p.parse_args(argv)


def _inputs(args):
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(args.dtype)
  k = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k[0], (args.n, args.d), jnp.float32).astype(dtype)
  weight = (jax.random.normal(k[1], (args.d, args.v), jnp.float32) / args.d**0.5).astype(dtype)
  targets = jax.random.randint(k[2], (args.n,), -1, args.v)  # a few ignored positions
  g = jax.random.normal(k[3], (args.n,), jnp.float32)
  return hidden, weight, targets, g


def _time(fn, args, repeats):
  """Median wall milliseconds of fn(*args) after one warm-up call."""
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _bytes_in_use(key):
  import jax
  stats = jax.devices()[0].memory_stats()
  return None if not stats or key not in stats else stats[key]


def _child_matmul(args):
  """Matmul rate in FLOP/s: [N, D] @ [D, min(V, 32768)] in the benchmark dtype."""
  import jax
  import jax.numpy as jnp
  hidden, weight, _, _ = _inputs(args)
  w = weight[:, :min(args.v, 32768)]
  mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=a.dtype))
  ms = min(_time(mm, (hidden, w), args.repeats) for _ in range(2))
  return {"rate": 2 * args.n * args.d * w.shape[1] / (ms * 1e-3)}


def _child_impl(args, impl):
  """Median ms, compiled temp bytes and peak extra bytes of one impl's forward + backward."""
  import jax
  import jax.numpy as jnp
  from jaxalign.ops import token_logprobs
  hidden, weight, targets, g = _inputs(args)

  def loss(h, w):
    out = token_logprobs(h, w, targets, temperature=args.temperature,
                         return_entropy=args.entropy, impl=impl)
    if args.entropy:
      return jnp.sum(g * out[0]) + 0.01 * jnp.sum(g * out[1])
    return jnp.sum(g * out)

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = step.lower(hidden, weight).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  before = _bytes_in_use("bytes_in_use")
  ms = _time(compiled, (hidden, weight), args.repeats)
  peak = _bytes_in_use("peak_bytes_in_use")
  extra = None if peak is None or before is None else peak - before
  return {"ms": ms, "temp": temp, "peak_extra": extra}


def _run_child(argv, what):
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", what]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def _gib(x):
  return "n/a" if x is None else f"{x / 2**30:.3f} GiB"


def _table(args, rate, results):
  flops = 6 * args.n * args.d * args.v
  floor_ms = flops / rate * 1e3
  lines = ["| impl | ms | TFLOP/s (6NDV) | x matmul floor | temp memory | peak extra |",
           "|---|---:|---:|---:|---:|---:|"]
  for impl, r in results.items():
    if "error" in r:
      lines.append(f"| {impl} | failed: {r['error']} | | | | |")
      continue
    tflops = flops / (r["ms"] * 1e-3) / 1e12
    lines.append(f"| {impl} | {r['ms']:.2f} | {tflops:.3f} | {r['ms'] / floor_ms:.2f} | "
                 f"{_gib(r['temp'])} | {_gib(r['peak_extra'])} |")
  lines.append(f"| matmul floor (6NDV) | {floor_ms:.2f} | {rate / 1e12:.3f} | 1.00 | | |")
  lines.append(f"| recompute floor (8NDV) | {floor_ms * 4 / 3:.2f} | | 1.33 | | |")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = _parse(argv)
  if args.child:
    import jax
    res = _child_matmul(args) if args.child == "matmul" else _child_impl(args, args.child)
    res["device"] = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    res["jax"] = jax.__version__
    print(json.dumps(res))
    return
  base = [a for a in argv if a != "--child"]
  mm = _run_child(base, "matmul")
  if "error" in mm:
    raise SystemExit(f"matmul rate measurement failed: {mm['error']}")
  results = {}
  for impl in args.impls.split(","):
    on_cpu = mm["device"].startswith("cpu") and impl.startswith("pallas")
    results[impl + (" (interpret)" if on_cpu else "")] = _run_child(base, impl)
  print(f"device {mm['device']}, jax {mm['jax']}, N={args.n} D={args.d} V={args.v} "
        f"{args.dtype}, entropy={args.entropy}, median of {args.repeats}; "
        f"matmul rate {mm['rate'] / 1e12:.3f} TFLOP/s")
  print(_table(args, mm["rate"], results))
  print(H100_ANCHORS)


if __name__ == "__main__":
  main()
