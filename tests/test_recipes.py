"""The ImageNet VQGAN recipes (configs/imagenet_vq16.py, configs/imagenet_taming_f16.py) and
their 32 px CPU versions: every key is one train.py knows, the models have the published
shapes, and each small version trains (discriminator on) and tokenizes."""

import importlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import base
from vqvae.model import PRESETS, VQVAEConfig

RECIPES = {  # recipe -> (its preset, its CPU version)
    "imagenet_vq16": ("llamagen-vq16", "tiny_vq16"),
    "imagenet_taming_f16": ("taming-f16-16384", "tiny_taming_f16"),
}


def keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        out.add(prefix + k)
        if hasattr(v, "items") and k != "model":  # the model's keys: VQVAEConfig's check
            out |= keys(v, f"{prefix}{k}.")
    return out


def get_config(name):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", [n for pair in RECIPES.items() for n in (pair[0], pair[1][1])])
def test_a_recipe_uses_only_known_keys(name):
    c = get_config(name)
    unknown = keys(c) - keys(base(VQVAEConfig()))
    assert not unknown, unknown
    VQVAEConfig.from_dict(dict(c.model))  # refuses unknown model keys


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_builds_its_preset_with_the_published_shapes(name):
    c = get_config(name)
    preset, _ = RECIPES[name]
    model_config = VQVAEConfig.from_dict(dict(c.model))
    assert model_config.replace(compute_dtype="float32") == PRESETS[preset]
    model = nnx.eval_shape(lambda: model_config.build(nnx.Rngs(0)))
    out = nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 256, 256, 3)))
    assert out.reconstruction.shape == (1, 256, 256, 3)
    assert out.indices.shape == (1, 16, 16)
    codes = nnx.eval_shape(lambda m: m.quantizer.codes(), model)
    assert codes.shape == (16384, model_config.code_dim)
    assert c.model.image_size == 256 and c.data.source == "tfds:imagenet2012"


@pytest.mark.slow  # a minute or two each on a 2-core CPU, most of it compiling
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_small_version_trains_with_its_discriminator_and_tokenizes(name, tmp_path):
    from vqvae.tokenizer import Tokenizer
    from vqvae.trainer import Trainer

    from .conftest import photos

    c = get_config(RECIPES[name][1])
    c.tensorboard = False
    c.steps, c.gan.start_step, c.eval_every, c.checkpoint_every = 2, 1, 2, 2
    c.batch_size = 8
    result = Trainer(c, tmp_path).train()
    assert np.isfinite(result["mse"]) and result["codes_used"] > 0
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert '"disc_loss"' in lines  # the discriminator took its step
    tok = Tokenizer.load(tmp_path)
    x = photos(2, size=32)
    tokens = tok.encode(x)
    assert tokens.shape == (2, 8, 8) and tok.vocab_size == 1024
    assert tok.decode(tokens).shape == x.shape
    assert tok.codebook.shape == (1024, c.model.code_dim)
