"""Tiny random vision and multimodal models (transformers configs) for mechanics tests, and a saver that
writes each as a model folder (config, weights, preprocessor config, tokenizer where it has text)."""

from __future__ import annotations

from pathlib import Path

import torch

#: 32x32 images everywhere: a few patches per image keeps every forward in milliseconds
IMAGE = 32


def _clip_config(tokenizer):  # type: ignore[no-untyped-def]
    from transformers import CLIPConfig

    eos = tokenizer.eos_token_id
    return CLIPConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            eos_token_id=eos,
            pad_token_id=eos,
            bos_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=IMAGE, patch_size=8
        ),
        projection_dim=16,
    )


def tiny_vision_model(kind: str, seed: int = 0):  # type: ignore[no-untyped-def]
    """(model, tokenizer or None) of a tiny random config of ``kind``."""
    import transformers as T

    from strataprune.testing import byte_level_tokenizer

    torch.manual_seed(seed)
    vit = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=IMAGE, patch_size=8)
    labels = dict(num_labels=10, id2label={i: f"class{i}" for i in range(10)}, label2id={f"class{i}": i for i in range(10)})
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(**vit, **labels)).eval(), None
    if kind == "deit":
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**vit, **labels)).eval(), None
    if kind == "dinov2":
        return T.Dinov2Model(
            T.Dinov2Config(
                hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE, patch_size=8
            )
        ).eval(), None
    if kind == "swin":
        return T.SwinForImageClassification(
            T.SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, **labels)
        ).eval(), None
    if kind == "convnext":
        return T.ConvNextForImageClassification(
            T.ConvNextConfig(hidden_sizes=[16, 32], depths=[2, 2], num_stages=2, image_size=IMAGE, **labels)
        ).eval(), None
    tokenizer = byte_level_tokenizer()
    if kind == "clip":
        return T.CLIPModel(_clip_config(tokenizer)).eval(), tokenizer
    if kind == "llava":
        config = T.LlavaConfig(
            vision_config=T.CLIPVisionConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE, patch_size=8
            ),
            text_config=T.LlamaConfig(
                vocab_size=256,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
            ),
            image_token_index=250,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
        )
        return T.LlavaForConditionalGeneration(config).eval(), tokenizer
    raise KeyError(kind)


VISION_KINDS = ("vit", "deit", "dinov2", "swin", "convnext", "clip", "llava")
ADAPTER_OF = {
    "vit": "vit",
    "deit": "deit",
    "dinov2": "dinov2",
    "swin": "swin",
    "convnext": "convnext",
    "clip": "clip",
    "llava": "llava",
}


def save_tiny_vision_model(kind: str, folder: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_vision_model(kind, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
