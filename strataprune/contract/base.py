"""Plugin base class and the validation of a plugin's ``Config`` against recipe parameters."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from strataprune.contract.errors import ConfigError

if TYPE_CHECKING:  # torch loads with the first model or tensor, not with recipes and argument checks
    pass


@dataclass
class NoConfig:
    """A plugin without parameters."""


class Plugin:
    """Common base: identity and configuration."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    #: config keys whose values may be files or folders the plugin reads (an output may not overlap them)
    reads: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None, where: str | None = None) -> Plugin:
        return cls(build_config(cls.Config, params or {}, where or f"{cls.kind} '{cls.name}'"))

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}


# --------------------------------------------------------------------------- config building
def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _numeric_string(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


#: YAML 1.1 (PyYAML) reads 1e30 and 2E-4 as strings (its floats need a dot: 1.0e30); a float key takes them
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _numeric_string(value: Any) -> bool:
    return isinstance(value, str) and NUMBER.fullmatch(value.strip()) is not None


def _takes_float(hint: Any) -> bool:
    return hint is float or (typing.get_origin(hint) in (typing.Union, types.UnionType) and float in typing.get_args(hint))


def _convert(value: Any, hint: Any) -> Any:
    if hint is float and not isinstance(value, bool) and isinstance(value, (int, str)):
        return float(value)
    if _takes_float(hint) and _numeric_string(value):
        return float(value)
    return value


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def build_config(config_cls: type, params: Mapping[str, Any], where: str) -> Any:
    """Construct a Config dataclass from recipe parameters, with errors naming key, value and what is allowed."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: parameters must be a mapping, got {params!r}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for key, value in params.items():
        if key not in fields:
            allowed = ", ".join(fields) or "(no parameters)"
            from strataprune.contract.errors import did_you_mean

            raise ConfigError(f"{where}: unknown parameter '{key}'{did_you_mean(key, fields)}; allowed: {allowed}")
        hint = hints.get(key, Any)
        if not _type_ok(value, hint):
            raise ConfigError(f"{where}: {key}={value!r} must be {_describe(hint)}")
    try:
        return config_cls(**{k: _convert(v, hints.get(k, Any)) for k, v in params.items()})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
