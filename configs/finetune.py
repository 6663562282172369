"""Fine-tune a released (or any) tokenizer on your own images.

    python -m vqvae.convert taming vqgan_imagenet_f16_16384.ckpt --workdir workdir/taming
    python train.py --config configs/finetune.py --config.init_from=workdir/taming \\
        --config.data.source=folder:/path/to/images --workdir workdir/finetuned
    # decoder only (the encoder, quant_conv and codebook stay fixed, so tokens do not move):
    ... --config.freeze=encoder_codebook

``init_from``: a workdir, an export folder or a released weight file (vqvae/convert/
finetune.py); the model config is the source's (this file's ``model`` is replaced). The
optimizer starts fresh; the discriminator is the source's where it has one (taming's
released files do: its shape then replaces the ``gan`` shape keys below), else a fresh one,
switched on ``gan.start_step`` steps into the fine-tune; LPIPS is on
once ``loss.lpips_weights`` names a weights file (``python -m vqvae.lpips``). The losses are
taming's (L1 + LPIPS + adaptive-weighted hinge PatchGAN), at a fine-tuning learning rate.
"""

from configs.common import base
from vqvae.model import PRESETS


def get_config():
    c = base(PRESETS["taming-f16-16384"])  # replaced by init_from's model
    # c.init_from (required), c.init_preset, c.freeze: configs/common.py
    c.data.source = "sample_photos"  # set to folder:/path/to/images
    c.steps = 10_000
    c.batch_size = 16
    c.optim.name = "adam"
    c.optim.lr = 1e-5  # well under the from-scratch rates (taming 5.4e-5, LlamaGen 1e-4)
    c.optim.b1, c.optim.b2 = 0.5, 0.9
    c.optim.grad_clip = 1.0
    c.loss.pixel = "l1"
    c.loss.normalize_by_variance = False
    c.loss.perceptual_weight = 1.0  # on once loss.lpips_weights is given
    c.loss.lpips_weights = ""
    c.gan.weight = 0.75
    c.gan.start_step = 2_000  # the generator settles first (a fresh discriminator's warm-up)
    c.gan.loss = "hinge"
    c.gan.norm = "group"
    c.gan.layers = 2
    c.gan.optim.lr = 1e-5
    c.gan.optim.b1, c.gan.optim.b2 = 0.5, 0.9
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
