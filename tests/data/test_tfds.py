"""TFDS datasets prepared on disk are read through tensorflow-datasets' array_record source, without TensorFlow.

TensorFlow (a test-only dependency) writes the fixture in a subprocess (loading it beside torch and jaxlib in
one test process crashes at import); the reader then runs in a fresh interpreter whose import path holds
every installed package except TensorFlow.
"""

import json
import pathlib
import site
import subprocess
import sys

ROWS = {"prompt": [f"question {i}" for i in range(6)], "completion": [f"answer {i}" for i in range(6)]}

WRITER = """
import json, sys
import tensorflow as tf
import tensorflow_datasets as tfds
rows = json.loads(sys.argv[2])
features = tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "completion": tfds.features.Text()})
tfds.dataset_builders.store_as_tfds_dataset(
  name="toy_sft", version="1.0.0", features=features, split_datasets={"train": tf.data.Dataset.from_tensor_slices(rows)},
  data_dir=sys.argv[1], file_format="array_record")
"""

READER = """
import json, sys
from jaxalign.data import read_records
try:
  import tensorflow
  raise SystemExit("tensorflow is importable; the test environment is wrong")
except ImportError:
  pass
print(json.dumps([record for record, _ in read_records(sys.argv[1])]))
"""


def site_without_tensorflow(tmp_path: pathlib.Path) -> pathlib.Path:
  """A directory of links to every installed top-level package except TensorFlow's."""
  root = tmp_path / "site"
  root.mkdir()
  for packages in site.getsitepackages():
    for entry in pathlib.Path(packages).iterdir():
      if entry.name.startswith(("tensorflow", "tf_keras", "keras")) and not entry.name.startswith(
          ("tensorflow_datasets", "tensorflow_metadata")):
        continue
      if not (root / entry.name).exists():
        (root / entry.name).symlink_to(entry)
  return root


def test_tfds_prepared_dataset_reads_without_tensorflow(tmp_path):
  written = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path / "tfds"), json.dumps(ROWS)],
                           capture_output=True, text=True, timeout=300)
  assert written.returncode == 0, written.stderr[-3000:]
  dataset_dir = tmp_path / "tfds/toy_sft/1.0.0"
  repo = pathlib.Path(__file__).parents[2]
  env = {"PYTHONPATH": f"{repo}:{site_without_tensorflow(tmp_path)}", "PATH": "/usr/bin:/bin"}
  out = subprocess.run([sys.executable, "-S", "-c", READER, str(dataset_dir)], capture_output=True, text=True,
                       env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  records = json.loads(out.stdout.strip().splitlines()[-1])
  assert sorted(records, key=lambda r: r["prompt"]) == [{"prompt": p, "completion": c}
                                                        for p, c in zip(ROWS["prompt"], ROWS["completion"])]
