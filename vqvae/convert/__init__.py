"""Released tokenizers in, safetensors and the originals' layouts out.

    python -m vqvae.convert taming vqgan_imagenet_f16_16384.ckpt --workdir W [--preset NAME]
    python -m vqvae.convert llamagen vq_ds16_c2i.pt --workdir W
    python -m vqvae.convert maskgit tokenizer_imagenet256_checkpoint --workdir W
    python -m vqvae.convert export W --to DIR [--to-taming FILE | --to-llamagen FILE]

An import maps every tensor of the file onto the preset's model (layouts, names, the
pixel range), refuses in one line on the first tensor missing, left over or of the wrong
shape, and writes a workdir whose checkpoint 0 ``Tokenizer.load`` reads, with a ``source``
record (file, SHA-256, converter version) in its meta. taming's discriminator, where the
file has one, is imported too (``vqvae.convert.discriminator``); its LPIPS heads are not
(make LPIPS weights with ``python -m vqvae.lpips``).
"""

from pathlib import Path

from vqvae.convert import discriminator, maskgit, taming
from vqvae.convert.common import (
    CONVERTER_VERSION,
    ConvertError,
    abstract_params,
    build_with,
    match,
    new_workdir,
    read_tensors,
    resolve_config,
    sha256,
    write_workdir,
)
from vqvae.model import VQVAE, VQVAEConfig

FAMILIES = ("taming", "llamagen", "maskgit")
DEFAULT_PRESETS = {"llamagen": "llamagen-vq16", "maskgit": "maskgit-f16-1024"}
_SNIFF = {"taming": taming.looks_like, "llamagen": taming.looks_like_llamagen,
          "maskgit": maskgit.looks_like}  # fmt: skip

__all__ = ["FAMILIES", "ConvertError", "convert", "import_tensors"]


def _family_of(keys) -> str | None:
    return next((f for f, sniff in _SNIFF.items() if sniff(keys)), None)


def _default_preset(family: str, tensors: dict) -> str:
    if family != "taming":
        return DEFAULT_PRESETS[family]
    codes = tensors.get("quantize.embedding.weight")
    return "taming-f16-1024" if codes is not None and len(codes) == 1024 else "taming-f16-16384"


def entries(family: str, config: VQVAEConfig, shapes: dict) -> dict:
    module = maskgit if family == "maskgit" else taming
    return module.entries(config, shapes, family)


def import_tensors(
    family: str, tensors: dict, preset: str | Path | None = None
) -> tuple[VQVAE, VQVAEConfig, str]:
    """(model, its config, the preset's name) from a family's tensors {name: array}."""
    if family not in FAMILIES:
        raise ConvertError(f"unknown family {family!r}: one of {FAMILIES}")
    found = _family_of(tensors)
    if found is None:
        raise ConvertError(f"the file holds no {family} VQGAN (no encoder tensors found)")
    if found != family:
        raise ConvertError(f"the file holds a {found} model, not a {family} one")
    name, config = resolve_config(preset or _default_preset(family, tensors))
    if config.net != "vqgan":
        raise ConvertError(f"preset {name} is not a VQGAN-family model (net {config.net!r})")
    if config.quantizer.kind != "vq" or config.quantizer.learning != "gradient":
        raise ConvertError(
            f"preset {name} needs a vq quantizer with a gradient-learned codebook (the "
            "released codebooks are parameters)"
        )
    if family == "maskgit":
        config = maskgit.prepare(config)
    shapes = abstract_params(config)
    params = match(tensors, entries(family, config, shapes), shapes, name, taming.ignored)
    return build_with(config, params), config, name


def convert(family: str, file: str | Path, workdir: str | Path, preset=None) -> Path:
    """Import ``file`` of ``family`` into a new workdir: -> the workdir."""
    file = Path(file).expanduser()
    tensors = read_tensors(file)
    model, config, name = import_tensors(family, tensors, preset)
    disc = None
    if family == "taming" and discriminator.present(tensors):
        disc = discriminator.import_tensors(tensors)
        if disc[0]["in_channels"] != config.channels:
            raise ConvertError(
                f"the discriminator takes {disc[0]['in_channels']} channels, the model "
                f"{config.channels}"
            )
    source = {
        "family": family,
        "file": str(file.resolve()),
        "sha256": sha256(file),
        "preset": name,
        "converter": f"vqvae.convert {CONVERTER_VERSION}",
    }
    if disc is not None:  # beside the checkpoint, its shape in the source record
        discriminator.save(new_workdir(workdir), *disc)
        source["discriminator"] = disc[0]
    return write_workdir(workdir, model, config, source)
