"""A timm ViT as a Hugging Face transformers model, to merge and evaluate it there:

    import timm
    from tokenmerge.tools.conversion import transformers_from_timm

    vit = timm.create_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", pretrained=True,
                            pretrained_cfg_overlay=dict(file="vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"))
    model, processor = transformers_from_timm(vit)
    model.save_pretrained("vit-tiny-hf")
    processor.save_pretrained("vit-tiny-hf")   # then: tokenmerge eval --library transformers --model vit-tiny-hf

The weights map one to one onto ``ViTForImageClassification``, so its logits are timm's
to float rounding on the same input tensors. The image processor uses timm's mean, std
and input size; it resizes the whole image to that size where timm resizes and
crops the centre (``crop_pct``), so on image files the two preprocess slightly
differently.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: What the conversion maps: timm's ``VisionTransformer`` with a class token, pre-norm
#: blocks of ``Attention`` and a GELU ``Mlp``, no LayerScale, no registers.
SUPPORTED = ("a timm VisionTransformer with a class token, no registers, no LayerScale, qkv biases, a classifier and "
             "token pooling")


def transformers_from_timm(vit: torch.nn.Module) -> tuple[Any, Any]:
    """``(ViTForImageClassification, ViTImageProcessor)`` computing what the timm ViT
    ``vit`` computes, in eval mode.

    Raises:
        ValueError: ``vit`` is not :data:`SUPPORTED`.
    """
    import transformers

    check_convertible(vit)
    config = transformers.ViTConfig(
        hidden_size=vit.embed_dim, num_hidden_layers=len(vit.blocks), num_attention_heads=vit.blocks[0].attn.num_heads,
        intermediate_size=vit.blocks[0].mlp.fc1.out_features, image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0], layer_norm_eps=vit.norm.eps, num_labels=vit.num_classes,
        hidden_act="gelu",
    )
    model = transformers.ViTForImageClassification(config).eval()
    model.load_state_dict(transformers_state(vit.state_dict(), len(vit.blocks)))
    data = vit.pretrained_cfg
    height, width = vit.patch_embed.img_size
    processor = transformers.ViTImageProcessor(
        size={"height": height, "width": width}, image_mean=list(data.get("mean", (0.5,) * 3)),
        image_std=list(data.get("std", (0.5,) * 3)), resample=3 if data.get("interpolation") == "bicubic" else 2,
    )
    return model, processor


def check_convertible(vit: torch.nn.Module) -> None:
    from timm.models.vision_transformer import VisionTransformer

    problems = []
    if type(vit) is not VisionTransformer:
        problems.append(f"it is a {type(vit).__name__}")
    else:
        if vit.cls_token is None or vit.num_prefix_tokens != 1:
            problems.append("it has no class token or has register tokens")
        if vit.global_pool != "token":
            problems.append(f"it pools {vit.global_pool!r}")
        if any(type(block.ls1).__name__ != "Identity" for block in vit.blocks):
            problems.append("it has LayerScale")
        if vit.num_classes == 0:
            problems.append("it has no classifier")
        if any(block.attn.qkv.bias is None for block in vit.blocks):
            problems.append("its attention has no query, key and value biases")
    if problems:
        raise ValueError(f"cannot map this model onto ViTForImageClassification: {'; '.join(problems)}. "
                         f"Supported: {SUPPORTED}")


def transformers_state(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """timm ViT weights under transformers' ViTForImageClassification key names."""
    mapped = {
        "vit.embeddings.cls_token": state["cls_token"],
        "vit.embeddings.position_embeddings": state["pos_embed"],
        "vit.embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "vit.embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "vit.layernorm.weight": state["norm.weight"],
        "vit.layernorm.bias": state["norm.bias"],
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"vit.layers.{i}."
        qkv_weight, qkv_bias = state[block + "attn.qkv.weight"], state[block + "attn.qkv.bias"]
        for part, weight, bias in zip(("q", "k", "v"), qkv_weight.chunk(3), qkv_bias.chunk(3)):
            mapped[f"{layer}attention.{part}_proj.weight"] = weight
            mapped[f"{layer}attention.{part}_proj.bias"] = bias
        for timm_name, hf_name in [("attn.proj", "attention.o_proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                                   ("norm1", "layernorm_before"), ("norm2", "layernorm_after")]:
            for field in ("weight", "bias"):
                mapped[f"{layer}{hf_name}.{field}"] = state[f"{block}{timm_name}.{field}"]
    return mapped
