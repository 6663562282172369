"""MaskGIT's Flax VQGAN tokenizer (``flax.serialization`` msgpack bytes).

Flax's compact modules name layers by creation order (``encoder/ResBlock_3/Conv_1``); the
order is read off ``maskgit/nets/vqgan_tokenizer.py``. The encoder makes ``Conv_0`` (in),
the levels' ``ResBlock``s, the middle's, ``GroupNorm_0`` and ``Conv_1`` (out); the decoder
``Conv_0`` (in), the middle's blocks, then per level (lowest resolution first) its blocks
and its up-sampling ``Conv``, ``GroupNorm_0`` and the last ``Conv``. Inside a block:
``GroupNorm_0``, ``Conv_0``, ``GroupNorm_1``, ``Conv_1`` and the shortcut ``Conv_2``. Kernels
are HWIO already. MaskGIT's pixels are [0, 1]: the imported model adds 0.5 to its input
(``vqgan.input_offset``) and its last bias is lowered by 0.5.
"""

from vqvae.convert.common import Entry
from vqvae.model import VQVAEConfig

BLOCK = {"norm1": "GroupNorm_0", "conv1": "Conv_0", "norm2": "GroupNorm_1",
         "conv2": "Conv_1", "nin_shortcut": "Conv_2"}  # fmt: skip


def maskgit_key(path: tuple, levels: int, blocks: int) -> str:
    """A parameter's path in the package's model -> its MaskGIT variable name."""
    half, *mods, leaf = path
    if half == "quantizer":
        return "quantizer/codebook"
    if mods[0] in ("down", "up", "mid") and "block" in mods:
        j = mods.index("block")
        level, b = (int(mods[1]) if mods[0] != "mid" else None), int(mods[j + 1])
        if half == "encoder":
            n = levels * blocks + b if mods[0] == "mid" else level * blocks + b
        else:
            n = b if mods[0] == "mid" else blocks + (levels - 1 - level) * blocks + b
        return f"{half}/ResBlock_{n}/{BLOCK[mods[j + 2]]}/{leaf}"
    if mods[0] == "up":  # ("up", i, "upsample", "conv"): made for levels L-1 .. 1
        return f"decoder/Conv_{levels - int(mods[1])}/{leaf}"
    name = {
        ("encoder", "conv_in"): "Conv_0",
        ("encoder", "norm_out"): "GroupNorm_0",
        ("encoder", "conv_out"): "Conv_1",
        ("decoder", "conv_in"): "Conv_0",
        ("decoder", "norm_out"): "GroupNorm_0",
        ("decoder", "conv_out"): f"Conv_{levels}",
    }[(half, mods[0])]
    return f"{half}/{name}/{leaf}"


def entries(config: VQVAEConfig, shapes: dict, family: str = "maskgit") -> dict:
    levels, blocks = len(config.vqgan.ch_mult), config.vqgan.num_res_blocks
    out = {}
    for path in shapes:
        key = maskgit_key(path, levels, blocks)
        if path == ("decoder", "conv_out", "bias"):  # [0, 1] pixels out: 0.5 lower on ours
            out[path] = Entry(key, lambda a: a - 0.5, lambda a: a + 0.5)
        else:
            out[path] = Entry(key)
    return out


def prepare(config: VQVAEConfig) -> VQVAEConfig:
    """The model config an imported MaskGIT tokenizer runs with (its [0, 1] input)."""
    import dataclasses

    return config.replace(vqgan=dataclasses.replace(config.vqgan, input_offset=0.5))


def looks_like(keys) -> bool:
    return any(k.startswith(("encoder/Conv_0", "encoder/ResBlock_")) for k in keys)
