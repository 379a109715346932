"""vaelab: the variational autoencoder of the classic Keras MNIST example, as real software.

>>> import vaelab
>>> result = vaelab.train(vaelab.preset("seed"), "runs/seed")
>>> model = vaelab.load("runs/seed")
>>> model.sample(16, seed=0).shape
torch.Size([16, 784])
"""

from vaelab.config import PRESETS, DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from vaelab.errors import ConfigError, DataError, RunError, VaelabError
from vaelab.models import VAE
from vaelab.runs import load
from vaelab.train import train
from vaelab.version import __version__

__all__ = [
    "__version__",
    "load",
    "train",
    "preset",
    "PRESETS",
    "VAE",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "VaelabError",
    "ConfigError",
    "DataError",
    "RunError",
]
