"""Every notebook runs top to bottom on the demo model (so none can rot), and is stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.notebooks

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
KERNEL = "autotune-tests"
# plots each notebook must show: memory x2 + verify; recommendation, knobs, history, Pareto, memory; speculation
MIN_PLOTS = {"01_memory_model": 3, "02_search": 5, "03_speculation": 1}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> str:
    """A kernel spec for this interpreter, found first through JUPYTER_PATH: the notebooks run in the same
    environment as the tests, whatever kernels the user has registered."""
    spec = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "autotune tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(spec.parent.parent))
        mp.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # ipykernel's debugger warns about frozen modules
        yield KERNEL


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_memory_model.ipynb", "02_search.ipynb", "03_speculation.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.fixture(scope="module")
def server(reference_tool) -> None:
    """The reference llama-server the speculation notebook runs, built here (minutes, once) rather than inside a
    notebook cell's time limit."""
    reference_tool("llama-server")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.engine
def test_notebook_runs(path, kernel, demo_model, server, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= MIN_PLOTS[path.stem]
