"""A setting is declared once, as a field of a config dataclass made with `setting(...)`: its type
(the annotation), default, help, choices, checks, and the setting it depends on. From that one
declaration come the config file's key (the field's name), the command-line option
(`--field-name`, built by `vaelab.cli.options`), its help, the checks `validate` runs, the
"has no effect without" refusals and which settings a resumed run may change.

Strict building from a dict (a config file, `config.json`) is here too: unknown keys and wrong
types are refused with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from vaelab.errors import ConfigError

Check = Callable[[Any], "str | None"]  # what is wrong with a value (without "option --x: "), or None


@dataclass(frozen=True)
class Spec:
    """What a field declares besides its type and default."""

    help: str
    option: str | None  # the command-line option without "--"; None: no option (set from the data)
    choices: tuple[Any, ...] | None
    metavar: str | None
    checks: tuple[Check, ...]
    # (field, values): it matters only when the field is one of the values (values None: when the
    # field is set at all, a non-empty list or a non-zero number)
    applies: tuple[str, tuple[Any, ...] | None] | None
    resume: bool  # a resumed run may change it (no saved state depends on it)


def setting(default: Any, help: str, *, option: str | None | bool = True, choices=None, metavar=None,
            checks: tuple[Check, ...] = (), applies=None, resume: bool = False) -> Any:
    """A dataclass field declaring a setting (see the module's docstring). `option=True`: the
    option is the field's name with dashes; a string names it; None: no option."""
    spec = Spec(help, option, tuple(choices) if choices else None, metavar, tuple(checks), applies, resume)
    return field(default=default, metadata={"vaelab": spec})


def declared(cls: type) -> list[tuple[dataclasses.Field, Spec]]:
    """The fields of a config dataclass that declare a setting, in order, with their declarations."""
    out = []
    for f in fields(cls):
        spec = f.metadata.get("vaelab")
        if spec is not None:
            option = f.name.replace("_", "-") if spec.option is True else spec.option
            out.append((f, dataclasses.replace(spec, option=option)))
    return out


def holds(value: Any, values: tuple[Any, ...] | None) -> bool:
    """Whether a setting's `applies` condition holds for the other field's value."""
    return bool(value) if values is None else value in values


def where(section: str, name: str, spec: Spec) -> str:
    """How messages name a setting: its option, or its config key when it has none."""
    return f"option --{spec.option}" if spec.option else f"{section}.{name}"


def check_settings(config: Any, section: str) -> None:
    """Run every declared check of `config`'s fields (None passes: an optional setting left unset)."""
    for f, spec in declared(type(config)):
        value = getattr(config, f.name)
        if value is None:
            continue
        for check in spec.checks:
            problem = check(value)
            if problem is not None:
                raise ConfigError(f"{where(section, f.name, spec)}: {problem}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(
                f"{where(section, f.name, spec)}: {value!r} is not one of {', '.join(map(str, spec.choices))}"
            )


# --- checks: each returns the message's text after "option --x: ", or None ------------------


def rule(ok: Callable[[Any], bool], message: str, show: Callable[[Any], Any] = lambda v: v) -> Check:
    """A check that `ok(value)` holds; `message` formats the shown value with `{}`."""
    return lambda value: None if ok(value) else message.format(show(value))


def at_least(low: int) -> Check:
    return rule(lambda v: v >= low, f"must be at least {low}, got {{}}")


def within(low, high, shown: str) -> Check:
    """low <= value <= high; `shown` is the range as messages write it ("[1, 1,000,000]")."""
    return rule(lambda v: low <= v <= high, f"must be in {shown}, got {{}}")


def sizes_within(low: int, high: int, shown: str) -> Check:
    """A non-empty list of sizes, each in [low, high]."""
    return rule(lambda v: bool(v) and all(low <= s <= high for s in v), f"sizes must be in {shown}, got {{}}",
                show=list)


positive_finite = rule(lambda v: math.isfinite(v) and v > 0, "must be a positive finite number, got {}")


# --- strict building from a dict -------------------------------------------------------------


def build(cls: type, d: dict[str, Any], where: str, key: str = "") -> Any:
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
        kwargs[name] = coerce(hints[name], value, where, _dotted(key, name))
    return cls(**kwargs)


def _dotted(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    """`value` as type `tp` (a dataclass, a tuple, an optional, bool, int, float or str), or a
    one-line ConfigError: JSON's and TOML's values, never converted from another kind."""
    origin = typing.get_origin(tp)
    at = f"{where}: {key}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: must be a table/object of keys, got {value!r}")
        return build(tp, value, where, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, where, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{at}: must be a list, got {value!r}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(coerce(item, v, where, key) for v in value)
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
