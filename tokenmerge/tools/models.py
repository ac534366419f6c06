"""Creating models by library and name for the command-line tools.

Every library's model comes wrapped as an :class:`ImageModel`: images in, one tensor
out (class logits where the model classifies, image embeddings otherwise), with the
evaluation transform of the model's own library. Video and audio models (transformers'
VideoMAE and AST) come wrapped the same way, their inputs a video or a spectrogram
(``input_shape``) and without a transform: the commands that read image files refuse
them (:func:`require_images`), ``bench`` and ``export`` feed them random inputs. Token merging is applied to the
wrapped ``network`` (see :func:`unwrap`), since that is what the adapters know.

Every problem with a model or its weights is found here, before any image is
decoded, and named in one line: an unknown model, a library that is not installed,
a checkpoint that is missing, a folder, truncated, not a weights file, holding
pickled objects other than tensors, or not fitting the model.
"""
from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from tokenmerge.adapters import find_adapter
from tokenmerge.libraries import LIBRARIES, install_command, library
from tokenmerge.reading import check_file

from .messages import error_summary


class ImageModel(torch.nn.Module):
    """``network`` as a function of images alone, returning a tensor.

    ``num_classes`` is the number of classes of its output, or None when the output
    is an embedding; ``transform`` turns a PIL image into the model's input tensor;
    ``weights`` says where its weights came from (None: random); ``input_shape`` is
    the shape of one input where it is not an image (a video: frames, channels,
    height, width; a spectrogram: time, frequency), with ``input_kind`` naming it."""

    def __init__(
        self,
        network: torch.nn.Module,
        output: Callable[[torch.nn.Module, Tensor], Tensor],
        transform: Optional[Callable] = None,
        num_classes: Optional[int] = None,
        weights: Optional[str] = None,
        input_shape: Optional[tuple[int, ...]] = None,
        input_kind: str = "image",
    ):
        super().__init__()
        self.network = network
        self.output = output
        self.transform = transform
        self.num_classes = num_classes
        self.weights = weights
        self.input_shape = input_shape
        self.input_kind = input_kind

    def forward(self, images: Tensor) -> Tensor:
        return self.output(self.network, images)


def describe_preprocessing(model: torch.nn.Module) -> str:
    """How an input file becomes what ``model`` takes, in one line: its transform's
    steps (timm's, torchvision's or open_clip's) or its image processor's settings."""
    transform = getattr(model, "transform", None)
    if transform is None:
        kind = getattr(model, "input_kind", "image")
        return f"none here: the input is the {kind} tensor itself, prepared as the model's library prepares it"
    if hasattr(transform, "description"):
        return transform.description
    steps = getattr(transform, "transforms", [transform])
    return ", ".join(re.sub(r"\(\s+|\s+\)", lambda match: match.group().strip(), " ".join(repr(step).split()))
                     for step in steps)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model token merging applies to: the ``network`` of an :class:`ImageModel`."""
    return model.network if isinstance(model, ImageModel) else model


def sample_shape(model: torch.nn.Module, img_size: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
    """The shape of one input of ``model``: its video or spectrogram shape, or an RGB
    image of ``img_size`` (default: the size the model is built for)."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(shape)
    network = unwrap(model)
    return (3, *(img_size or find_adapter(network).input_size(network)))


def takes_images(model: torch.nn.Module) -> bool:
    return getattr(model, "input_shape", None) is None


def require_images(model: torch.nn.Module, command: str) -> None:
    """A one-line error for a video or audio model given to a command that reads images."""
    if not takes_images(model):
        kind = getattr(model, "input_kind", "non-image")
        raise ValueError(f"tokenmerge {command} reads image files, and this model takes {kind} inputs; "
                         "tokenmerge bench and tokenmerge export take it (with random inputs)")


def load_model(
    library_name: str,
    name: str,
    checkpoint: Optional[str | Path] = None,
    *,
    num_classes: Optional[int] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    img_size: Optional[tuple[int, int]] = None,
) -> ImageModel:
    """Model ``name`` of ``library_name`` in eval mode, with random weights or the
    weights of a local ``checkpoint`` (a file, or for transformers a folder written
    by ``save_pretrained``), a classifier of ``num_classes`` if given, built with
    ``model_kwargs`` (and, timm, for inputs of ``img_size``); an error naming the
    problem if tokenmerge cannot merge its tokens."""
    entry = library(library_name)
    if checkpoint is not None:
        checkpoint = check_checkpoint_path(Path(checkpoint), folder=library_name == "transformers")
    _require(library_name)
    module, function = entry.loader.split(":")
    loader = getattr(importlib.import_module(module), function)
    model = loader(name, checkpoint, num_classes, dict(model_kwargs or {}), img_size)
    if checkpoint is not None:
        model.weights = str(checkpoint)
    try:
        find_adapter(model.network).check(model.network)
    except TypeError as error:
        raise ValueError(str(error)) from None
    return model.eval()


