"""Errors a user can act on. The CLI prints these as one line, never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class StrataPruneError(Exception):
    """Base class of every error caused by input (recipe, flags, files, plugins)."""


class ConfigError(StrataPruneError):
    """A recipe key, CLI flag or plugin parameter has a bad value."""


class UnknownPluginError(ConfigError):
    """A plugin name that no registered plugin has."""


class PluginError(StrataPruneError):
    """A plugin broke its contract (bad registration, bad allocation, wrong mask ...)."""


class DataError(StrataPruneError):
    """A model or data source cannot be found, read or downloaded."""


class OutputError(StrataPruneError):
    """An output folder cannot be written, is not ours to replace, or is being written by another run."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown(what: str, name: str, choices: Iterable[str]) -> UnknownPluginError:
    choices = sorted(choices)
    return UnknownPluginError(
        f"unknown {what} '{name}'{did_you_mean(name, choices)}; available: {', '.join(choices) or '(none)'}"
    )


def require(ok: bool, key: str, value: Any, allowed: str, *, where: str) -> None:
    """Raise a ConfigError naming ``where``, the key, the bad value and what is allowed, unless ``ok``.

    Plugins bind ``where`` once: ``_require = functools.partial(require, where="allocator 'owl'")``.
    """
    if not ok:
        raise ConfigError(f"{where}: {key}={value!r} is invalid; allowed: {allowed}")
