"""A tiny model for tests: trains, checkpoints and evaluates in well under a minute on a CPU.

python train.py --config configs/tiny.py --workdir /tmp/vqvae-tiny
"""

from configs.common import base
from vqvae.model import VQVAEConfig
from vqvae.quantizers import VQConfig


def get_config():
    model = VQVAEConfig(
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2),
        mid_blocks=1,
        res_hidden=8,
        code_dim=8,
        quantizer=VQConfig(num_codes=32),
    )
    c = base(model)
    c.steps = 20
    c.batch_size = 16
    c.log_every = 5
    c.eval_every = 10
    c.eval_batches = 2
    c.eval_batch_size = 16
    c.checkpoint_every = 10
    c.optim.lr = 1e-3
    return c
