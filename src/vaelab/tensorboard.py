"""TensorBoard, the tool PyTorch users watch runs with: `vaelab train --tensorboard` writes each
epoch's scalars and image grids into RUN/tensorboard/ (`tensorboard --logdir runs`).

Scalars: every number of the epoch's metrics row (losses, reconstruction, KL, validation, the
learning rate and KL weight where they change, seconds), and for a hierarchy, VampPrior or flow
the KL of each layer on a fixed batch of test images. Images: 64 samples from the prior and the
reconstructions of 8 test images (top row the images), as grids. Needs the `tensorboard` package
(the extra `vaelab[tensorboard]`; the test set-up has it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.errors import ConfigError

FOLDER = "tensorboard"
SAMPLES = 64
RECONSTRUCTIONS = 8


def check_available() -> None:
    """Refuse --tensorboard, before any work, where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError(
            "option --tensorboard: needs the tensorboard package (pip install tensorboard, or the extra "
            "vaelab[tensorboard])"
        ) from None


class EpochLog:
    """Called after each epoch with the model and its metrics row; writes them to RUN/tensorboard."""

    def __init__(self, run_dir: Path, test_images: torch.Tensor, seed: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / FOLDER))
        self.test = test_images[:RECONSTRUCTIONS]  # float (n, D) in [0, 1]
        self.seed = seed

    @torch.no_grad()
    def __call__(self, model, row: dict) -> None:
        epoch = row["epoch"]
        for key, value in row.items():
            if key != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(_tag(key), value, epoch)
        device = next(model.parameters()).device
        x = self.test.to(device)
        if hasattr(model, "sample_terms"):  # the KL of each layer, on this batch, one sample each
            g = torch.Generator().manual_seed(self.seed)
            eps = torch.randn(len(x), model.noise_dim, generator=g).to(device)
            kl = model.sample_terms(x, x, eps).kl.mean(0)
            for level, value in enumerate(kl.tolist(), 1):
                self.writer.add_scalar(f"kl per layer/z{level}", value, epoch)
        shape = tuple(model.image_shape)
        if not model.config.conditional:
            samples = model.sample(SAMPLES, seed=self.seed)
            self.writer.add_images("samples", _grid(samples.cpu(), shape, 8)[None], epoch)
        mean, _ = model.encode(x) if not model.config.conditional else (None, None)
        if mean is not None:
            recon = model.mean_image(model.decode(mean)).cpu()
            both = torch.cat([self.test, recon.float()])
            self.writer.add_images("reconstructions", _grid(both, shape, len(self.test))[None], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tag(key: str) -> str:
    """`test_loss` -> `loss/test`: TensorBoard groups a run's curves by the part before the slash."""
    split, _, what = key.partition("_")
    return f"{what}/{split}" if split in ("train", "test", "val") and what else key


def _grid(images: torch.Tensor, shape: tuple[int, ...], cols: int) -> torch.Tensor:
    """(n, D) images in [0, 1] -> one (C, H', W') grid of `cols` columns."""
    c, h, w = shape
    x = images.reshape(-1, c, h, w)
    rows = -(-len(x) // cols)
    grid = torch.zeros(c, rows * (h + 2), cols * (w + 2))
    for i, image in enumerate(x):
        r, q = divmod(i, cols)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = image
    return grid.clamp(0, 1)
