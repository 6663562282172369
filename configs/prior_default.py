"""A transformer prior over the token grids of the default tokenizer (train that first).

    python train.py --config configs/default.py --workdir workdir/default
    python train.py --config configs/prior_default.py --workdir workdir/prior
    python sample.py --workdir workdir/prior/best --mode generate --num 64 \\
        --out workdir/prior/samples.png

Tokens are encoded on the fly from ``data.source`` by the tokenizer in ``tokenizer``; with
``--config.data.source=tokens:PATH`` they are read from an export instead. The vocabulary
size and grid shape come from the tokenizer.

Sized to the default data: an export of ``sample_photos`` holds 1,048 grids (8x8 of 256
codes). Trained longer, even this small prior learns them by heart: held-out bits per token
pass their best after a few hundred steps and climb (README: measured). So the run is short,
the best held-out checkpoint is kept in ``WORKDIR/best`` and the run stops when held-out
bits per token rise 5% above their best.
"""

from configs.common import base


def get_config():
    c = base(dict(num_classes=0, width=64, depth=2, heads=4, mlp_ratio=4), task="prior")
    c.tokenizer = "workdir/default"  # a tokenizer workdir (or one of its checkpoints)
    c.label_dropout = 0.1  # class-conditional: labels dropped to unconditional (guidance)
    c.data.source = "sample_photos"
    c.data.val_fraction = 0.1  # tokens:PATH: grids held out (about 100 of an export's 1,000)
    c.steps = 600
    c.batch_size = 64
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.01
    c.optim.warmup_steps = 50
    c.optim.final_lr_fraction = 0.1
    c.optim.grad_clip = 1.0
    c.log_every = 50
    c.eval_every = 50  # a multiple of checkpoint_every: every evaluated step is saved
    c.eval_batches = 0  # every held-out example
    c.eval_batch_size = 64
    c.checkpoint_every = 50
    c.keep_best = True  # WORKDIR/best: the checkpoint of the lowest held-out bits per token
    c.early_stop_rise = 0.05  # stop when they rise this fraction above their best (0: never)
    return c
