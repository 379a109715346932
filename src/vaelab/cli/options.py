"""`vaelab train`'s setting options, derived from the settings `vaelab.config` declares: each field
of DataConfig, ModelConfig and TrainConfig that has an option becomes `--its-name` (with its type,
choices, metavar and help, the seed preset's value appended), in one group per section."""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from typing import Any

from vaelab.config import PRESETS, DataConfig, ModelConfig, TrainConfig
from vaelab.settings import Spec, declared

SECTIONS = (DataConfig, ModelConfig, TrainConfig)


@dataclass(frozen=True)
class Option:
    """A setting's command-line option: `--{spec.option}`, argparse's `dest`, and where the value
    goes: `section.key` in a config (a config file's `[section]` key)."""

    dest: str
    section: str
    key: str
    spec: Spec
    type: Any  # the field's annotation, optional stripped

    @property
    def flag(self) -> str:
        return f"--{self.spec.option}"

    def value(self, config) -> Any:
        """This setting's value in a RunConfig."""
        return getattr(getattr(config, self.section), self.key)


def options() -> list[Option]:
    """Every setting that has an option, in the order the config classes declare them."""
    found = []
    for cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f, spec in declared(cls):
            if spec.option:
                dest = spec.option.replace("-", "_")
                found.append(Option(dest, cls.SECTION, f.name, spec, _plain(hints[f.name])))
    return found


def option_for(section: str, key: str) -> Option:
    return next(o for o in options() if (o.section, o.key) == (section, key))


def add_options(parser: argparse.ArgumentParser) -> None:
    """One argparse group per section, an option per setting (default None: "not given")."""
    groups = {
        cls.SECTION: parser.add_argument_group(
            f"{cls.SECTION} settings", f"(in a --config file: the keys of its [{cls.SECTION}] table)"
        )
        for cls in SECTIONS
    }
    for option in options():
        kwargs: dict[str, Any] = {"dest": option.dest, "default": None, "help": _help(option)}
        if option.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(option.type) is tuple:
            kwargs.update(type=typing.get_args(option.type)[0], nargs="+")
        elif option.type is not str:
            kwargs["type"] = option.type
        if option.spec.choices:
            kwargs["choices"] = list(option.spec.choices)
        if option.spec.metavar:
            kwargs["metavar"] = option.spec.metavar
        groups[option.section].add_argument(option.flag, **kwargs)


def shown(value: Any) -> str:
    """A setting's value as a person would type it as an option."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _help(option: Option) -> str:
    seed = option.value(PRESETS["seed"])
    text = option.spec.help + (f" (seed: {shown(seed)})" if seed is not None else "")
    return text.replace("%", "%%")  # argparse formats help with %


def _plain(tp: Any) -> Any:
    """`int | None` -> int: the type an option's text is read as."""
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def markdown_table() -> str:
    """Every setting as a row of docs/options.md: option, config key, seed value, choices, help."""
    rows = [
        "| option | config file key | seed preset | choices | what it sets |",
        "|---|---|---|---|---|",
    ]
    for option in options():
        seed = option.value(PRESETS["seed"])
        choices = ", ".join(f"`{c}`" for c in option.spec.choices) if option.spec.choices else ""
        needs = ""
        if option.spec.applies:
            other = option_for(option.section, option.spec.applies[0])
            values = option.spec.applies[1]
            needs = f" Only with `{other.flag}" + ("" if values is None else " " + " or ".join(values)) + "`."
        resumable = " May change when resuming." if option.spec.resume else ""
        shown_seed = f"`{shown(seed)}`" if seed is not None else "(unset)"
        what = option.spec.help.replace("|", "\\|")
        rows.append(
            f"| `{option.flag}` | `{option.section}.{option.key}` | {shown_seed} | {choices} | "
            f"{what}.{needs}{resumable} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":  # python -m vaelab.cli.options > the table of docs/options.md
    print(markdown_table())
