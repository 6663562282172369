"""The quickstart notebook runs top to bottom (a few training steps), so it cannot rot."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VQVAE_NOTEBOOK_STEPS", "4")
    monkeypatch.setenv("VQVAE_NOTEBOOK_WORKDIR", str(tmp_path))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (tmp_path / "tokenizer" / "eval_grid.png").is_file()
    assert (tmp_path / "prior" / "checkpoints").is_dir()
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the grid, the token map and histogram, the samples
