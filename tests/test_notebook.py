"""notebooks/quickstart.ipynb and notebooks/sft.ipynb run top to bottom (smoke settings) and draw their figures.

Executed with nbclient on the ``python3`` kernel (jupyter_client starts it with this interpreter, so the venv's
packages are used), with ``SPARSEGRAD_NOTEBOOK_SMOKE=1`` in the kernel's environment. Skipped only when the data
directory is missing: GLUE (``SPARSEGRAD_GLUE_DIR`` or ``../shared/data/glue`` from the repository root) for the
quickstart, Dolly-15k (``SPARSEGRAD_DOLLY_DIR`` or ``../shared/data/dolly-15k``) for the SFT notebook.
"""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
SFT_NOTEBOOK = os.path.join(ROOT, "notebooks", "sft.ipynb")
GLUE_DIR = os.path.abspath(os.environ.get("SPARSEGRAD_GLUE_DIR") or os.path.join(ROOT, "..", "shared", "data", "glue"))
DOLLY_DIR = os.path.abspath(os.environ.get("SPARSEGRAD_DOLLY_DIR")
                            or os.path.join(ROOT, "..", "shared", "data", "dolly-15k"))


@pytest.mark.parametrize("path", [NOTEBOOK, SFT_NOTEBOOK], ids=["quickstart", "sft"])
def test_notebook_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
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


@pytest.mark.skipif(not all(os.path.isfile(os.path.join(DOLLY_DIR, f"{split}.jsonl")) for split in ("train", "test")),
                    reason=f"Dolly-15k train/test JSONL not found under {DOLLY_DIR} (set SPARSEGRAD_DOLLY_DIR)")
def test_sft_notebook_executes(monkeypatch):
    """The SFT walk-through: eval before, SFTTrainer + SparseGradCallback calibrating on its own batches, eval after,
    the loss curve, and the saved adapter reloaded and merged with the same greedy answer (asserted in the notebook)."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("SPARSEGRAD_NOTEBOOK_SMOKE", "1")  # the kernel inherits this process's environment
    monkeypatch.setenv("SPARSEGRAD_DOLLY_DIR", DOLLY_DIR)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("SPARSEGRAD_NOTEBOOK_THREADS", "1")  # like conftest's torch.set_num_threads(1)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # let the notebook's %matplotlib inline decide

    nb = nbformat.read(SFT_NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(SFT_NOTEBOOK)}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert len(images) >= 1, "expected the training loss curve"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "SMOKE=True" in text
    for marker in ("eval loss before:", "A (before):", "with bases pending", "bases calibrated for 20/20 layers",
                   "eval loss after:", "A (after):", "reloaded adapter: same greedy answer",
                   "merged model (LlamaForCausalLM): same greedy answer"):
        assert marker in text, marker
