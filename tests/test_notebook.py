"""notebooks/quickstart.ipynb runs top to bottom (smoke settings) and draws its figures.

Executed with nbclient on the ``python3`` kernel (jupyter_client starts it with this interpreter, so the venv's
packages are used), with ``SPARSEGRAD_NOTEBOOK_SMOKE=1`` in the kernel's environment. Skipped only when the GLUE data
directory (``SPARSEGRAD_GLUE_DIR`` or ``../shared/data/glue`` from the repository root) is missing.
"""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
GLUE_DIR = os.path.abspath(os.environ.get("SPARSEGRAD_GLUE_DIR") or os.path.join(ROOT, "..", "shared", "data", "glue"))


def test_notebook_committed_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "strip the notebook's outputs before committing"


@pytest.mark.skipif(not os.path.isfile(os.path.join(GLUE_DIR, "SST-2", "train.tsv")),
                    reason=f"GLUE SST-2 TSVs not found under {GLUE_DIR} (set SPARSEGRAD_GLUE_DIR)")
def test_quickstart_notebook_executes(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SPARSEGRAD_NOTEBOOK_SMOKE", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("SPARSEGRAD_GLUE_DIR", GLUE_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("SPARSEGRAD_NOTEBOOK_THREADS", "1")  # like conftest's torch.set_num_threads(1)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the notebook's %matplotlib inline decide

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) >= 2, "expected the gradient figure and the per-layer bar chart"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SMOKE=True" in text
    assert "in the SparseGrad basis" in text and "max |Δ logits|" in text
