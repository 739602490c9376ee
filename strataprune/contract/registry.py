"""One pluggy registry for every kind of plugin, built-ins included.

Plugins are found through the entry-point group ``strataprune``; our own pyproject lists the
built-ins there exactly as a third party would. Each plugin's hooks are called one plugin at a
time, so a broken plugin (import error, failing hook, invalid registration) costs one warning
naming it, and everything else keeps working.

Environment:
- ``STRATAPRUNE_LOAD_PLUGINS=a,b``: load only these external plugins (entry-point or
  distribution names); set but empty loads none. Built-ins always load.
- ``STRATAPRUNE_BLOCK_PLUGINS=a,b``: never load these external plugins.
"""

from __future__ import annotations

import importlib
import os
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

import pluggy

from strataprune.contract import hookspecs
from strataprune.contract.adapter import ModelAdapter
from strataprune.contract.allocator import Allocator
from strataprune.contract.backend import Backend
from strataprune.contract.base import Plugin
from strataprune.contract.dataset import Dataset
from strataprune.contract.errors import PluginError, did_you_mean, unknown
from strataprune.contract.pruner import Pruner
from strataprune.contract.recovery import Recovery

GROUP = "strataprune"
OWN_DISTRIBUTION = "strataprune"
#: the built-in plugin modules, listed in our pyproject under [project.entry-points.strataprune]
BUILTIN_MODULES = {
    "allocators": "strataprune.plugins.allocators",
    "pruners": "strataprune.plugins.pruners",
    "adapters": "strataprune.plugins.adapters",
    "datasets": "strataprune.plugins.datasets",
    "backends": "strataprune.plugins.backends",
    "recovery": "strataprune.plugins.recovery",
}

