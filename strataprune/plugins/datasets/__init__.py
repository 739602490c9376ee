"""Built-in text sources, registered through the same hook as third-party ones."""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_datasets(register):  # type: ignore[no-untyped-def]
    from .bbc import BBCNews
    from .hub import C4, WikiText2

    register(BBCNews)
    register(WikiText2)
    register(C4)
