"""The hooks a strataprune plugin can implement. Read this file to write a plugin.

A plugin is a module (or object) exposed through the entry-point group ``strataprune``::

    [project.entry-points.strataprune]
    my_plugin = "my_package.plugin"

that implements one or more of the hooks below, each receiving a ``register`` callable::

    from strataprune import hookimpl

    @hookimpl
    def register_allocators(register):
        register(MyAllocator)          # a subclass of strataprune.Allocator

``register`` validates what it gets (a subclass of the kind's base class, a unique lower-case
``name``, the required methods); a plugin that fails to import or to register is skipped with
one warning naming it. Built-in methods register through these same hooks.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("strataprune")
hookimpl = pluggy.HookimplMarker("strataprune")


@hookspec
def register_allocators(register):  # type: ignore[no-untyped-def]
    """Register layer-wise sparsity allocators: ``register(cls)`` with cls a subclass of
    ``strataprune.Allocator``. Since 0.1."""


@hookspec
def register_pruners(register):  # type: ignore[no-untyped-def]
    """Register pruners: ``register(cls)`` with cls a subclass of ``strataprune.Pruner``. Since 0.1."""


@hookspec
def register_model_adapters(register):  # type: ignore[no-untyped-def]
    """Register model adapters: ``register(cls)`` with cls a subclass of ``strataprune.ModelAdapter``.
    Since 0.1."""


@hookspec
def register_datasets(register):  # type: ignore[no-untyped-def]
    """Register named text sources: ``register(cls)`` with cls a subclass of ``strataprune.Dataset``.
    Since 0.1."""


@hookspec
def register_backends(register):  # type: ignore[no-untyped-def]
    """Register inference backends: ``register(cls)`` with cls a subclass of ``strataprune.Backend``.
    Since 0.1; the Backend contract is versioned on its own (``strataprune.contract.backend.BACKEND_CONTRACT``)."""


@hookspec
def register_recoveries(register):  # type: ignore[no-untyped-def]
    """Register accuracy recoveries (fine-tuning after or between pruning, e.g. LoSA, LoRA):
    ``register(cls)`` with cls a subclass of ``strataprune.Recovery``. Since 0.1."""
