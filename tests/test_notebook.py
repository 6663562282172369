"""The notebooks run top to bottom (a few training steps), so they cannot rot."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(name: str, monkeypatch, **env) -> list:
    """Execute notebooks/NAME with a few steps; its cells' outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("VQVAE_NOTEBOOK_STEPS", "4")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    nbformat.validate(nb)  # what it would save is a valid notebook too
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_committed_notebooks_are_valid(path):
    """nbformat's schema (nbconvert and Jupyter refuse or warn on anything else)."""
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))


def images(outputs) -> list:
    return [o for o in outputs if "image/png" in o.get("data", {})]


@pytest.mark.slow  # a notebook
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    outputs = run_notebook("quickstart.ipynb", monkeypatch, VQVAE_NOTEBOOK_WORKDIR=str(tmp_path))
    assert (tmp_path / "tokenizer" / "eval_grid.png").is_file()
    assert (tmp_path / "prior" / "checkpoints").is_dir()
    assert len(images(outputs)) >= 3  # the grid, the token map and histogram, the samples


@pytest.mark.slow  # a notebook
def test_estimators_notebook_runs_and_its_committed_copy_has_the_plots(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    committed = nbformat.read(ROOT / "notebooks" / "estimators.ipynb", as_version=4)
    stored = [o for c in committed.cells for o in c.get("outputs", [])]
    assert len(images(stored)) >= 4  # estimators, side by side, the sweep, the VQ runs
    outputs = run_notebook("estimators.ipynb", monkeypatch)
    assert len(images(outputs)) >= 4
    text = "".join(o.get("text", "") for o in outputs)
    assert "SGD, mapped" in text and "rotation" in text
