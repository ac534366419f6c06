"""Creating models by library and name for the command-line tools.

Every library's model comes wrapped as an :class:`ImageModel`: images in, one tensor
out (class logits where the model classifies, image embeddings otherwise), with the
evaluation transform of the model's own library. Token merging is applied to the
wrapped ``network`` (see :func:`unwrap`), since that is what the adapters know.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .adapters import EXTRAS

LIBRARIES = ("timm", "transformers", "torchvision", "open_clip")


class ImageModel(torch.nn.Module):
    """``network`` as a function of images alone, returning a tensor.

    ``num_classes`` is the number of classes of its output, or None when the output
    is an embedding; ``transform`` turns a PIL image into the model's input tensor."""

    def __init__(
        self,
        network: torch.nn.Module,
        output: Callable[[torch.nn.Module, Tensor], Tensor],
        transform: Optional[Callable] = None,
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        self.network = network
        self.output = output
        self.transform = transform
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.output(self.network, images)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model token merging applies to: the ``network`` of an :class:`ImageModel`."""
    return model.network if isinstance(model, ImageModel) else model


def load_model(library: str, name: str, checkpoint: Optional[str | Path] = None) -> ImageModel:
    """Model ``name`` of ``library`` in eval mode, with random weights or the weights of
    a local ``checkpoint`` (a file, or for transformers a folder written by
    ``save_pretrained``)."""
    loaders = {"timm": _timm, "transformers": _transformers, "torchvision": _torchvision, "open_clip": _open_clip}
    if library not in loaders:
        raise ValueError(f"unknown library {library!r}; known: {', '.join(LIBRARIES)}")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    _require(library)
    model = loaders[library](name, None if checkpoint is None else Path(checkpoint))
    return model.eval()


def _require(library: str) -> None:
    import importlib

    try:
        importlib.import_module(library)
    except ImportError as error:
        raise ValueError(f"{library} cannot be imported ({error}); install it with: pip install '{EXTRAS[library]}'") from None


# --- timm ----------------------------------------------------------------------------


def create_timm_model(name: str, checkpoint: Optional[str | Path] = None, **kwargs) -> torch.nn.Module:
    """A timm model in eval mode: random weights, or the weights in a local
    ``checkpoint`` file (safetensors or torch) loaded through timm's pretrained config;
    ``kwargs`` go to ``timm.create_model`` (``num_classes`` re-creates the classifier)."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise ValueError(f"timm has no model named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {checkpoint} does not fit model {name}: {error}") from None
    except TypeError as error:
        raise ValueError(f"timm cannot build {name} with {kwargs}: {error}") from None
    return model.eval()


def timm_transform(model: torch.nn.Module, is_training: bool = False):
    """The evaluation (or, ``is_training``, the augmenting training) transform from the
    model's own timm data config, as timm's users build it, at the size the model was
    built for (which can differ from its pretrained config's, e.g. a model made with
    img_size=112)."""
    import timm

    embed = getattr(model, "patch_embed", None)
    override = {"input_size": (3, *embed.img_size)} if embed is not None else {}
    return timm.data.create_transform(**timm.data.resolve_data_config(override, model=model), is_training=is_training)


def _call(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network(images)


def _timm(name: str, checkpoint: Optional[Path]) -> ImageModel:
    network = create_timm_model(name, checkpoint)
    return ImageModel(network, _call, timm_transform(network), network.num_classes or None)


# --- transformers --------------------------------------------------------------------


def _logits(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network(pixel_values=images).logits


def _image_features(network: torch.nn.Module, images: Tensor) -> Tensor:
    features = network.get_image_features(pixel_values=images)
    return features if isinstance(features, Tensor) else features.pooler_output


def _pooled(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network(pixel_values=images).pooler_output


def _transformers(name: str, checkpoint: Optional[Path]) -> ImageModel:
    """A transformers model from a local folder (``--checkpoint``, or ``name`` itself),
    or from the local Hugging Face cache; random weights need only its config."""
    import transformers

    source = str(checkpoint or name)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"cannot find transformers model {source!r} ({error}); give --checkpoint DIR, a folder written by "
            "save_pretrained (config.json and weights)"
        ) from None
    architecture = (config.architectures or [""])[0]
    classifier = architecture.endswith("ImageClassification") or architecture.endswith("ImageClassificationWithTeacher")
    auto = transformers.AutoModelForImageClassification if classifier else transformers.AutoModel
    try:
        network = auto.from_pretrained(source) if checkpoint or Path(name).is_dir() else auto.from_config(config)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"cannot load transformers model {source!r}: {error}") from None
    if classifier:
        output, num_classes = _logits, network.config.num_labels
    else:
        output = _image_features if hasattr(network, "get_image_features") else _pooled
        num_classes = None
    return ImageModel(network, output, _transformers_transform(source, network), num_classes)


def _transformers_transform(source: str, network: torch.nn.Module) -> Optional[Callable]:
    """The model's own image processor as a PIL image -> tensor function, if its folder has one."""
    import transformers

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    return transform


# --- torchvision ---------------------------------------------------------------------


def _torchvision(name: str, checkpoint: Optional[Path]) -> ImageModel:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = [model for model in known if model.startswith(name.split("_")[0])][:8]
        raise ValueError(f"torchvision has no model named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    network = torchvision.models.get_model(name, weights=None)
    if checkpoint is not None:
        try:
            network.load_state_dict(_read_state_dict(checkpoint))
        except RuntimeError as error:
            raise ValueError(f"checkpoint {checkpoint} does not fit model {name}: {error}") from None
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return ImageModel(network, _call, transform, getattr(network.heads, "head", network.heads[-1]).out_features)


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


# --- open_clip -----------------------------------------------------------------------


def _encode_image(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network.encode_image(images)


def _open_clip(name: str, checkpoint: Optional[Path]) -> ImageModel:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model named {name!r}; see open_clip.list_models()")
    try:
        network, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=str(checkpoint) if checkpoint else None
        )
    except RuntimeError as error:
        raise ValueError(f"checkpoint {checkpoint} does not fit model {name}: {error}") from None
    return ImageModel(network, _encode_image, transform)


def with_zero_shot_head(
    model: ImageModel, name: str, classnames: Sequence[str], template: str = "a photo of a {}."
) -> ImageModel:
    """The open_clip model ``name`` as a zero-shot classifier over ``classnames``: scaled
    cosine similarities of its image embeddings to the embeddings of one prompt per class."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model.network, tokenizer, classnames, [template.format], device=next(model.network.parameters()).device
        )
    scale = model.network.logit_scale.exp().item()

    def logits(network: torch.nn.Module, images: Tensor) -> Tensor:
        features = torch.nn.functional.normalize(network.encode_image(images), dim=-1)
        return scale * features @ weights.to(features)

    return ImageModel(model.network, logits, model.transform, len(classnames))
