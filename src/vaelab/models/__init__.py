"""Encoders, decoders and the VAEs that compose them."""

from vaelab.config import ModelConfig
from vaelab.models.deep import DeepVAE
from vaelab.models.vae import VAE


def build_model(config: ModelConfig) -> VAE | DeepVAE:
    """A freshly initialised model for `config` (uses torch's global RNG: seed it first): the
    classic VAE, or `DeepVAE` for hierarchies, VampPriors and flows (`config.deep`)."""
    return DeepVAE(config) if config.deep else VAE(config)  # (either validates the config)


__all__ = ["VAE", "DeepVAE", "build_model"]
