"""The f8-256 tokenizer: 256x256 -> 32x32 grids, 16384 x 256 codebook, bf16 convolutions.

    python train.py --config configs/imagenet_f8.py --workdir workdir/f8 \\
        --config.data.source=tfds:imagenet2012   # or folder:/path/to/images
"""

from configs.common import base
from vqvae.model import PRESETS


def get_config():
    c = base(PRESETS["f8-256"])
    c.data.source = "tfds:imagenet2012"
    c.data.val_fraction = 0.01
    c.steps = 200_000
    c.batch_size = 32
    c.optim.name = "adamw"
    c.optim.lr = 2e-4
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 2000
    c.optim.final_lr_fraction = 0.1
    c.optim.grad_clip = 1.0
    c.model.quantizer.dead_code_threshold = 0.01
    c.log_every = 100
    c.eval_every = 5000
    c.eval_batch_size = 32
    c.checkpoint_every = 5000
    return c
