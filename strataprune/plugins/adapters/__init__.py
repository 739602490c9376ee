"""Built-in model adapters, registered through the same hook as third-party ones."""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_model_adapters(register):  # type: ignore[no-untyped-def]
    from .clip import CLIP
    from .convnext import ConvNeXt
    from .decoder_llm import DecoderLLM
    from .deit import DeiT
    from .dinov2 import DINOv2
    from .efficientnet_lite import EfficientNetLite
    from .llava import LLaVA
    from .swin import Swin
    from .vit import ViT

    for adapter in (DecoderLLM, ViT, DeiT, DINOv2, Swin, ConvNeXt, EfficientNetLite, CLIP, LLaVA):
        register(adapter)
