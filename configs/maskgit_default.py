"""A MaskGIT-style masked generator over the default tokenizer's token grids.

    python train.py --config configs/default.py --workdir workdir/default
    python train.py --config configs/maskgit_default.py --workdir workdir/maskgit
    python sample.py --workdir workdir/maskgit/best --mode generate --num 64 --steps 8 \\
        --out workdir/maskgit/samples.png

The same data, schedule and stopping rule as ``configs/prior_default.py`` and a model of
the same size (the position table is one row longer: the class token's). Class-conditional
training needs ``--config.model.num_classes=N``; ``label_dropout`` then trains the
unconditional token too, which ``--cfg-scale`` needs.
"""

from configs import prior_default


def get_config():
    c = prior_default.get_config()
    c.task = "maskgit"
    return c
