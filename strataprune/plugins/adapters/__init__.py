"""Built-in model adapters, registered through the same hook as third-party ones."""

from strataprune.core.hookspecs import hookimpl


@hookimpl
def register_model_adapters(register):  # type: ignore[no-untyped-def]
    from .decoder_llm import DecoderLLM

    register(DecoderLLM)
