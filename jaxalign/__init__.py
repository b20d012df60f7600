"""jaxalign: aligning language models with human and programmatic feedback in JAX / Flax NNX."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchAdvice(_logging.Filter):
  """Drops transformers' import-time "PyTorch was not found" advice: jaxalign uses only its tokenizers and configs.

  A filter on the "transformers" logger sees only records of that logger itself (transformers/__init__.py), not of
  its submodules; every other message passes.
  """

  def filter(self, record: _logging.LogRecord) -> bool:
    return not (isinstance(record.msg, str) and record.msg.startswith("PyTorch was not found."))


_logging.getLogger("transformers").addFilter(_NoTorchAdvice())
