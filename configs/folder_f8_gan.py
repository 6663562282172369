"""An f8 tokenizer for a folder of images at 256 px, with both VQGAN losses: the f8-256 net,
L1 + LPIPS perceptual loss, and a patch discriminator from step 20,000.

    python -m vqvae.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.npz
    python train.py --config configs/folder_f8_gan.py --workdir workdir/f8_gan \\
        --config.data.source=folder:/path/to/images \\
        --config.loss.lpips_weights=lpips_vgg16.npz

Without ``loss.lpips_weights`` the perceptual term is off (one line says so).
"""

from configs import imagenet_f8


def get_config():
    c = imagenet_f8.get_config()
    c.data.source = "folder:/path/to/images"
    c.data.val_fraction = 0.01
    c.loss.pixel = "l1"
    c.loss.perceptual_weight = 1.0
    c.loss.lpips_weights = ""  # a .npz made by `python -m vqvae.lpips`
    c.gan.weight = 0.8
    c.gan.start_step = 20_000
    c.gan.loss = "hinge"
    c.gan.norm = "spectral"
    c.gan.layers = 3
    c.gan.lecam_weight = 0.001
    c.gan.optim.lr = 1e-4
    return c