def _require(library_name: str) -> None:
    try:
        importlib.import_module(library_name)
    except ImportError as error:
        extra = LIBRARIES[library_name].extra
        raise ValueError(f"{library_name} cannot be imported ({error}); install it with: "
                         f"{install_command(extra)}") from None


# --- checkpoints -----------------------------------------------------------------


def check_checkpoint_path(path: Path, folder: bool = False) -> Path:
    """``path`` if it is what a checkpoint must be: with ``folder`` a folder, otherwise
    a file, checked as every file a user names is (:func:`tokenmerge.reading.check_file`)."""
    if folder and not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if folder and not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file; give the folder save_pretrained wrote "
                         "(config.json and weights)")
    if not folder and path.is_dir():
        inside = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pt*")) or sorted(path.glob("*.bin"))
        hint = f", such as {inside[0]}" if inside else ""
        raise ValueError(f"checkpoint {path} is a folder; give the weights file in it{hint}")
    return path if folder else check_file(path, "checkpoint", "give the path of a weights file")


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or torch weights file, unpickling nothing but
    tensors; a one-line error naming the file and what is wrong with it."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(f"checkpoint {path} is not a readable safetensors file ({error}); it may be truncated "
                             "or corrupt: write or download it again") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(error)
        if "global" not in reason.lower():  # bytes the unpickler could not read, not an object it refused
            raise ValueError(f"checkpoint {path} is not a readable torch weights file ({reason}); it may be "
                             "truncated or corrupt") from None
        raise ValueError(f"checkpoint {path} holds pickled objects other than tensors, which tokenmerge does not "
                         f"load ({reason}); if you trust the file, load it in Python and save its state_dict "
                         "(safetensors is safest)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ValueError(f"checkpoint {path} is not a readable torch weights file ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no detail'}); it may be "
                         "truncated or corrupt") from None
    if isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
        raise ValueError(f"checkpoint {path} is not a state dict of tensors")
    return state


def _unpickling_reason(error: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, in one sentence: the line naming
    the global or operand it met (without the terminal colour codes torch adds)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    line = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "no detail")
    return line.split(". ")[0].rstrip(".")


def _does_not_fit(path: Path, name: str, error: Exception, classes: Optional[int] = None) -> ValueError:
    hint = f"; its classifier has {classes} classes: give --num-classes {classes}" if classes else ""
    return ValueError(f"checkpoint {path} does not fit model {name}{hint} ({error_summary(error)})")


def _classifier_classes(weights: dict[str, Tensor], key: Optional[str], num_classes: Optional[int]) -> Optional[int]:
    """The classes of the classifier ``key`` in ``weights`` when they differ from ``num_classes``."""
    tensor = weights.get(f"{key}.weight") if key else None
    if tensor is None or tensor.ndim != 2 or tensor.shape[0] == num_classes:
        return None
    return int(tensor.shape[0])


# --- timm ----------------------------------------------------------------------------


