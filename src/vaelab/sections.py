"""The three sections of a run's configuration, each setting declared once (`vaelab.settings`):
DataConfig (where the images come from), ModelConfig (the VAE) and TrainConfig (the optimisation),
with the limits and choices their checks use. `vaelab.config` puts them together into a RunConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from vaelab.errors import ConfigError
from vaelab.settings import (
    at_least,
    check_settings,
    declared,
    positive_finite,
    rule,
    setting,
    sizes_within,
    within,
)

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
INFERENCES = ("bottom-up", "ladder")
PRIORS = ("standard", "vamp")
_CHW = "must be (C, H, W), got {}"
_UNITS = f"[1, {MAX_UNITS:,}]"
_SIZES = f"sizes must be in {_UNITS}, got {{}}"


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how pixels become model inputs."""

    SECTION: ClassVar[str] = "data"

    source: str = setting(
        "mnist", "mnist, fashion-mnist, dsprites, an IDX folder, an .npz or an image folder", option="data",
        metavar="NAME_OR_PATH",
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
    # Beyond one Gaussian layer under N(0, I) (vaelab.models.deep): stochastic layers above z,
    # a VampPrior, inverse autoregressive flow steps on the posterior
    upper_latents: tuple[int, ...] = setting(
        (), "sizes of stochastic layers above the first (--latent-dim), bottom to top: a hierarchical VAE",
        metavar="N", checks=(rule(lambda v: all(1 <= s <= MAX_UNITS for s in v), _SIZES, show=list),),
    )
    upper_hidden: tuple[int, ...] = setting(
        (100, 100), "hidden sizes of the networks between stochastic layers (both directions)", metavar="N",
        checks=(sizes_within(1, MAX_UNITS, _UNITS),), applies=("upper_latents", None),
    )
    inference: str = setting(
        "bottom-up", "how a hierarchy infers its layers: bottom-up (each from the one below, as the IWAE "
        "paper) or ladder (top-down, sharing the generative path, as the Ladder VAE)", choices=INFERENCES,
    )
    prior: str = setting(
        "standard", "the prior of the top layer: standard (N(0, I)) or vamp (a mixture of the posteriors "
        "of learned pseudo-inputs, Tomczak & Welling)", choices=PRIORS,
    )
    pseudo_inputs: int = setting(
        500, "components of the VampPrior (learned pseudo-inputs)", metavar="K",
        checks=(within(1, MAX_UNITS, _UNITS),), applies=("prior", ("vamp",)),
    )
    flow_steps: int = setting(
        0, "inverse autoregressive flow steps on the posterior of a one-layer model (0: a Gaussian)",
        metavar="T", checks=(within(0, 1000, "[0, 1000]"),),
    )
    flow_hidden: int = setting(
        200, "hidden units of each flow step's autoregressive network", metavar="N",
        checks=(within(1, MAX_UNITS, _UNITS),), applies=("flow_steps", None),
    )
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

    @property
    def deep(self) -> bool:
        """Whether this is beyond one Gaussian layer under N(0, I): vaelab.models.deep's model."""
        return bool(self.upper_latents) or self.prior != "standard" or self.flow_steps > 0

    def validate(self) -> None:
        check_settings(self, self.SECTION)
        if self.deep:
            option = "--upper-latents" if self.upper_latents else "--flow-steps"
            option = "--prior" if self.prior != "standard" else option
            for ok, what in ((self.architecture == "mlp", "MLP models (--architecture mlp)"),
                             (self.likelihood == "bernoulli", "the Bernoulli likelihood"),
                             (not self.conditional, "unconditional models (--no-conditional)")):
                if not ok:
                    raise ConfigError(f"option {option}: hierarchies, VampPriors and flows are for {what}")
        if self.flow_steps and self.upper_latents:
            raise ConfigError("option --flow-steps: flows are for one stochastic layer; drop --upper-latents")
        if self.inference != "bottom-up" and not self.upper_latents:
            raise ConfigError("option --inference: has no effect without --upper-latents")


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
    free_bits: float = setting(
        0.0, "free bits: each stochastic layer's KL counts as at least N nats per dimension in the loss "
        "(the batch's mean; Kingma et al. 2016); 0: off", metavar="N",
        checks=(rule(lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0, got {}"),),
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
    tensorboard: bool = setting(
        False, "write each epoch's scalars and image grids to RUN/tensorboard/ (needs the tensorboard "
        "package); may be switched when resuming", resume=True,
    )
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
