"""The tiny test model with the VQGAN net: 16 px -> 4x4 grid, attention at 8x8 and in the
middle, 32 codes of 8 dimensions. Seconds per step on a CPU; what the tests train.

python train.py --config configs/tiny_vqgan.py --workdir workdir/tiny_vqgan
"""

import ml_collections

from configs import tiny
from vqvae.model import VQVAEConfig
from vqvae.nets import VQGANConfig
from vqvae.quantizers import VQConfig


def get_config():
    c = tiny.get_config()
    net = VQGANConfig(
        ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=32
    )
    model = VQVAEConfig(
        image_size=16, net="vqgan", vqgan=net, code_dim=8, quantizer=VQConfig(num_codes=32)
    )
    c.model = ml_collections.ConfigDict(model.to_dict())
    return c
