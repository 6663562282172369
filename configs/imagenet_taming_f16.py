"""taming-transformers' ImageNet VQGAN f16-16384 recipe at 256 px: the ``taming-f16-16384``
preset (16x16 token grids, 16384 codes of 256 dimensions, gradient-learned), L1 + LPIPS, a
patch discriminator under the adaptive weight from step 250,001.

    python -m vqvae.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.npz
    python train.py --config configs/imagenet_taming_f16.py --workdir workdir/taming_f16 \\
        --config.loss.lpips_weights=lpips_vgg16.npz

``data.source`` is ``tfds:imagenet2012`` (held out: its ``validation`` split); a folder of
images works too: ``--config.data.source=folder:/path/to/train --config.data.val_source=``
(or ``folder:/path/to/val``). ``configs/tiny_taming_f16.py`` is the same recipe at 32 px for
a CPU.

From taming (CompVis/taming-transformers: configs/imagenet_vqgan.yaml, the released
f16-16384 config, taming/modules/losses/vqperceptual.py, main.py):
- net: the f16 VQGAN (ch 128, ch_mult 1,1,2,2,4, attention at 16x16 and in the middle),
  256-d codes, 16384 of them (the released model; the repository's yaml has 1024).
- losses: L1 + 1.0 x LPIPS + the hinge generator loss under the adaptive weight (gradient
  norms at the decoder's last layer, clamped to [0, 1e4]) times disc_weight 0.75; the
  discriminator: PatchGAN of 2 layers (the released config's disc_num_layers), 64 channels,
  hinge loss; on from step 250,001 (the repository's disc_start; the released configs say 0,
  presumably a resumed run).
- Adam, betas (0.5, 0.9), no weight decay, schedule or clipping; the discriminator the same.
  lr = 4.5e-6 x the global batch (main.py scales base_learning_rate by GPUs x batch): batch
  12 per GPU, 5.4e-5 on one GPU as here. The GPU count of the released models is not
  stated: on N devices use batch_size 12 N and lr 5.4e-5 N.
- The number of training steps of the released models is not published either: ``steps``
  here is a placeholder past the discriminator's start (set --config.steps).

Where this package cannot follow it (no key for it; said here instead of invented):
- taming's codebook losses are reversed by a kept bug (legacy=True: commitment weight 1.0,
  codebook 0.25); this package weighs commitment by beta (0.25) and the codebook term by 1,
  the VQ-VAE paper's weights, which taming's code meant.
- taming's NLayerDiscriminator uses BatchNorm; this package's has spectral, group or no
  normalisation: group norm here.
- Pixels: taming's L1 is on [-1, 1] images, this package's on [-0.5, 0.5], so the pixel term
  weighs half as much against LPIPS and the GAN term (there is no pixel weight key).
- Augmentation: taming resizes the short side to 256, takes a random 256 crop and flips;
  this package takes the same random crop but does not flip.

Published result (taming README): rFID 4.98 against ImageNet's validation set, 7.41 against
its training set, at 256x256. rFID moves with the evaluation protocol: compare under
theirs. Not reproduced here. Hardware and training time are not published: unknown.
"""

from configs.common import base
from vqvae.model import PRESETS


def get_config():
    c = base(PRESETS["taming-f16-16384"])
    c.data.source = "tfds:imagenet2012"
    c.data.val_source = "tfds:imagenet2012:validation"
    c.steps = 500_000  # placeholder: the released models' step count is not published
    c.batch_size = 12
    c.optim.name = "adam"
    c.optim.lr = 4.5e-6 * 12
    c.optim.b1, c.optim.b2 = 0.5, 0.9

    c.loss.pixel = "l1"
    c.loss.normalize_by_variance = False
    c.loss.perceptual_weight = 1.0
    c.loss.lpips_weights = ""  # a .npz made by `python -m vqvae.lpips`; "" leaves LPIPS off

    c.gan.weight = 0.75
    c.gan.start_step = 250_001
    c.gan.loss = "hinge"
    c.gan.norm = "group"  # taming: BatchNorm (not available)
    c.gan.channels = 64
    c.gan.layers = 2
    c.gan.max_adaptive_weight = 1e4
    c.gan.optim.name = "adam"
    c.gan.optim.lr = 4.5e-6 * 12
    c.gan.optim.b1, c.gan.optim.b2 = 0.5, 0.9

    c.log_every = 100
    c.eval_every = 5000
    c.eval_batch_size = 32
    c.checkpoint_every = 5000
    return c
