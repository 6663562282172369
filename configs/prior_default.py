"""A transformer prior over the token grids of the default tokenizer (train that first).

    python train.py --config configs/default.py --workdir workdir/default
    python train.py --config configs/prior_default.py --workdir workdir/prior
    python sample.py --workdir workdir/prior --mode generate --num 64 --out samples.png

Tokens are encoded on the fly from ``data.source`` by the tokenizer in ``tokenizer``; with
``--config.data.source=tokens:PATH`` they are read from an export instead. The vocabulary
size and grid shape come from the tokenizer.
"""

from configs.common import base


def get_config():
    c = base(dict(num_classes=0, width=128, depth=4, heads=4, mlp_ratio=4))
    c.task = "prior"
    c.tokenizer = "workdir/default"  # a tokenizer workdir (or one of its checkpoints)
    c.data.source = "sample_photos"
    c.steps = 2000
    c.batch_size = 64
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 100
    c.optim.final_lr_fraction = 0.1
    c.optim.grad_clip = 1.0
    c.log_every = 50
    c.eval_every = 500
    c.eval_batches = 4
    c.eval_batch_size = 64
    c.checkpoint_every = 500
    return c