def create_timm_model(name: str, checkpoint: Optional[str | Path] = None, **kwargs) -> torch.nn.Module:
    """A timm model in eval mode: random weights, or the weights in a local
    ``checkpoint`` file (safetensors or torch) loaded through timm's pretrained
    config, as timm's users load local weights; ``kwargs`` go to
    ``timm.create_model`` (``num_classes`` re-creates the classifier)."""
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = similar_timm_names(name.split(".")[0])
        raise ValueError(f"timm has no model named {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    weights, cfg = None, timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(name.split(".")[0])
    key = getattr(cfg, "classifier", None) if cfg is not None else None
    wanted = kwargs.get("num_classes", getattr(cfg, "num_classes", None) if cfg is not None else None)
    if checkpoint is not None:
        checkpoint = check_checkpoint_path(Path(checkpoint))
        weights = read_weights(checkpoint)
        overlay = dict(file=str(checkpoint))
        if key and f"{key}.weight" in weights and weights[f"{key}.weight"].shape[0] == wanted:
            overlay["num_classes"] = wanted  # a classifier of the classes asked for is kept, not re-created
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as error:
        raise _does_not_fit(checkpoint, name, error, _classifier_classes(weights or {}, key, wanted)) from None
    except (TypeError, AssertionError) as error:
        shown = {key: value for key, value in kwargs.items() if key not in ("pretrained", "pretrained_cfg_overlay")}
        raise ValueError(f"timm cannot build {name} with {shown}: {error}") from None
    return model.eval()


def similar_timm_names(name: str, count: int = 8) -> list[str]:
    """timm's model names closest to ``name``: those it begins (``vit_tiny_patch16`` ->
    ``vit_tiny_patch16_224``, ``vit_tiny_patch16_384``), else the closest spellings."""
    import difflib

    import timm

    names = timm.list_models()
    starting = [candidate for candidate in names if candidate.startswith(name)]
    if starting:
        return sorted(starting, key=len)[:count]
    return difflib.get_close_matches(name, names, n=count, cutoff=0.6)


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


def timm_model(name: str, checkpoint: Optional[Path], num_classes: Optional[int], kwargs: dict[str, Any],
               img_size: Optional[tuple[int, int]]) -> ImageModel:
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    network = create_timm_model(name, checkpoint, **kwargs)
    return ImageModel(network, _call, timm_transform(network), network.num_classes or None)


def _no_img_size(library_name: str, img_size: Optional[tuple[int, int]], option: str) -> None:
    if img_size is not None:
        raise ValueError(f"--img-size builds timm models for an input size; for a {library_name} model give "
                         f"{option} through --model-kwargs")


# --- transformers --------------------------------------------------------------------


def _logits(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network(pixel_values=images).logits


def _audio_logits(network: torch.nn.Module, spectrograms: Tensor) -> Tensor:
    return network(input_values=spectrograms).logits


def _audio_pooled(network: torch.nn.Module, spectrograms: Tensor) -> Tensor:
    return network(input_values=spectrograms).pooler_output


def _video_features(network: torch.nn.Module, videos: Tensor) -> Tensor:
    """VideoMAEModel's tokens (it has no pooler), averaged as its classifier averages them."""
    return network(pixel_values=videos).last_hidden_state.mean(dim=1)


#: transformers model types whose inputs are not images: (input kind, input shape from the config).
_NOT_IMAGES: dict[str, tuple[str, Callable[[Any], tuple[int, ...]]]] = {
    "videomae": ("video", lambda c: (c.num_frames, c.num_channels, c.image_size, c.image_size)),
    "audio-spectrogram-transformer": ("spectrogram", lambda c: (c.max_length, c.num_mel_bins)),
}


def _image_features(network: torch.nn.Module, images: Tensor) -> Tensor:
    features = network.get_image_features(pixel_values=images)
    return features if isinstance(features, Tensor) else features.pooler_output


def _pooled(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network(pixel_values=images).pooler_output


def transformers_model(name: str, checkpoint: Optional[Path], num_classes: Optional[int], kwargs: dict[str, Any],
                       img_size: Optional[tuple[int, int]]) -> ImageModel:
    """A transformers model from a local folder (``--checkpoint``, or ``name`` itself),
    or from the local Hugging Face cache; random weights need only its config.
    ``kwargs`` override values of its config."""
    import transformers

    _no_img_size("transformers", img_size, "image_size=...")
    source = str(checkpoint or name)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot find transformers model {source!r} ({str(error).splitlines()[0]}); give --checkpoint DIR, a "
            "folder written by save_pretrained (config.json and weights)"
        ) from None
    architecture = (config.architectures or [""])[0]
    kind, shape_of = _NOT_IMAGES.get(config.model_type, ("image", None))
    classifier = architecture.endswith(("ImageClassification", "ImageClassificationWithTeacher",
                                        "VideoClassification", "AudioClassification"))
    if num_classes is not None and (not classifier or num_classes != config.num_labels):
        has = f"{config.num_labels} classes" if classifier else "no classifier"
        raise ValueError(f"--num-classes {num_classes}: the transformers model {source} has {has}")
    autos = {"image": transformers.AutoModelForImageClassification,
             "video": transformers.AutoModelForVideoClassification,
             "spectrogram": transformers.AutoModelForAudioClassification}
    auto = autos[kind] if classifier else transformers.AutoModel
    weights = checkpoint is not None or Path(name).is_dir()
    try:
        network = auto.from_pretrained(source, config=config) if weights else auto.from_config(config)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        refused = next((cause for cause in (error, error.__cause__, error.__context__)
                        if isinstance(cause, pickle.UnpicklingError)), None)
        if refused is not None and "global" in _unpickling_reason(refused).lower():
            raise ValueError(f"cannot load the weights of transformers model {source!r}: they hold pickled objects "
                             f"other than tensors, which tokenmerge does not load ({_unpickling_reason(refused)})"
                             ) from None
        reason = error_summary(error)
        raise ValueError(f"cannot load the weights of transformers model {source!r}: {reason}") from None
    if classifier:
        output, classes = _audio_logits if kind == "spectrogram" else _logits, network.config.num_labels
    elif kind != "image":
        output, classes = _audio_pooled if kind == "spectrogram" else _video_features, None
    else:
        output = _image_features if hasattr(network, "get_image_features") else _pooled
        classes = None
    if shape_of is not None:
        return ImageModel(network, output, None, classes, source if weights else None, shape_of(config), kind)
    return ImageModel(network, output, _transformers_transform(source), classes, source if weights else None)


def _transformers_transform(source: str) -> Optional[Callable]:
    """The model's own image processor as a PIL image -> tensor function, if its folder has one."""
    import transformers

    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None

    def transform(image):
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    size = processor.size if isinstance(processor.size, dict) else vars(processor.size)
    shown = ", ".join(f"{key} {value}" for key, value in size.items() if value is not None)
    transform.description = (  # type: ignore[attr-defined]
        f"{type(processor).__name__} (resize to {shown}, mean {list(processor.image_mean)}, "
        f"std {list(processor.image_std)})")
    return transform


# --- torchvision ---------------------------------------------------------------------


def torchvision_model(name: str, checkpoint: Optional[Path], num_classes: Optional[int], kwargs: dict[str, Any],
                      img_size: Optional[tuple[int, int]]) -> ImageModel:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = [model for model in known if model.startswith(name.split("_")[0])][:8]
        similar = f"; similar: {', '.join(close)}" if close else ""
        raise ValueError(f"torchvision has no model named {name!r}{similar}")
    _no_img_size("torchvision", img_size, "image_size=...")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    weights = read_weights(checkpoint) if checkpoint is not None else None
    try:
        network = torchvision.models.get_model(name, weights=None, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"torchvision cannot build {name} with {kwargs}: {error}") from None
    head = getattr(network.heads, "head", network.heads[-1])
    if weights is not None:
        try:
            network.load_state_dict(weights)
        except RuntimeError as error:
            key = "heads.head" if hasattr(network.heads, "head") else None
            raise _does_not_fit(checkpoint, name, error, _classifier_classes(weights, key, head.out_features)) from None
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return ImageModel(network, _call, transform, head.out_features)


# --- open_clip -----------------------------------------------------------------------


def _encode_image(network: torch.nn.Module, images: Tensor) -> Tensor:
    return network.encode_image(images)


def open_clip_model(name: str, checkpoint: Optional[Path], num_classes: Optional[int], kwargs: dict[str, Any],
                    img_size: Optional[tuple[int, int]]) -> ImageModel:
    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"open_clip has no model named {name!r}; see open_clip.list_models()")
    _no_img_size("open_clip", img_size, "force_image_size=...")
    if num_classes is not None:
        raise ValueError("--num-classes: open_clip models give embeddings; eval and compare classify them zero-shot "
                         "over the class names of --class-map")
    if checkpoint is not None:
        read_weights(checkpoint)  # a clear error for a file open_clip could not read
    try:
        network, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=str(checkpoint) if checkpoint else None, **kwargs
        )
    except RuntimeError as error:
        raise _does_not_fit(checkpoint, name, error) from None
    except TypeError as error:
        raise ValueError(f"open_clip cannot build {name} with {kwargs}: {error}") from None
    return ImageModel(network, _encode_image, transform)


def with_zero_shot_head(
    model: ImageModel, name: str, classnames: Sequence[str], template: str = "a photo of a {}.", progress: bool = False
) -> ImageModel:
    """The open_clip model ``name`` as a zero-shot classifier over ``classnames``: scaled
    cosine similarities of its image embeddings to the embeddings of one prompt per
    class (``progress``: a progress bar over the class names, which takes a while)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(
            model.network, tokenizer, classnames, [template.format], device=next(model.network.parameters()).device,
            use_tqdm=progress,
        )
    scale = model.network.logit_scale.exp().item()

    def logits(network: torch.nn.Module, images: Tensor) -> Tensor:
        features = torch.nn.functional.normalize(network.encode_image(images), dim=-1)
        return scale * features @ weights.to(features)

    return ImageModel(model.network, logits, model.transform, len(classnames), model.weights)
