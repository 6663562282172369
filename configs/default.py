"""The default: a small tokenizer on the photographs bundled with the dependencies (offline).

    python train.py --config configs/default.py --workdir workdir/default
    python sample.py --workdir workdir/default --out workdir/default/recon.png

A few minutes on a 2-core CPU. 32x32 crops -> 8x8 grids of 256 codes.
"""

from configs.common import base
from vqvae.model import VQVAEConfig
from vqvae.quantizers import VQConfig


def get_config():
    model = VQVAEConfig(
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2),
        mid_blocks=2,
        res_hidden=32,
        code_dim=32,
        quantizer=VQConfig(num_codes=256, dead_code_threshold=0.05),
    )
    c = base(model)
    c.data.source = "sample_photos"
    c.steps = 1500
    c.batch_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.final_lr_fraction = 0.1
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    return c
