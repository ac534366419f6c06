"""Creating models by name for the command-line tools."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


def create_timm_model(name: str, checkpoint: Optional[str | Path] = None) -> torch.nn.Module:
    """A timm model in eval mode: random weights, or the weights in a local
    ``checkpoint`` file (safetensors or torch) loaded through timm's pretrained config."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"timm has no model named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if checkpoint is None:
        return timm.create_model(name).eval()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    except RuntimeError as error:
        raise ValueError(f"checkpoint {checkpoint} does not fit model {name}: {error}") from None
    return model.eval()


def timm_transform(model: torch.nn.Module):
    """The evaluation transform from the model's own timm data config (resize, crop,
    normalisation), as timm's users build it, at the size the model was built for
    (which can differ from its pretrained config's, e.g. a model made with img_size=112)."""
    import timm

    size = tuple(model.patch_embed.img_size)
    return timm.data.create_transform(**timm.data.resolve_data_config({"input_size": (3, *size)}, model=model))
