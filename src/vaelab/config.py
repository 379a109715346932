"""Configuration as data: frozen dataclasses that round-trip through JSON, and named presets.

A run is fully described by a `RunConfig` (data + model + train). The command line, `--config`
files and presets all build one; `config.json` in a run directory is its `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from vaelab.errors import ConfigError
from vaelab.settings import (
    at_least,
    build,
    check_settings,
    declared,
    positive_finite,
    rule,
    setting,
    sizes_within,
    within,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

CONFIG_VERSION = 1  # bump when config.json changes incompatibly
MAX_CLASSES = 10_000  # labels of a conditional VAE: 0..MAX_CLASSES-1 (one row of weights each)
MAX_SEED = 2**32 - 1  # seeds feed torch, numpy and derived per-epoch seeds; keep them in range
# sizes a typo could make astronomical (torch takes sizes as 64-bit integers): units per layer,
# latent dimensions, channels, samples per image; a size below these that does not fit in memory
# gets the out-of-memory message instead
MAX_UNITS = 1_000_000
MAX_IMAGE_SIZE = 4096  # --image-size: pixels per side

BINARIZATIONS = ("none", "dynamic", "static")
ARCHITECTURES = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh", "elu")
LIKELIHOODS = ("bernoulli", "continuous-bernoulli", "gaussian", "gaussian-learned")
INITS = ("glorot", "torch")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "exponential", "cosine", "iwae")
REDUCTIONS = ("mean", "sum")
OPTIMIZERS = ("rmsprop", "adam")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
_CHW = "must be (C, H, W), got {}"


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how pixels become model inputs."""

    SECTION: ClassVar[str] = "data"

    source: str = setting(
        "mnist", "mnist, an IDX folder, an .npz or an image folder", option="data", metavar="NAME_OR_PATH",
        checks=(rule(bool, "must name a dataset or a path"),),
    )
    binarize: str = setting(
        "none", "pixels: grey levels in [0, 1] (none), a fresh Bernoulli draw each epoch (dynamic), or "
        "one draw with --binarize-seed (static)", choices=BINARIZATIONS,
    )
    binarize_seed: int = setting(
        0, "the seed of --binarize static's draw", metavar="SEED",
        checks=(within(0, MAX_SEED, f"[0, {MAX_SEED}]"),), applies=("binarize", ("static",)),
    )
    image_size: int | None = setting(
        None, "resize the images of an image folder to this square size",
        checks=(within(1, MAX_IMAGE_SIZE, f"[1, {MAX_IMAGE_SIZE}]"),),
    )
    channels: int | None = setting(
        None, "1 grey or 3 colour (default: as the data is)", choices=(1, 3),
        checks=(rule(lambda v: v in (1, 3), "must be 1 or 3, got {}"),),
    )

    def validate(self) -> None:
        check_settings(self, self.SECTION)


