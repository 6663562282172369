"""A ``--full`` export (``python -m vqvae.convert export W --to DIR --full``) back into a
workdir that resumes exactly where the exported run stopped:

    python -m vqvae.convert unpack DIR --workdir W
    python train.py --config W/config.py --workdir W

The training state's shapes come from the run's own config (kept in the export), so the
tensors are checked against exactly the state the trainer will restore.
"""

import json
from pathlib import Path

import numpy as np

from vqvae.convert.common import ConvertError
from vqvae.convert.export import _flat_names, load_export

RESUME_CONFIG = '''"""The run config of an unpacked full export (python -m vqvae.convert unpack):
    python train.py --config {here}/config.py --workdir {here} [--config.key=value]
"""

import json
from pathlib import Path

import ml_collections


def get_config():
    run = json.loads((Path(__file__).parent / "config.json").read_text())
    return ml_collections.ConfigDict(run)
'''


def unpack(directory, workdir) -> Path:
    """A ``--full`` export back into a workdir that resumes exactly where the exported run
    stopped: its checkpoint (model, training state, meta) and ``config.py`` + ``config.json``
    holding the run's config (with ``init_from`` cleared: the state replaces it)."""
    import jax
    import ml_collections
    from flax import nnx
    from safetensors.numpy import load_file

    from vqvae.checkpoint import Checkpoints
    from vqvae.trainer import Trainer, _split

    directory, workdir = Path(directory).expanduser(), Path(workdir).expanduser()
    model, info = load_export(directory)
    if "meta" not in info or not (directory / "train.safetensors").is_file():
        raise ConvertError(f"{directory} is not a --full export (no training state in it)")
    if workdir.exists() and any(workdir.iterdir()):
        raise ConvertError(f"{workdir} is not empty; pick a new --workdir")
    meta = info["meta"]
    run = dict(meta["config"])
    run["init_from"] = ""
    probe = ml_collections.ConfigDict(run)  # the state's shapes only: no LPIPS weights read
    if "loss" in probe:
        probe.loss.perceptual_weight = 0.0
    abstract = Trainer(probe, workdir).abstract_state
    model_abs, train_abs = _split(abstract)
    flat = load_file(str(directory / "train.safetensors"))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {"params": params, "rest": rest}
    names = _flat_names(train_abs)
    leaves = []
    for k, a in names.items():
        if k in flat and a.shape == () and flat[k].shape == (1,):  # written as 1-d
            flat[k] = flat[k].reshape(())
        if k not in flat or tuple(flat[k].shape) != tuple(a.shape):
            raise ConvertError(
                f"tensor {k} is missing or of another shape in {directory}/train.safetensors "
                "(the config it names builds another training state)"
            )
        leaves.append(flat[k].astype(a.dtype))
    train = jax.tree.unflatten(jax.tree.structure(train_abs), leaves)
    model_sh = jax.tree.map(lambda a: a.sharding, model_abs)
    train_sh = jax.tree.map(lambda a: a.sharding, train_abs)
    placed_model = jax.device_put(state, model_sh)
    placed_train = jax.device_put(train, train_sh)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoints(workdir)
    try:
        ckpt.save(int(np.asarray(flat["step"]).reshape(-1)[0]), placed_model, placed_train, meta)
        ckpt.wait()
    finally:
        ckpt.close()
    (workdir / "config.json").write_text(json.dumps(run, indent=1) + "\n")
    (workdir / "config.py").write_text(RESUME_CONFIG.format(here=workdir))
    return workdir
