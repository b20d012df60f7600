"""Record readers: JSON Lines (.jsonl, .jsonl.gz, .json), Parquet, HF `datasets` directories
(`save_to_disk`), and TFDS datasets prepared on disk. Each yields (record dict, where) pairs, where
`where` is "file:line" (or "file:row") for error messages.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import zlib
from collections.abc import Iterator


class DataError(ValueError):
  """Unusable input data; the message names the file and line (or row) and what is wrong."""


Record = tuple[dict, str]


def _utf8(data: bytes, path: pathlib.Path, number: int = 1) -> str:
  """Decode UTF-8 text starting at line `number` (a leading byte-order mark on line 1 is dropped).

  Bad bytes are a DataError naming the file, line and byte column.
  """
  try:
    return data.decode("utf-8-sig" if number == 1 else "utf-8")
  except UnicodeDecodeError as e:
    line = number + data.count(b"\n", 0, e.start)
    column = e.start - data.rfind(b"\n", 0, e.start)
    raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {column})") from None


def _lines(path: pathlib.Path) -> Iterator[tuple[int, bytes]]:
  """(line number, raw bytes) of a plain or gzip file; a damaged gzip stream is a DataError."""
  number = 0
  with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
    try:
      for number, line in enumerate(f, 1):
        yield number, line
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
      if number == 0 and isinstance(e, gzip.BadGzipFile):
        raise DataError(f"{path}: not a gzip file") from None
      raise DataError(f"{path}: truncated or corrupt gzip stream after line {number}") from None


def read_jsonl(path: pathlib.Path) -> Iterator[Record]:
  number, empty = 0, True
  for number, raw in _lines(path):
    line = _utf8(raw, path, number)
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    empty = False
    yield record, f"{path}:{number}"
  if empty:
    raise DataError(f"{path}: no records ({'only blank lines' if number else 'empty file'})")


def read_json_array(path: pathlib.Path) -> Iterator[Record]:
  text = _utf8(path.read_bytes(), path)
  if not text.strip():
    raise DataError(f"{path}: no records (empty file)")
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON list of objects")
  if not records:
    raise DataError(f"{path}: no records (empty JSON list)")
  for i, record in enumerate(records):
    yield record, f"{path}:item {i}"


def _arrow_rows(table, where: str) -> Iterator[Record]:
  for i, record in enumerate(table.to_pylist()):
    yield record, f"{where}:row {i}"


def read_parquet(path: pathlib.Path) -> Iterator[Record]:
  import pyarrow.parquet as pq

  if path.stat().st_size == 0:
    raise DataError(f"{path}: no records (empty file)")
  table = pq.read_table(path)
  if table.num_rows == 0:
    raise DataError(f"{path}: no records (no rows)")
  yield from _arrow_rows(table, str(path))


def read_hf_saved(path: pathlib.Path) -> Iterator[Record]:
  """A `datasets.Dataset.save_to_disk` directory (Arrow stream files listed in state.json)."""
  import pyarrow as pa

  state = json.loads((path / "state.json").read_text())
  for entry in state["_data_files"]:
    file = path / entry["filename"]
    with pa.memory_map(str(file)) as source:
      yield from _arrow_rows(pa.ipc.open_stream(source).read_all(), str(file))


def read_tfds(path: pathlib.Path, split: str = "train") -> Iterator[Record]:
  """A TFDS dataset prepared on disk (array_record files), read without TensorFlow."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(f"{path}: reading TFDS data needs the 'tfds' extra (pip install jaxalign[tfds])") from None
  builder = tfds.builder_from_directory(str(path))
  source = builder.as_data_source(split=split)
  for i in range(len(source)):
    yield {k: _decode(v) for k, v in source[i].items()}, f"{path}[{split}]:row {i}"


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if hasattr(value, "tolist"):
    return _decode(value.tolist())
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  return value


def read_records(source: str) -> Iterator[Record]:
  """Records from a file or dataset directory, chosen by extension / directory contents.

  A TFDS split is selected with `path::split` (default train).
  """
  spec, _, split = source.partition("::")
  path = pathlib.Path(spec)
  if path.is_dir():
    if (path / "state.json").exists():
      return read_hf_saved(path)
    if (path / "dataset_info.json").exists() and (path / "features.json").exists():
      return read_tfds(path, split or "train")
    raise DataError(f"{path}: directory is neither an HF save_to_disk dataset nor a prepared TFDS dataset")
  if not path.exists():
    raise DataError(f"{path}: no such data file")
  name = path.name
  if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
    return read_jsonl(path)
  if name.endswith(".json"):
    return read_json_array(path)
  if name.endswith(".parquet"):
    return read_parquet(path)
  raise DataError(f"{path}: unknown data format (use .jsonl, .jsonl.gz, .json, .parquet or a dataset directory)")
