"""taming-transformers' VQGAN (Lightning ``.ckpt``) and LlamaGen's VQ models (``.pt``).

The package's VQGAN modules carry taming's names, so a parameter's taming key is its path
joined by dots (``mid.block[0]`` is taming's ``mid.block_1``); LlamaGen renames levels and
blocks (section 9 of the layout notes): ``down.{i}.block`` -> ``conv_blocks.{i}.res``,
``up.{i}`` -> ``conv_blocks.{L-1-i}`` and ``mid.block_1 / attn_1 / block_2`` ->
``mid.0 / 1 / 2``. Both take pixels in [-1, 1] where the package takes [-0.5, 0.5]: the
first convolution's kernel is doubled and the last one's kernel and bias halved on import
(exact in floating point: powers of two), and undone on export.
"""

from vqvae.convert.common import Entry, hwio_to_oihw, oihw_to_hwio
from vqvae.model import VQVAEConfig

LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# taming's own buffers and loss modules in a released .ckpt (the LPIPS heads, the
# discriminator) and LlamaGen's usage buffer: not part of the generator.
IGNORED_PREFIXES = ("loss.", "quantize.codebook_used")


def ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES)


def taming_key(path: tuple) -> str:
    """A parameter's path in the package's model -> its taming state-dict key."""
    if tuple(path) == ("quantizer", "codebook"):
        return "quantize.embedding.weight"
    *mods, leaf = path
    if mods[:2] in (["encoder", "quant_conv"], ["decoder", "post_quant_conv"]):
        mods = mods[1:]
    if len(mods) > 3 and mods[1:3] == ["mid", "block"]:
        mods = [mods[0], "mid", f"block_{int(mods[3]) + 1}", *mods[4:]]
    return ".".join(str(m) for m in mods) + "." + LEAVES[leaf]


def llamagen_key(path: tuple, levels: int) -> str:
    """A parameter's path -> its LlamaGen state-dict key."""
    parts = taming_key(path).split(".")
    if parts[0] in ("encoder", "decoder") and parts[1] in ("down", "up"):
        level = int(parts[2]) if parts[1] == "down" else levels - 1 - int(parts[2])
        rest = ["res" if p == "block" else p for p in parts[3:4]] + parts[4:]
        parts = [parts[0], "conv_blocks", str(level), *rest]
    elif parts[0] in ("encoder", "decoder") and parts[1] == "mid":
        parts = [parts[0], "mid", {"block_1": "0", "attn_1": "1", "block_2": "2"}[parts[2]],
                 *parts[3:]]  # fmt: skip
    return ".".join(parts)


def _scaled(transform, factor: float):
    return lambda a: transform(a) * factor


def entries(config: VQVAEConfig, shapes: dict, family: str) -> dict:
    """Every parameter's ``Entry``: its key in ``family``'s file and the layout maps."""
    levels = len(config.vqgan.ch_mult)
    out = {}
    for path, shape in shapes.items():
        key = taming_key(path) if family == "taming" else llamagen_key(path, levels)
        to, back = (oihw_to_hwio, hwio_to_oihw) if len(shape) == 4 else (_same, _same)
        if path == ("encoder", "conv_in", "kernel"):  # [-1, 1] pixels in: x2 on ours
            to, back = _scaled(to, 2.0), _scaled(back, 0.5)
        elif path[:2] == ("decoder", "conv_out"):  # [-1, 1] pixels out: /2 on ours
            to, back = _scaled(to, 0.5), _scaled(back, 2.0)
        out[path] = Entry(key, to, back)
    return out


def _same(a):
    return a


def looks_like(keys) -> bool:
    return any(k.startswith("encoder.down.") for k in keys)


def looks_like_llamagen(keys) -> bool:
    return any(k.startswith("encoder.conv_blocks.") for k in keys)
