"""ONNX files of models with token merging: written through PyTorch's ONNX exporter
(``torch.onnx.export(..., dynamo=True)``) with a dynamic batch dimension and standard
ONNX operators only, and run in ONNX Runtime on the CPU.

For scripts::

    from tokenmerge.tools.onnx_files import export_onnx, onnx_difference, onnx_outputs
    export_onnx(model, "model.onnx", torch.randn(2, 3, 224, 224))   # model patched or not
    onnx_outputs("model.onnx", images)                              # ONNX Runtime's outputs
    onnx_difference("model.onnx", model, images)                    # max abs difference

The matching's stable sort becomes an ONNX ``TopK``, which orders equal scores by
index just as the stable sort does. Needs the ``onnx`` extra (onnx, onnxscript,
onnxruntime).
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

from tokenmerge.libraries import install_command
from tokenmerge.state import CappedRWarning

from .files import write_atomically

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx() -> None:
    """A one-line error naming the install command when the ONNX packages are missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"ONNX export needs {', '.join(missing)}; install them with: {install_command('onnx')}")


def export_onnx(model: torch.nn.Module, path: str | Path, example: torch.Tensor, dynamic_batch: bool = True) -> Path:
    """Write ``model`` (a function of images, patched or not) to the ONNX file ``path``,
    traced with the images ``example`` (B, 3, H, W), the batch dimension dynamic
    unless ``dynamic_batch`` is False, whole or not at all (see
    :func:`tokenmerge.tools.files.write_atomically`); returns the path written (a
    symlink's target).

    The model runs once on ``example`` first, so that one that cannot run (a method
    that needs a class token, on a model without one) fails with its own error, not
    inside the exporter. A dynamic batch is traced with at least two images: traced
    with one, the exporter fixes the graph at batch 1."""
    require_onnx()
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    if dynamic_batch:
        example = at_least_two(example)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        with torch.no_grad():
            model.eval()(example)
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=shapes,
                                    input_names=["images"], output_names=["output"], verbose=False)
    return write_atomically(path, lambda file: program.save(str(file)))


def at_least_two(example: torch.Tensor) -> torch.Tensor:
    """``example``, its images repeated to a batch of two if it holds one."""
    return example if len(example) >= 2 else example.repeat(2, *[1] * (example.dim() - 1))


def onnx_session(path: str | Path, threads: Optional[int] = None) -> Any:
    """An ONNX Runtime session (CPU execution provider, all graph optimisations) of the
    ONNX file ``path``, with ``threads`` threads per operator (default: torch's number
    of threads, so that both runtimes are timed on the same cores). Its threads sleep
    between operators instead of spinning: spinning threads of one session take the
    cores of the next one to run (timed interleaved, it made a merged ViT-Ti 30% slower)."""
    require_onnx()
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    session_options.intra_op_num_threads = threads or torch.get_num_threads()
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])


def graph_signature(path: str | Path) -> str:
    """The inputs and outputs of the ONNX graph at ``path``: names, element types and
    shapes (a named dimension, such as ``batch``, is dynamic)."""
    session = onnx_session(path)

    def describe(value: Any) -> str:
        kind = value.type.removeprefix("tensor(").removesuffix(")")
        return f"{value.name!r} {kind} ({', '.join(map(str, value.shape))})"

    inputs = ", ".join(map(describe, session.get_inputs()))
    outputs = ", ".join(map(describe, session.get_outputs()))
    return f"input {inputs}; output {outputs}"


def session_runner(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``session`` as a function of an image tensor (on the CPU, float32) to its first output."""
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])
    return run


def onnx_outputs(path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's outputs (CPU execution provider) of the ONNX file ``path`` for ``images``."""
    return session_runner(onnx_session(path))(images)


def onnx_difference(path: str | Path, model: torch.nn.Module, images: torch.Tensor) -> float:
    """The largest absolute difference between ONNX Runtime's outputs for ``images``
    and the eager model's."""
    with torch.no_grad():
        expected = model(images)
    return float((onnx_outputs(path, images) - expected).abs().max())
