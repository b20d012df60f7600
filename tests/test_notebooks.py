"""The notebooks: each runs top to bottom in a fresh kernel (nbclient, as `jupyter execute` runs it) with every
figure drawn, and each committed copy keeps the outputs and figures of such a run (regenerate them with
`jupyter execute --inplace notebooks/*.ipynb`). The notebooks check their own claims with asserts, so a run that
no longer shows what the text says fails here."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
# The research notebooks the README lists, each with its plots.
PLOTTED = {"gradient_view", "mesh_sharding", "online_algorithms"}


def images(nb) -> int:
  return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.outputs)


def shown(nb) -> int:
  """Figures the code draws: one per `plt.show()`."""
  return sum(cell.source.count("plt.show()") for cell in nb.cells if cell.cell_type == "code")


def test_there_are_notebooks():
  assert PLOTTED | {"objective_variants"} <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_keeps_the_outputs_of_a_whole_run(path):
  nb = nbformat.read(path, as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "not run top to bottom"
  assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
  assert images(nb) == shown(nb) and (images(nb) > 0) == (path.stem in PLOTTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  assert images(nb) == shown(nb)
