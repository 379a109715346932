"""Configuration as data: frozen dataclasses that round-trip through JSON, and named presets.

A run is fully described by a `RunConfig` (data + model + train). The command line, `--config`
files and presets all build one; `config.json` in a run directory is its `to_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vaelab.errors import ConfigError

CONFIG_VERSION = 1  # bump when config.json changes incompatibly
MAX_SEED = 2**32 - 1  # seeds feed torch, numpy and derived per-epoch seeds; keep them in range

BINARIZATIONS = ("none", "dynamic", "static")
ARCHITECTURES = ("mlp",)
ACTIVATIONS = ("relu", "tanh", "elu")
LIKELIHOODS = ("bernoulli",)
INITS = ("glorot", "torch")
OBJECTIVES = ("elbo",)
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
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"option --image-size: must be positive, got {self.image_size}")
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"option --channels: must be 1 or 3, got {self.channels}")


@dataclass(frozen=True)
class ModelConfig:
    """The VAE's architecture. `input_shape` is filled in from the data when training starts."""

    architecture: str = "mlp"
    input_shape: tuple[int, ...] = (1, 28, 28)  # (C, H, W)
    hidden: tuple[int, ...] = (256,)  # encoder hidden sizes; the decoder mirrors them
    latent_dim: int = 2
    activation: str = "relu"
    likelihood: str = "bernoulli"
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
        if self.latent_dim < 1:
            raise ConfigError(f"option --latent-dim: must be at least 1, got {self.latent_dim}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"option --hidden: sizes must be positive, got {list(self.hidden)}")
        if len(self.input_shape) != 3 or any(s < 1 for s in self.input_shape):
            raise ConfigError(f"model.input_shape: must be (C, H, W), got {self.input_shape}")
        _positive_finite("--epsilon-std", self.epsilon_std)


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
    objective: str = "elbo"
    beta: float = 1.0  # weight of the KL term (1: the ELBO)
    # the batch's loss is the mean over images (Keras) or their sum (the PyTorch example); the
    # logged numbers are per image either way
    reduction: str = "mean"
    seed: int = 0
    precision: str = "fp32"
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
            raise ConfigError(f"train.rmsprop_alpha: must be in (0, 1), got {self.rmsprop_alpha}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"option --beta: must be a finite number >= 0, got {self.beta}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"option --seed: must be in [0, {MAX_SEED}], got {self.seed}")
        if self.eval_every < 1:
            raise ConfigError(f"option --eval-every: must be at least 1, got {self.eval_every}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"train.checkpoint_every: must be at least 1, got {self.checkpoint_every}")


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
    # The Keras example exactly: MLP 784-256-2, rmsprop, batch 100, 50 epochs, grey levels.
    "seed": RunConfig(preset="seed"),
    # pytorch/examples vae/main.py: 784-400-20, Adam 1e-3, batch 128, 10 epochs.
    "pytorch-example": RunConfig(
        preset="pytorch-example",
        model=ModelConfig(hidden=(400,), latent_dim=20, init="torch"),
        train=TrainConfig(epochs=10, batch_size=128, optimizer="adam", lr=1e-3, eps=1e-8, reduction="sum"),
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
