"""Encoders, decoders and the VAE that composes them."""

from vaelab.models.vae import VAE, build_model

__all__ = ["VAE", "build_model"]