#: kind -> (hook name, base class, methods a registered class must define)
KINDS: dict[str, tuple[str, type[Plugin], tuple[str, ...]]] = {
    "allocator": ("register_allocators", Allocator, ("allocate",)),
    "pruner": ("register_pruners", Pruner, ("prune",)),
    "adapter": ("register_model_adapters", ModelAdapter, ("matches", "load", "blocks", "prunable", "capture", "run_block")),
    "dataset": ("register_datasets", Dataset, ("documents",)),
    "backend": ("register_backends", Backend, ("prepare",)),
    "recovery": ("register_recoveries", Recovery, ("recover",)),
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")
#: backends may name a sparsity pattern, e.g. "torch-2:4"
_BACKEND_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*(:[0-9]+)?$")
SPEC_NAMES = tuple(name for name in dir(hookspecs) if name.startswith("register_"))


class PluginLoadWarning(UserWarning):
    """A plugin could not be loaded or registered and was skipped."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    kind: str
    cls: type[Plugin]
    provided_by: str  # the distribution (package) that ships it
    entry_point: str
    version: str

    def as_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "kind": self.kind,
            "provided_by": self.provided_by,
            "entry_point": self.entry_point,
            "version": self.version,
            "summary": getattr(self.cls, "summary", ""),
        }


def _env_list(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


class Registry:
    """All registered plugins, by kind and name."""

    def __init__(self, entry_point_list: list[EntryPoint] | None = None) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._plugins: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        self.skipped: list[tuple[str, str]] = []  # (plugin, reason)
        eps = list(entry_points(group=GROUP)) if entry_point_list is None else entry_point_list
        if not any(_dist_name(ep) == OWN_DISTRIBUTION for ep in eps) and entry_point_list is None:
            # running from a source tree that was never installed: load the built-ins directly
            eps = [EntryPoint(name, module, GROUP) for name, module in BUILTIN_MODULES.items()] + eps
        self._load(eps)

    # ------------------------------------------------------------------ loading
    def _load(self, eps: list[EntryPoint]) -> None:
        allow, block = _env_list("STRATAPRUNE_LOAD_PLUGINS"), _env_list("STRATAPRUNE_BLOCK_PLUGINS")
        seen: set[str] = set()
        for ep in sorted(eps, key=lambda e: (_dist_name(e) != OWN_DISTRIBUTION, e.name)):
            dist = _dist_name(ep)
            builtin = dist == OWN_DISTRIBUTION
            if not builtin:
                names = {ep.name, dist}
                if allow is not None and not names & allow:
                    continue
                if block and names & block:
                    continue
            label = f"{dist}:{ep.name}"
            if label in seen:
                continue
            seen.add(label)
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure of a third-party plugin
                self._skip(label, f"import failed: {type(exc).__name__}: {exc}")
                continue
            unknown_hooks = _unknown_hooks(module)
            if unknown_hooks:
                hint = did_you_mean(unknown_hooks[0], SPEC_NAMES)
                self._skip(label, f"unknown hook '{unknown_hooks[0]}'{hint}; hooks: {', '.join(SPEC_NAMES)}")
                continue
            try:
                self.pm.register(module, name=label)
            except Exception as exc:  # noqa: BLE001 - pluggy validation of hook names/signatures
                self._skip(label, f"invalid hooks: {exc}")
                continue
            self._call_hooks(label, module, dist, ep.name, builtin)

    def _call_hooks(self, label: str, module: Any, dist: str, ep_name: str, builtin: bool) -> None:
        staged: list[PluginInfo] = []
        for kind, (hook_name, _base, _methods) in KINDS.items():
            impls = [i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin is module]
            for impl in impls:

                def register(cls: Any, *, _kind: str = kind) -> None:
                    staged.append(self._validate(_kind, cls, label, dist, ep_name, staged))

                try:
                    impl.function(register=register)
                except Exception as exc:  # noqa: BLE001 - a plugin's hook may fail in any way
                    if builtin:
                        raise
                    self._skip(label, f"{hook_name} failed: {type(exc).__name__}: {exc}")
                    self.pm.unregister(module)
                    return
        for info in staged:
            self._plugins[info.kind][info.name] = info

    def _validate(self, kind: str, cls: Any, label: str, dist: str, ep_name: str, staged: list[PluginInfo]) -> PluginInfo:
        _hook, base, methods = KINDS[kind]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"register() got {cls!r}; a {kind} must be a subclass of strataprune.{base.__name__}")
        name = getattr(cls, "name", "")
        if not isinstance(name, str) or not (_BACKEND_NAME_RE if kind == "backend" else _NAME_RE).match(name):
            raise PluginError(f"{cls.__name__}.name={name!r} must be a lower-case identifier like 'my_method'")
        for method in methods:
            if getattr(cls, method, None) is getattr(base, method, None):
                raise PluginError(f"{kind} '{name}' ({cls.__name__}) does not implement {method}()")
        if name in self._plugins[kind] or any(i.kind == kind and i.name == name for i in staged):
            owner = self._plugins[kind][name].provided_by if name in self._plugins[kind] else dist
            raise PluginError(f"{kind} name '{name}' is already registered by {owner}")
        version = getattr(cls, "version", None) or _dist_version(dist)
        return PluginInfo(name, kind, cls, dist, ep_name, str(version))

    def add(self, kind: str, cls: type[Plugin], provided_by: str = "local") -> PluginInfo:
        """Register a class directly, validated as a hook registration is (contract checks of unpublished plugins)."""
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind '{kind}'; kinds: {', '.join(KINDS)}")
        info = self._validate(kind, cls, f"{provided_by}:{getattr(cls, '__name__', cls)}", provided_by, "direct", [])
        self._plugins[kind][info.name] = info
        return info

    def _skip(self, label: str, reason: str) -> None:
        self.skipped.append((label, reason))
        warnings.warn(f"strataprune plugin '{label}' skipped: {reason}", PluginLoadWarning, stacklevel=3)

    # ------------------------------------------------------------------ queries
    def names(self, kind: str) -> list[str]:
        return sorted(self._plugins[kind])

    def info(self, kind: str, name: str) -> PluginInfo:
        if kind not in self._plugins:
            raise PluginError(f"unknown plugin kind '{kind}'; kinds: {', '.join(KINDS)}")
        try:
            return self._plugins[kind][name]
        except KeyError:
            raise unknown(kind, name, self._plugins[kind]) from None

    def get(self, kind: str, name: str) -> type[Plugin]:
        return self.info(kind, name).cls

    def create(self, kind: str, name: str, params: dict[str, Any] | None = None, where: str | None = None) -> Any:
        return self.get(kind, name).from_params(params or {}, where=where or f"{kind} '{name}'")

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for _, info in sorted(self._plugins[kind].items())]

    def find(self, kind: str, predicate: Callable[[type[Plugin]], bool]) -> list[PluginInfo]:
        return [info for info in self._plugins[kind].values() if predicate(info.cls)]


def _unknown_hooks(module: Any) -> list[str]:
    """Hook implementations whose name no hookspec has (pluggy would accept them silently)."""
    marker = f"{GROUP}_impl"
    return [
        name for name in dir(module) if getattr(getattr(module, name, None), marker, None) is not None and name not in SPEC_NAMES
    ]


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is not None:
        return dist.metadata["Name"] or dist.name
    return OWN_DISTRIBUTION if ep.value.startswith("strataprune.") else ep.value.split(".")[0]


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "0"


_registry: Registry | None = None


def get_registry(reload: bool = False) -> Registry:
    """The process-wide registry, built on first use (so ``import strataprune`` stays lean)."""
    global _registry
    if _registry is None or reload:
        _registry = Registry()
    return _registry
