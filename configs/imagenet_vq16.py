"""LlamaGen's VQ-16 recipe on ImageNet at 256 px: the ``llamagen-vq16`` preset (16x16 token
grids, 16384 codes of 8 dimensions, l2-normalised: a cosine search), MSE + LPIPS, a patch
discriminator from step 20,000.

    python -m vqvae.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.npz
    python train.py --config configs/imagenet_vq16.py --workdir workdir/vq16 \\
        --config.loss.lpips_weights=lpips_vgg16.npz

``data.source`` is ``tfds:imagenet2012`` (held out: its ``validation`` split); a folder of
images works too: ``--config.data.source=folder:/path/to/train --config.data.val_source=``
(or ``folder:/path/to/val``). ``configs/tiny_vq16.py`` is the same recipe at 32 px for a CPU.

From LlamaGen (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_train.py defaults and
scripts/tokenizer/train_vq.sh, losses in vq_loss.py):
- net and codes: the VQ-16 model (71,883,403 parameters, counted from its code; "72M" in its
  README); its 8-d codes come from quant_conv (256 -> 8), as here; codebook and commitment
  losses weighted 1 and 0.25, entropy term off, codebook gradient-learned.
- losses: MSE (not divided by the data's variance) + 1.0 x LPIPS + 0.5 x the hinge
  generator loss from step 20,000; discriminator: PatchGAN, 3 layers of 64 channels, hinge.
- Adam, lr 1e-4 constant, betas (0.9, 0.95), no weight decay (vq_train.py parses 5e-2 but
  never passes it to the optimizer), gradients clipped at 1.0; the discriminator the same.
- global batch 128, 40 epochs: 1,281,167 / 128 = 10,009 steps an epoch, 400,360 steps.
  bf16 autocast there, bf16 convolutions here.

Where this package cannot follow it (no key for it; said here instead of invented):
- LlamaGen's discriminator uses BatchNorm; this package's has spectral, group or no
  normalisation: group norm here.
- LlamaGen adds the adversarial term with a fixed weight (no adaptive weight); this package
  always scales it by taming's adaptive weight (capped by gan.max_adaptive_weight), times
  gan.weight. Its discriminator loss is also scaled by 0.5, which Adam all but ignores.
- Pixels: LlamaGen's MSE is on [-1, 1] images, this package's on [-0.5, 0.5], so the pixel
  term weighs a quarter as much against LPIPS and the GAN term (there is no pixel weight key).
- Augmentation: LlamaGen resizes the short side to a random 256-320 before a random 256
  crop, and flips; this package takes a random square of the short side resized to 256, and
  does not flip.

Published result (LlamaGen README, vq_ds16_c2i): rFID 2.19 at 256x256 on ImageNet's
validation set (50,000 images). rFID moves with the evaluation protocol (the resize to the
Inception net's input, rounding to uint8, the reference set): compare under theirs. Not
reproduced here. The hardware and training time of LlamaGen's tokenizer are not published:
unknown.
"""

from configs.common import base
from vqvae.model import PRESETS


def get_config():
    c = base(PRESETS["llamagen-vq16"].replace(compute_dtype="bfloat16"))
    c.data.source = "tfds:imagenet2012"
    c.data.val_source = "tfds:imagenet2012:validation"
    c.steps = 400_360
    c.batch_size = 128
    c.optim.name = "adam"
    c.optim.lr = 1e-4
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.grad_clip = 1.0

    c.loss.pixel = "mse"
    c.loss.normalize_by_variance = False
    c.loss.perceptual_weight = 1.0
    c.loss.lpips_weights = ""  # a .npz made by `python -m vqvae.lpips`; "" leaves LPIPS off

    c.gan.weight = 0.5
    c.gan.start_step = 20_000
    c.gan.loss = "hinge"
    c.gan.norm = "group"  # LlamaGen: BatchNorm (not available)
    c.gan.channels = 64
    c.gan.layers = 3
    c.gan.optim.name = "adam"
    c.gan.optim.lr = 1e-4
    c.gan.optim.b1, c.gan.optim.b2 = 0.9, 0.95
    c.gan.optim.grad_clip = 1.0

    c.log_every = 100
    c.eval_every = 5000
    c.eval_batch_size = 32
    c.checkpoint_every = 5000
    return c
