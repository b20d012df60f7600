"""Reading compiled XLA programs in tests: computations, result shapes and op names from HLO text."""

import math
import re

import jax
from flax import nnx

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][\w\-]*)\(")
_CALLEES = re.compile(r"(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def computations(text):
  """{name: [(result shape text, op, line)]} of an HLO module's text, and the entry's name."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = header.group(2)
        comps[current] = []
        entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif match := _INSTR.match(line):
      comps[current].append((match.group(1), match.group(2), line))
  return comps, entry


def arrays(shape_text):
  """The array shapes of an HLO result (a tuple gives several)."""
  return [tuple(int(d) for d in dims.split(",") if d) for dims in _ARRAY.findall(shape_text)]


def loop_computations(comps, entry):
  """Every computation run by a while loop of the entry (bodies, conditions, what they call)."""
  todo = [c for _, op, line in comps[entry] if op == "while" for c in _CALLEES.findall(line)]
  seen = set()
  while todo:
    name = todo.pop()
    if name not in seen and name in comps:
      seen.add(name)
      todo += [c for _, _, line in comps[name] for c in _CALLEES.findall(line)]
  return seen


def matrix_shapes(abstract) -> set[tuple[int, ...]]:
  """Shapes of the matmul weights (embedding, projections, head): stacked [L, ...] and per layer."""
  shapes = set()
  for var in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    axes = var.get_metadata()["logical_axes"]
    per_layer = tuple(size for size, name in zip(var.shape, axes) if name != "layers")
    if len(per_layer) >= 2:
      shapes |= {tuple(var.shape), per_layer}
  return shapes


_OP_NAME = re.compile(r'op_name="([^"]+)"')


def scoped_ops(comps, scope: str):
  """[(computation, result shape text, op, op_name)] of every instruction whose JAX name stack contains `scope`
  (a `jax.named_scope`)."""
  out = []
  for name, instructions in comps.items():
    for shape, op, line in instructions:
      match = _OP_NAME.search(line)
      if match and scope in match.group(1):
        out.append((name, shape, op, match.group(1)))
  return out


def moved_bytes(shape_text) -> int:
  """Elements an op's result holds (summed over a tuple result)."""
  return sum(math.prod(a) for a in arrays(shape_text))
