"""Built-in allocators, registered through the same hook as third-party ones."""

from strataprune.core.hookspecs import hookimpl


@hookimpl
def register_allocators(register):  # type: ignore[no-untyped-def]
    from .uniform import Uniform

    register(Uniform)
