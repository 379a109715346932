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
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vaelab.errors import ConfigError

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


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how pixels become model inputs."""

    source: str = "mnist"  # a dataset name or a path (IDX folder, .npz, image folder)
    binarize: str = "none"  # none: grey levels in [0, 1] (the seed); dynamic; static
    binarize_seed: int = 0  # the seed of static binarization
    image_size: int | None = None  # resize image folders to this square size
    channels: int | None = None  # 1 grey, 3 colour; None: as the data is

    def validate(self) -> None:
        _choice("binarize", self.binarize, BINARIZATIONS)
        if not self.source:
            raise ConfigError("option --data: must name a dataset or a path")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"option --image-size: must be in [1, {MAX_IMAGE_SIZE}], got {self.image_size}")
        if not 0 <= self.binarize_seed <= MAX_SEED:
            raise ConfigError(f"option --binarize-seed: must be in [0, {MAX_SEED}], got {self.binarize_seed}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"option --channels: must be 1 or 3, got {self.channels}")


@dataclass(frozen=True)
class ModelConfig:
    """The VAE's architecture. `input_shape` is filled in from the data when training starts."""

    architecture: str = "mlp"  # mlp (the seed) or conv (stride-2 convolutions, any image size)
    input_shape: tuple[int, ...] = (1, 28, 28)  # (C, H, W)
    hidden: tuple[int, ...] = (256,)  # encoder hidden sizes; the decoder mirrors them
    latent_dim: int = 2
    activation: str = "relu"
    # p(x|z): bernoulli (the seed's BCE), continuous-bernoulli, gaussian (fixed gaussian_std),
    # gaussian-learned (one learned std per pixel)
    likelihood: str = "bernoulli"
    gaussian_std: float = 0.1  # the fixed std of likelihood "gaussian"
    # Keras' binary_crossentropy clips probabilities to [clip, 1 - clip] (1e-7) before the log;
    # in logits that is a clamp at +-log((1 - clip) / clip), with no gradient beyond it. 0: exact.
    bernoulli_clip: float = 0.0
    conv_channels: tuple[int, ...] = (32, 64)  # conv: channels of each stride-2 layer
    conditional: bool = False  # a conditional VAE: encoder and decoder also see the label
    num_classes: int = 0  # labels 0..num_classes-1 (filled in from the data when conditional)
    epsilon_std: float = 1.0  # std of the reparameterization noise (the seed's epsilon_std)
    init: str = "glorot"  # glorot: Keras' Dense (uniform, zero bias); torch: nn.Linear's default

    @property
    def input_dim(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def validate(self) -> None:
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("init", self.init, INITS)
        _choice("likelihood", self.likelihood, LIKELIHOODS)
        if not 1 <= self.latent_dim <= MAX_UNITS:
            raise ConfigError(f"option --latent-dim: must be in [1, {MAX_UNITS:,}], got {self.latent_dim}")
        if not self.hidden or any(not 1 <= h <= MAX_UNITS for h in self.hidden):
            raise ConfigError(
                f"option --hidden: sizes must be in [1, {MAX_UNITS:,}], got {list(self.hidden)}"
            )
        if len(self.input_shape) != 3 or any(not 1 <= s <= MAX_UNITS for s in self.input_shape):
            raise ConfigError(f"model.input_shape: must be (C, H, W), got {self.input_shape}")
        _positive_finite("--epsilon-std", self.epsilon_std)
        _positive_finite("--gaussian-std", self.gaussian_std)
        if not 0 <= self.bernoulli_clip < 0.5:
            raise ConfigError(f"option --bernoulli-clip: must be in [0, 0.5), got {self.bernoulli_clip}")
        if not self.conv_channels or any(not 1 <= c <= MAX_UNITS for c in self.conv_channels):
            raise ConfigError(
                f"option --conv-channels: sizes must be in [1, {MAX_UNITS:,}], got {list(self.conv_channels)}"
            )
        if not 0 <= self.num_classes <= MAX_CLASSES:
            raise ConfigError(f"model.num_classes: must be in [0, {MAX_CLASSES}], got {self.num_classes}")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: objective, optimizer, batching, precision and seed."""

    epochs: int = 50
    batch_size: int = 100
    optimizer: str = "rmsprop"
    lr: float = 1e-3
    # RMSprop as Keras sets it (PyTorch's own defaults, lr 1e-2 and alpha 0.99, differ);
    # for Adam: beta1 0.9, beta2 0.999 and this eps.
    rmsprop_alpha: float = 0.9
    eps: float = 1e-7
    objective: str = "elbo"  # elbo (beta-weighted KL) or iwae (the importance-weighted bound)
    beta: float = 1.0  # weight of the KL term (1: the ELBO)
    warmup_epochs: float = 0.0  # the KL weight rises linearly from 0 to beta over these epochs
    k: int = 1  # samples of z per image (iwae: importance samples; elbo: averaged)
    lr_schedule: str = "constant"  # constant, exponential or cosine (lr -> lr_final), iwae (3^i)
    lr_final: float | None = None  # the last epoch's rate of exponential/cosine (default lr/10)
    validation: int = 0  # training images held out (fixed draw) to score each epoch; 0: none
    patience: int = 0  # stop after this many evaluations without a better validation loss; 0: never
    time_limit: float | None = None  # minutes of training after which the run stops (at an epoch's end)
    # the batch's loss is the mean over images (Keras) or their sum (the PyTorch example); the
    # logged numbers are per image either way
    reduction: str = "mean"
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False  # torch.compile the training step and the RMSprop update
    device: str = "auto"
    eval_every: int = 1  # evaluate on the test set every N epochs (the seed: every epoch)
    checkpoint_every: int = 1  # epochs between checkpoints

    def validate(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("device", self.device, DEVICES)
        if self.epochs < 1:
            raise ConfigError(f"option --epochs: must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"option --batch-size: must be at least 1, got {self.batch_size}")
        _positive_finite("--lr", self.lr)
        _positive_finite("--eps", self.eps)
        if not 0 < self.rmsprop_alpha < 1:
            raise ConfigError(f"option --rmsprop-alpha: must be in (0, 1), got {self.rmsprop_alpha}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"option --beta: must be a finite number >= 0, got {self.beta}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ConfigError(f"option --warmup-epochs: must be a number >= 0, got {self.warmup_epochs}")
        if not 1 <= self.k <= MAX_UNITS:
            raise ConfigError(f"option --k: must be in [1, {MAX_UNITS:,}], got {self.k}")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.lr_final is not None:
            _positive_finite("--lr-final", self.lr_final)
        if self.validation < 0:
            raise ConfigError(f"option --validation: must be >= 0 images, got {self.validation}")
        if self.time_limit is not None:
            _positive_finite("--time-limit", self.time_limit)
        if self.patience < 0:
            raise ConfigError(f"option --patience: must be >= 0, got {self.patience}")
        if self.patience and not self.validation:
            raise ConfigError("option --patience: early stopping needs a validation split (--validation N)")
        if self.objective == "iwae" and self.beta != 1.0:
            raise ConfigError("option --beta: the iwae objective has no KL weight; use --objective elbo")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"option --seed: must be in [0, {MAX_SEED}], got {self.seed}")
        if self.eval_every < 1:
            raise ConfigError(f"option --eval-every: must be at least 1, got {self.eval_every}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"option --checkpoint-every: must be at least 1, got {self.checkpoint_every}")


# The train settings a resumed run may change: more epochs, a time limit, and --compile and --device,
# which change no saved state (a run may go on on another machine). Everything else comes from the
# run's config.json.
RESUME_CHANGEABLE = ("epochs", "compile", "device", "time_limit")


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
        return _build(cls, d, where)


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


# --- strict dataclass building -------------------------------------------------------------


def _build(cls: type, d: dict[str, Any], where: str, key: str = "") -> Any:
    """`cls(**d)`, strictly; errors read `where: key.path: what is wrong`."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        section = f" in [{key}]" if key else ""
        raise ConfigError(
            f"{where}: unknown key {_dotted(key, unknown[0])!r}{section} (known: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, where, _dotted(key, name))
    return cls(**kwargs)


def _dotted(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    at = f"{where}: {key}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: must be a table/object of keys, got {value!r}")
        return _build(tp, value, where, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{at}: must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(item, v, where, key) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{at}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # a programming error, not user input


def is_whole(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_finite(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):  # also refuses NaN, which compares false
        raise ConfigError(f"option {flag}: must be a positive finite number, got {value}")


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        flag = "--" + option.replace("_", "-")
        raise ConfigError(f"option {flag}: {value!r} is not one of {', '.join(choices)}")


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
