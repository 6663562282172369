"""CIFAR-10 at the Sonnet budget with the VQGAN discriminator: configs/cifar10.py plus a
patch discriminator (hinge loss, spectral norm) from step 2,000, its term balanced by the
adaptive weight.

    python train.py --config configs/cifar10_gan.py --workdir workdir/cifar10_gan \\
        --config.data.source=folder:/path/to/cifar10/train
"""

from configs import cifar10


def get_config():
    c = cifar10.get_config()
    c.gan.weight = 0.8  # taming's disc_weight
    c.gan.start_step = 2000
    c.gan.loss = "hinge"
    c.gan.norm = "spectral"
    c.gan.channels = 64
    c.gan.layers = 2  # 32 px images: 8 x 8 patch logits
    c.gan.optim.lr = 2e-4
    return c
