"""Build the originals (taming-transformers, LlamaGen, MaskGIT) at a reduced width with
random weights and write the parity data under tests/data/convert/ (not run by CI).

Each family gets its checkpoint in the original's own file format (taming: a Lightning-style
``.ckpt`` holding ``state_dict``; LlamaGen: a ``.pt`` holding ``model``; MaskGIT: Flax
msgpack bytes), the same weights as ``*_weights.npz`` (original names and layouts, so the
package's tests need no torch), and ``*_outputs.npz``: uint8 images, the encoder output
(NHWC, after quant_conv), the code ids and the image decoded from those ids, all computed by
the original code.

    # taming and LlamaGen need torch (+ einops), MaskGIT needs flax and ml_collections:
    git --git-dir=/work/.mirror/CompVis+taming-transformers/repo archive HEAD | tar -x -C SRC/taming
    git --git-dir=/work/.mirror/FoundationVision+LlamaGen/repo archive HEAD | tar -x -C SRC/llamagen
    git --git-dir=/work/.mirror/google-research+maskgit/repo archive HEAD | tar -x -C SRC/maskgit
    TORCH_PYTHON tests/reference/make_convert_data.py --src SRC taming llamagen torch_sample
    .venv/bin/python tests/reference/make_convert_data.py --src SRC maskgit
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "convert"
ORIGINALS = Path("/tmp/vqvae-convert-originals")  # the originals' own files (not committed)
SIZE, BATCH = 32, 4
# The reduced shapes (the real layouts: three levels, attention at the lowest one)
TAMING = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8], z_channels=32,
              n_embed=64, embed_dim=32)  # fmt: skip
LLAMAGEN = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=32, codebook_size=64,
                codebook_embed_dim=8)  # fmt: skip
MASKGIT = dict(filters=32, channel_multipliers=[1, 1, 2], num_res_blocks=2, embedding_dim=32,
               codebook_size=64)  # fmt: skip


def images(seed: int) -> np.ndarray:
    """Smooth random uint8 images (B, SIZE, SIZE, 3): blocks plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (BATCH, 4, 4, 3))
    x = np.repeat(np.repeat(coarse, SIZE // 4, 1), SIZE // 4, 2) + rng.normal(
        0, 20, (BATCH, SIZE, SIZE, 3)
    )
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _torch_randomize(module, torch, seed):
    """Random GroupNorm affines (defaults 1 and 0 would hide a swapped mapping)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.data = 1 + 0.2 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)


def _torch_round(module):
    """Weights rounded to float16 values (kept float32): the .npz copy stores them in half
    the bytes and exactly."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.data = t.data.half().float()


def _half(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16) if a.dtype == np.float32 else a


def _torch_save(name, sd, container, torch, outputs, config):
    torch.save(container, ORIGINALS / name)
    arrays = {k: _half(v.detach().cpu().numpy()) for k, v in sd.items()}
    np.savez_compressed(OUT / (Path(name).stem + "_weights.npz"), **arrays)
    np.savez_compressed(OUT / (Path(name).stem + "_outputs.npz"), **outputs)
    (OUT / (Path(name).stem + "_config.json")).write_text(json.dumps(config, indent=1) + "\n")


def make_taming(src: Path):
    import torch

    sys.path.insert(0, str(src / "taming"))
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.discriminator.model import NLayerDiscriminator
    from taming.modules.vqvae.quantize import VectorQuantizer2

    torch.manual_seed(0)
    c = TAMING
    dd = dict(double_z=False, z_channels=c["z_channels"], resolution=SIZE, in_channels=3,
              out_ch=3, ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
              attn_resolutions=c["attn_resolutions"], dropout=0.0)  # fmt: skip
    net = torch.nn.Module()
    net.encoder, net.decoder = Encoder(**dd), Decoder(**dd)
    net.quantize = VectorQuantizer2(c["n_embed"], c["embed_dim"], beta=0.25)
    net.quant_conv = torch.nn.Conv2d(c["z_channels"], c["embed_dim"], 1)
    net.post_quant_conv = torch.nn.Conv2d(c["embed_dim"], c["z_channels"], 1)
    _torch_randomize(net, torch, 1)
    x_u8 = images(0)
    x = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # taming's [-1, 1]
    with torch.no_grad():
        h = net.quant_conv(net.encoder(x))
        net.quantize.embedding.weight.data = torch.randn(c["n_embed"], c["embed_dim"]) * h.std()
        _torch_round(net)
        h = net.quant_conv(net.encoder(x))
        quant, _, (_, _, ids) = net.quantize(h)
        ids = ids.reshape(BATCH, SIZE // 4, SIZE // 4)
        rec = net.decoder(net.post_quant_conv(quant))
    sd = dict(net.state_dict())
    disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2)  # released files carry one
    g = torch.Generator().manual_seed(2)
    for m in disc.modules():  # BatchNorm affines and running averages away from 1 and 0
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = 1 + 0.2 * torch.randn(m.weight.shape, generator=g)
            m.bias.data = 0.2 * torch.randn(m.bias.shape, generator=g)
            m.running_mean.data = 0.2 * torch.randn(m.running_mean.shape, generator=g)
            m.running_var.data = 1 + 0.2 * torch.rand(m.running_var.shape, generator=g)
    _torch_round(disc)
    sd |= {f"loss.discriminator.{k}": v.clone() for k, v in disc.state_dict().items()}
    disc.train()  # as taming's loss runs it: batch statistics, running averages updated
    with torch.no_grad():
        real, fake = disc(x), disc(rec)  # the discriminator step's order
    bn = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    outputs = dict(images=x_u8, encoded=h.permute(0, 2, 3, 1).numpy(), ids=ids.numpy(),
                   decoded=rec.permute(0, 2, 3, 1).numpy(),
                   disc_real=real.permute(0, 2, 3, 1).numpy(),
                   disc_fake=fake.permute(0, 2, 3, 1).numpy(),
                   disc_means=np.concatenate([m.running_mean.numpy() for m in bn]),
                   disc_vars=np.concatenate([m.running_var.numpy() for m in bn]))  # fmt: skip
    ckpt = {"state_dict": sd, "global_step": 0, "epoch": 0}
    _torch_save("taming.ckpt", sd, ckpt, torch, outputs, {**c, "image_size": SIZE})


def make_llamagen(src: Path):
    import torch

    sys.path.insert(0, str(src / "llamagen"))
    from tokenizer.tokenizer_image.vq_model import Decoder, Encoder, ModelArgs, VQModel

    torch.manual_seed(0)
    c = LLAMAGEN
    args = ModelArgs(codebook_size=c["codebook_size"], codebook_embed_dim=c["codebook_embed_dim"],
                     encoder_ch_mult=c["ch_mult"], decoder_ch_mult=c["ch_mult"],
                     z_channels=c["z_channels"])  # fmt: skip
    model = VQModel(args)  # the width is not a ModelArgs field: rebuild the two halves
    kw = dict(ch=c["ch"], ch_mult=c["ch_mult"], num_res_blocks=c["num_res_blocks"],
              z_channels=c["z_channels"])  # fmt: skip
    model.encoder, model.decoder = Encoder(**kw), Decoder(**kw)
    _torch_randomize(model, torch, 1)
    model.eval()
    _torch_round(model)
    x_u8 = images(1)
    x = torch.from_numpy(x_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        h = model.quant_conv(model.encoder(x))
        quant, _, (_, _, ids) = model.encode(x)
        ids = ids.reshape(BATCH, SIZE // 4, SIZE // 4)
        rec = model.decode_code(
            ids.reshape(-1), (BATCH, SIZE // 4, SIZE // 4, c["codebook_embed_dim"])
        )
    sd = dict(model.state_dict())
    outputs = dict(images=x_u8, encoded=h.permute(0, 2, 3, 1).numpy(), ids=ids.numpy(),
                   decoded=rec.permute(0, 2, 3, 1).numpy())  # fmt: skip
    _torch_save("llamagen.pt", sd, {"model": sd}, torch, outputs, {**c, "image_size": SIZE})


def make_torch_sample(src: Path):
    """A small torch.save file exercising the torch-free reader: dtypes, a 0-d tensor, a
    transposed (strided) tensor, a view at an offset into a shared storage, and a
    non-tensor object as Lightning's hyper-parameters are."""
    import collections

    import torch
    from omegaconf import OmegaConf

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = collections.OrderedDict(
        float32=torch.randn(3, 4, 2, generator=g),
        strided=base.t(),
        offset_view=base[2:4],
        float16=torch.randn(7, generator=g).half(),
        bfloat16=torch.randn(2, 3, generator=g).bfloat16(),
        int64=torch.arange(5),
        scalar=torch.tensor(7),
    )
    obj = {"state_dict": sd, "hyper_parameters": OmegaConf.create({"a": 1}), "global_step": 3}
    torch.save(obj, OUT / "torch_sample.ckpt")
    np.savez(OUT / "torch_sample_expected.npz",
             **{k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                for k, v in sd.items()})  # fmt: skip


def make_maskgit(src: Path):
    import flax
    import jax
    import jax.numpy as jnp
    import ml_collections

    sys.path.insert(0, str(src / "maskgit"))
    from maskgit.nets.vqgan_tokenizer import VQVAE

    c = MASKGIT
    config = ml_collections.ConfigDict()
    config.vqvae = ml_collections.ConfigDict(dict(
        quantizer="vq", codebook_size=c["codebook_size"], entropy_loss_ratio=0.1,
        entropy_temperature=0.01, entropy_loss_type="softmax", commitment_cost=0.25,
        filters=c["filters"], num_res_blocks=c["num_res_blocks"],
        channel_multipliers=c["channel_multipliers"], embedding_dim=c["embedding_dim"],
        conv_downsample=False, activation_fn="swish", norm_type="GN"))  # fmt: skip
    model = VQVAE(config=config, train=False)
    x_u8 = images(2)
    x = jnp.asarray(x_u8, jnp.float32) / 255.0  # MaskGIT's [0, 1]
    variables = model.init(
        jax.random.key(0), {"image": x}, method=lambda m, i: m.decode(m.encode(i)[0])
    )
    params = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
    rng = np.random.default_rng(1)
    for k, v in params.items():  # random GroupNorm affines
        if "GroupNorm" in k:
            base = 1.0 if k.endswith("scale") else 0.0
            params[k] = jnp.asarray(base + 0.2 * rng.standard_normal(v.shape), jnp.float32)
    z = model.apply({"params": flax.traverse_util.unflatten_dict(params, sep="/")}, x,
                    method=lambda m, i: m.encoder(i))  # fmt: skip
    std = float(jnp.std(z))
    params["quantizer/codebook"] = jnp.asarray(
        rng.standard_normal((c["codebook_size"], c["embedding_dim"])) * std, jnp.float32
    )
    params = {k: jnp.asarray(v, jnp.float16).astype(jnp.float32) for k, v in params.items()}
    variables = {"params": flax.traverse_util.unflatten_dict(params, sep="/")}
    z = model.apply(variables, x, method=lambda m, i: m.encoder(i))
    ids = model.apply(variables, x, method=model.encode_to_indices)
    rec = model.apply(variables, ids, method=model.decode_from_indices)
    (ORIGINALS / "maskgit.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    np.savez_compressed(
        OUT / "maskgit_weights.npz", **{k: _half(np.asarray(v)) for k, v in params.items()}
    )
    np.savez_compressed(OUT / "maskgit_outputs.npz", images=x_u8, encoded=np.asarray(z),
                        ids=np.asarray(ids), decoded=np.asarray(rec))  # fmt: skip
    (OUT / "maskgit_config.json").write_text(json.dumps({**c, "image_size": SIZE}, indent=1) + "\n")


def main():
    global ORIGINALS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, required=True, help="folder with the three checkouts")
    p.add_argument("families", nargs="+", choices=["taming", "llamagen", "maskgit", "torch_sample"])
    p.add_argument("--originals", type=Path, default=ORIGINALS,
                   help="where the originals' own files go (3 MB each, not committed)")  # fmt: skip
    a = p.parse_args()
    ORIGINALS = a.originals
    OUT.mkdir(parents=True, exist_ok=True)
    ORIGINALS.mkdir(parents=True, exist_ok=True)
    for f in a.families:
        makers = {"taming": make_taming, "llamagen": make_llamagen, "maskgit": make_maskgit,
                  "torch_sample": make_torch_sample}  # fmt: skip
        makers[f](a.src)
        print("wrote", f)


if __name__ == "__main__":
    main()
