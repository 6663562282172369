"""The encoder/decoder families: ``sonnet`` (the 2017 VQ-VAE layout: strided 4x4
convolutions and residual stacks) and ``vqgan`` (the taming / LlamaGen / MaskGIT layout:
GroupNorm-swish ResNet blocks, interpolated up-sampling, self-attention)."""

from vqvae.nets.sonnet import ACTIVATIONS, Decoder, Encoder
from vqvae.nets.vqgan import VQGANConfig, VQGANDecoder, VQGANEncoder

__all__ = ["ACTIVATIONS", "Decoder", "Encoder", "VQGANConfig", "VQGANDecoder", "VQGANEncoder"]
