"""Options come from one place: every setting declared in vaelab.config is a `vaelab train` option
that lands on its own config key, with its help; every verb's help shows an example."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import vaelab
from vaelab.cli import VERBS, build_parser, main
from vaelab.cli.options import option_for, options
from vaelab.cli.train_cmd import build_config
from vaelab.config import RESUME_CHANGEABLE, DataConfig, ModelConfig, TrainConfig

FROM_THE_DATA = {("model", "input_shape"), ("model", "num_classes")}  # set from the data, no option


def train_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_every_setting_but_those_the_data_gives_has_an_option():
    fields = {(cls.SECTION, f.name) for cls in (DataConfig, ModelConfig, TrainConfig)
              for f in dataclasses.fields(cls)}
    with_option = {(o.section, o.key) for o in options()}
    assert with_option == fields - FROM_THE_DATA
    assert len({o.flag for o in options()}) == len(options())  # no two settings share an option


def a_value(option, seed):
    """A valid value other than the seed preset's, as text for the command line."""
    if option.spec.choices:
        return next(str(c) for c in option.spec.choices if c != seed)
    if option.type is bool:
        return None  # a switch: --x or --no-x
    if option.key == "source":
        return "other.npz"
    if option.type is float:
        return "0.25"
    if option.key in ("image_size",):
        return "32"
    return str((seed or 1) + 1) if not isinstance(seed, tuple) else "7"


@pytest.mark.parametrize("option", options(), ids=lambda o: o.flag)
def test_each_option_lands_on_its_own_config_key(option):
    seed = option.value(vaelab.preset("seed"))
    value = a_value(option, seed)
    argv = [option.flag]
    if option.type is bool:
        argv = [f"--{'no-' if seed else ''}{option.spec.option}"]
    else:
        argv.append(value)
    if option.spec.applies:  # a setting that needs another one: give that too
        other = option_for(option.section, option.spec.applies[0])
        values = option.spec.applies[1]  # None: any value of the other setting will do
        argv += [other.flag, str(values[0]) if values else a_value(other, other.value(vaelab.preset("seed")))]
    if option.key == "patience":
        argv += ["--validation", "10"]
    if option.key in ("inference", "free_bits"):  # settings of a hierarchy
        argv += ["--upper-latents", "5"]
    config = build_config(train_args(*argv))
    got = option.value(config)
    changed = {(o.section, o.key) for o in options() if o.value(config) != o.value(vaelab.preset("seed"))}
    assert (option.section, option.key) in changed, (argv, got)
    if option.type is bool:
        assert got is (not seed)
    elif isinstance(got, tuple):
        assert got == (int(value),)
    elif option.spec.choices:
        assert str(got) == value
    elif option.key != "source":
        assert got == option.type(value)


def test_the_help_of_train_shows_every_option_with_its_seed_value(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in options():
        assert option.flag in text
    assert "--latent-dim LATENT_DIM latent dimensions (seed: 2)" in text
    assert "--hidden N [N ...] hidden layer sizes of the encoder; the decoder mirrors them (seed: 256)" \
        in text
    assert "model settings" in text and "[model] table" in text


def test_settings_a_resumed_run_may_change_are_declared_there():
    assert set(RESUME_CHANGEABLE) == {"epochs", "time_limit", "compile", "device", "tensorboard"}


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb, capsys):
    with pytest.raises(SystemExit) as done:
        main([verb, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"vaelab {verb}" in out.split("example:")[1]
