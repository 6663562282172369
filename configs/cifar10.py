"""CIFAR-10 at the Sonnet VQ-VAE budget: 512 x 64 codebook, batch 32, Adam, 10k steps.

    python train.py --config configs/cifar10.py --workdir workdir/cifar10
    # from a folder of images instead of tensorflow-datasets:
    python train.py --config configs/cifar10.py --workdir workdir/cifar10 \\
        --config.data.source=folder:/path/to/cifar10/train

Sonnet's architecture and budget; pixels in [-0.5, 0.5], loss = MSE / data variance + 0.25
commitment, EMA decay 0.99. Two changes to its training recipe: the learning rate warms up
to 8e-4 and decays on a cosine (Sonnet: constant 3e-4), and codes unused for a few hundred
steps are re-seeded from the batch. Sonnet's exact recipe:
    --config.optim.lr=3e-4 --config.optim.warmup_steps=0 \\
    --config.optim.final_lr_fraction=1.0 --config.model.quantizer.dead_code_threshold=0.0
"""

from configs.common import base
from vqvae.model import PRESETS
from vqvae.quantizers import VQConfig


def get_config():
    c = base(PRESETS["sonnet-cifar"].replace(quantizer=VQConfig(dead_code_threshold=0.03)))
    c.data.source = "tfds:cifar10"
    c.data.val_fraction = 0.1  # folder sources: 10% of the files held out
    c.steps = 10_000
    c.batch_size = 32
    c.optim.lr = 8e-4
    c.optim.warmup_steps = 500
    c.optim.final_lr_fraction = 0.0
    c.log_every = 100
    c.eval_every = 2000
    c.eval_batches = 0  # the whole held-out set
    c.eval_batch_size = 250
    c.checkpoint_every = 1000
    return c
