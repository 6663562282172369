"""configs/imagenet_taming_f16.py (taming's f16-16384 recipe) at 32 px for a CPU: the same
losses, weights, adaptive weight and optimiser, on a small VQGAN net (f4: 8x8 grids,
attention at 8x8 and in the middle) with 1024 codes of 32 dimensions, on the bundled photos;
300 steps at batch 16, the discriminator from step 100. Measured with train.py on a
busy 2-core CPU: 5 minutes, held-out PSNR 14.4 dB and 306 of 1024 codes used at step
300 (2026-12-01; no LPIPS weights, so the perceptual term was off: it stays off until
loss.lpips_weights is given).

    python train.py --config configs/tiny_taming_f16.py --workdir workdir/tiny_taming_f16
"""

from configs import imagenet_taming_f16
from configs.tiny_vq16 import shrink


def get_config():
    c = shrink(imagenet_taming_f16.get_config(), num_codes=1024, code_dim=32)
    c.optim.lr = c.gan.optim.lr = 4.5e-6 * c.batch_size  # taming's lr for this batch
    return c