@dataclass(frozen=True)
class ModelConfig:
    """The VAE's architecture. `input_shape` is filled in from the data when training starts."""

    SECTION: ClassVar[str] = "model"

    architecture: str = setting(
        "mlp", "the encoder and decoder networks: mlp (the seed) or conv (stride-2 convolutions, any "
        "image size)", choices=ARCHITECTURES,
    )
    input_shape: tuple[int, ...] = setting(
        (1, 28, 28), "(C, H, W) of the images; always taken from the data", option=None,
        checks=(rule(lambda v: len(v) == 3 and all(1 <= s <= MAX_UNITS for s in v), _CHW),),
    )
    hidden: tuple[int, ...] = setting(
        (256,), "hidden layer sizes of the encoder; the decoder mirrors them", metavar="N",
        checks=(sizes_within(1, MAX_UNITS, f"[1, {MAX_UNITS:,}]"),),
    )
    latent_dim: int = setting(2, "latent dimensions", checks=(within(1, MAX_UNITS, f"[1, {MAX_UNITS:,}]"),))
    activation: str = setting("relu", "the hidden layers' activation", choices=ACTIVATIONS)
    likelihood: str = setting(
        "bernoulli", "p(x|z): bernoulli (the seed's binary cross-entropy), continuous-bernoulli, gaussian "
        "(fixed --gaussian-std) or gaussian-learned (one learned std per pixel)", choices=LIKELIHOODS,
    )
    gaussian_std: float = setting(
        0.1, "the fixed std of --likelihood gaussian", checks=(positive_finite,),
        applies=("likelihood", ("gaussian",)),
    )
    # Keras' binary_crossentropy clips probabilities to [clip, 1 - clip] (1e-7) before the log;
    # in logits that is a clamp at +-log((1 - clip) / clip), with no gradient beyond it. 0: exact.
    bernoulli_clip: float = setting(
        0.0, "clip probabilities to [P, 1-P] in the training loss, as Keras does (0: exact)", metavar="P",
        checks=(rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5), got {}"),),
        applies=("likelihood", ("bernoulli",)),
    )
    conv_channels: tuple[int, ...] = setting(
        (32, 64), "conv: channels of each stride-2 layer", metavar="N",
        checks=(sizes_within(1, MAX_UNITS, f"[1, {MAX_UNITS:,}]"),), applies=("architecture", ("conv",)),
    )
    conditional: bool = setting(
        False, "a conditional VAE: encoder and decoder see the label (preset cvae; --no-conditional "
        "makes it unconditional)",
    )
    num_classes: int = setting(
        0, "labels 0..num_classes-1 of a conditional model; always taken from the data", option=None,
        checks=(within(0, MAX_CLASSES, f"[0, {MAX_CLASSES}]"),),
    )
    epsilon_std: float = setting(1.0, "std of the reparameterization noise", checks=(positive_finite,))
    init: str = setting(
        "glorot", "weight initialisation: glorot (Keras' Dense: uniform, zero biases) or torch "
        "(nn.Linear's default; pytorch-example)", choices=INITS,
    )

    @property
    def input_dim(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def validate(self) -> None:
        check_settings(self, self.SECTION)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: objective, optimizer, batching, precision and seed."""

    SECTION: ClassVar[str] = "train"

    epochs: int = setting(50, "passes over the training set (may grow when resuming)", checks=(at_least(1),),
                          resume=True)
    batch_size: int = setting(100, "images per step", checks=(at_least(1),))
    optimizer: str = setting("rmsprop", "rmsprop (Keras 3's rule) or adam", choices=OPTIMIZERS)
    lr: float = setting(1e-3, "learning rate", checks=(positive_finite,))
    # RMSprop as Keras sets it (PyTorch's own defaults, lr 1e-2 and alpha 0.99, differ);
    # for Adam: beta1 0.9, beta2 0.999 and this eps.
    rmsprop_alpha: float = setting(
        0.9, "RMSprop's decay rate (Keras' rho)", metavar="RHO",
        checks=(rule(lambda v: 0 < v < 1, "must be in (0, 1), got {}"),), applies=("optimizer", ("rmsprop",)),
    )
    eps: float = setting(1e-7, "the optimizer's epsilon", checks=(positive_finite,))
    objective: str = setting(
        "elbo", "elbo (beta-weighted KL) or iwae (the importance-weighted bound)", choices=OBJECTIVES
    )
    beta: float = setting(
        1.0, "weight of the KL term (1: the ELBO)",
        checks=(rule(lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0, got {}"),),
    )
    warmup_epochs: float = setting(
        0.0, "raise the KL weight linearly from 0 to --beta over N epochs", metavar="N",
        checks=(rule(lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0, got {}"),),
    )
    k: int = setting(
        1, "samples of z per image (iwae: importance samples; elbo: averaged)",
        checks=(within(1, MAX_UNITS, f"[1, {MAX_UNITS:,}]"),),
    )
    lr_schedule: str = setting(
        "constant", "per-epoch learning rate: constant; exponential or cosine from --lr to --lr-final; "
        "iwae: Burda et al.'s 3^i stages fitted to --epochs", choices=LR_SCHEDULES,
    )
    lr_final: float | None = setting(
        None, "the last epoch's rate of an exponential or cosine schedule (default: lr / 10)",
        checks=(positive_finite,), applies=("lr_schedule", ("exponential", "cosine")),
    )
    validation: int = setting(
        0, "hold out N training images (a fixed draw) to score at each evaluation", metavar="N",
        checks=(rule(lambda v: v >= 0, "must be >= 0 images, got {}"),),
    )
    patience: int = setting(
        0, "early stopping: stop after N evaluations without a better validation loss "
        "(model.safetensors keeps the best; 0: never)", metavar="N",
        checks=(rule(lambda v: v >= 0, "must be >= 0, got {}"),),
    )
    time_limit: float | None = setting(
        None, "stop after the epoch that reaches this training time (the run's, resumes included; "
        "may be raised when resuming)", metavar="MINUTES", checks=(positive_finite,), resume=True,
    )
    # the batch's loss is the mean over images (Keras) or their sum (the PyTorch example); the
    # logged numbers are per image either way
    reduction: str = setting("mean", "batch loss: mean over images (Keras) or sum (PyTorch's example)",
                             choices=REDUCTIONS)
    seed: int = setting(
        0, "random seed (the same seed on the same machine: the same numbers)",
        checks=(within(0, MAX_SEED, f"[0, {MAX_SEED}]"),),
    )
    precision: str = setting(
        "fp32", "fp32, or bf16 autocast (float32 weights and losses)", choices=PRECISIONS
    )
    compile: bool = setting(
        False, "torch.compile the training step (faster epochs in long runs, after about 10 s of "
        "compiling; needs a C++ compiler on a CPU; numbers differ from an uncompiled run in the last "
        "digits; may be switched when resuming)", resume=True,
    )
    device: str = setting("auto", "where to train: auto (a GPU if there is one), cpu, cuda or mps",
                          choices=DEVICES, resume=True)
    eval_every: int = setting(
        1, "test-set pass every N epochs, and after the last one", metavar="N", checks=(at_least(1),)
    )
    checkpoint_every: int = setting(1, "write checkpoint/ every N epochs", metavar="N", checks=(at_least(1),))

    def validate(self) -> None:
        check_settings(self, self.SECTION)
        if self.patience and not self.validation:
            raise ConfigError("option --patience: early stopping needs a validation split (--validation N)")
        if self.objective == "iwae" and self.beta != 1.0:
            raise ConfigError("option --beta: the iwae objective has no KL weight; use --objective elbo")


# The train settings a resumed run may change: more epochs, a time limit, and --compile and --device,
# which change no saved state (a run may go on on another machine). Everything else comes from the
# run's config.json.
RESUME_CHANGEABLE = tuple(f.name for f, spec in declared(TrainConfig) if spec.resume)


@dataclass(frozen=True)
class RunConfig:
    """Everything needed to rerun a training run; `config.json` holds its `to_dict()`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "seed"

    def validate(self) -> RunConfig:
        self.data.validate()
        self.model.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["version"] = CONFIG_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> RunConfig:
        """Build a config from a dict, refusing unknown keys, wrong types and newer versions."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a JSON/TOML object")
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"{where}: version: must be an integer, got {version!r}")
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"{where}: config version {version!r} is newer than this vaelab understands "
                f"({CONFIG_VERSION}); upgrade vaelab"
            )
        return build(cls, d, where)


PRESETS: dict[str, RunConfig] = {
    # The Keras example exactly: MLP 784-256-2, rmsprop, batch 100, 50 epochs, grey levels,
    # and Keras' loss: binary cross-entropy of probabilities clipped to [1e-7, 1 - 1e-7].
    "seed": RunConfig(preset="seed", model=ModelConfig(bernoulli_clip=1e-7)),
    # pytorch/examples vae/main.py: 784-400-20, Adam 1e-3, batch 128, 10 epochs.
    "pytorch-example": RunConfig(
        preset="pytorch-example",
        model=ModelConfig(hidden=(400,), latent_dim=20, init="torch"),
        train=TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-3, eps=1e-8, reduction="sum"),
    ),
    # The best test log-likelihood in one hour of training on a 2-core CPU. It starts from the
    # IWAE paper's protocol (dynamically binarized MNIST, 400 validation images, Adam) but spends
    # the hour differently: a wider ReLU network (784-512-256-32), batch 100 instead of 20, and one
    # exponential decay 1e-3 -> 1e-4 over 450 epochs instead of 3,280 passes in 3^i stages.
    # docs/decisions.md says why.
    "benchmark": RunConfig(
        preset="benchmark",
        data=DataConfig(binarize="dynamic"),
        model=ModelConfig(hidden=(512, 256), latent_dim=32, activation="relu"),
        train=TrainConfig(
            epochs=450,
            batch_size=100,
            optimizer="adam",
            lr=1e-3,
            eps=1e-7,
            lr_schedule="exponential",
            lr_final=1e-4,
            validation=400,
            eval_every=10,
            time_limit=60.0,  # the budget: stop after the epoch that reaches one hour
        ),
    ),
    # A convolutional VAE (two stride-2 layers of 32 and 64 channels, a dense layer of 256) for
    # images of any size and channel count; here dynamically binarized MNIST.
    "conv": RunConfig(
        preset="conv",
        data=DataConfig(binarize="dynamic"),
        model=ModelConfig(architecture="conv", conv_channels=(32, 64), hidden=(256,), latent_dim=20),
        train=TrainConfig(epochs=20, batch_size=100, optimizer="adam", lr=1e-3),
    ),
    # A conditional VAE: an MLP (512 hidden, 2 latent: the style) whose encoder and decoder see the
    # digit's label; `vaelab sample RUN --label 7` draws sevens.
    "cvae": RunConfig(
        preset="cvae",
        data=DataConfig(binarize="dynamic"),
        model=ModelConfig(hidden=(512,), latent_dim=2, conditional=True),
        train=TrainConfig(epochs=20, batch_size=100, optimizer="adam", lr=1e-3),
    ),
}


def preset(name: str) -> RunConfig:
    """The named preset's configuration (`seed`, `pytorch-example`, ...)."""
    if name not in PRESETS:
        raise ConfigError(f"option --preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a dict (nested like config.json)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"option --config: {p}: is a folder, not a file")
    if not p.is_file():
        raise ConfigError(f"option --config: {p}: no such file")
    if p.suffix.lower() not in (".toml", ".json"):
        raise ConfigError(f"option --config: {p}: must end in .toml or .json")
    try:
        text = p.read_text(encoding="utf-8")
        d = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid {p.suffix[1:].upper()}: {_one_line(e)}") from None
    except OSError as e:
        raise ConfigError(f"option --config: {p}: cannot be read ({e.strerror or _one_line(e)})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: must hold a JSON object, not {type(d).__name__}")
    return d


def merge(base: RunConfig, overrides: dict[str, Any], *, where: str) -> RunConfig:
    """`base` with the nested `overrides` (sections data/model/train, key preset) applied."""
    d = base.to_dict()
    for key, value in overrides.items():
        if key in ("data", "model", "train") and isinstance(value, dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return RunConfig.from_dict(d, where=where)


def is_whole(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "RunConfig",
    "PRESETS",
    "preset",
    "read_config_file",
    "merge",
    "replace",
]
