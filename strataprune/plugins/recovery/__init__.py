"""Built-in recoveries, registered through the same hook as third-party ones.

losa (LoSA: rounds of pruning and sparsity-aware masked LoRA, docs/algorithms.md §6), lora (plain masked
LoRA after pruning, the comparison), masked-ft (full fine-tuning of the kept weights, mask kept exactly,
distilled from the dense model).
"""

from strataprune.contract.hookspecs import hookimpl


@hookimpl
def register_recoveries(register):  # type: ignore[no-untyped-def]
    from .lora import LoRA
    from .losa import LoSA
    from .masked_ft import MaskedFT

    for cls in (LoSA, LoRA, MaskedFT):
        register(cls)
