"""configs/imagenet_vq16.py (LlamaGen's VQ-16 recipe) at 32 px for a CPU: the same losses,
weights, optimiser and l2-normalised 8-d codes behind quant_conv, on a small VQGAN net
(f4: 8x8 grids, attention at 8x8 and in the middle) with 1024 codes, on the bundled photos;
300 steps at batch 16, the discriminator from step 100. Measured with train.py on a
busy 2-core CPU: 9 minutes, held-out PSNR 16.6 dB and 159 of 1024 codes used at step
300 (2026-12-01; no LPIPS weights, so the perceptual term was off: it stays off until
loss.lpips_weights is given).

    python train.py --config configs/tiny_vq16.py --workdir workdir/tiny_vq16
"""

import dataclasses

import ml_collections

from configs import imagenet_vq16
from vqvae.model import VQVAEConfig
from vqvae.nets import VQGANConfig


def shrink(c: ml_collections.ConfigDict, **quantizer) -> ml_collections.ConfigDict:
    """A 256 px VQGAN recipe -> its 32 px CPU version: the same losses, weights and
    optimisers; a small net of the same layout, its quantizer changed by ``quantizer``
    (``code_dim`` included); fewer steps, the discriminator's start moved to step 100."""
    model = VQVAEConfig.from_dict(dict(c.model))
    code_dim = quantizer.pop("code_dim", model.code_dim)
    net = VQGANConfig(
        ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32
    )
    model = model.replace(
        image_size=32,
        vqgan=net,
        code_dim=code_dim,
        quantizer=dataclasses.replace(model.quantizer, **quantizer),
        compute_dtype="float32",
    )
    c.model = ml_collections.ConfigDict(model.to_dict())
    c.data.source, c.data.val_source = "sample_photos", ""
    c.data.workers = 0
    c.steps, c.batch_size = 300, 16
    c.gan.start_step = 100
    c.log_every, c.eval_every, c.checkpoint_every = 25, 100, 100
    c.eval_batches, c.eval_batch_size = 2, 16
    return c


def get_config():
    return shrink(imagenet_vq16.get_config(), num_codes=1024)
