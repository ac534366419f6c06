"""The public API is typed: every public function of tokenmerge and of the tools
that scripts call takes annotated arguments and says what it returns."""
import inspect

import pytest

import tokenmerge

PUBLIC = [*(getattr(tokenmerge, name) for name in tokenmerge.__all__ if inspect.isfunction(getattr(tokenmerge, name)))]


@pytest.mark.parametrize("function", PUBLIC + ["tools"], ids=lambda f: getattr(f, "__name__", f))
def test_public_functions_are_typed(function):
    if function == "tools":
        from tokenmerge.tools.bench import benchmark
        from tokenmerge.tools.conversion import transformers_from_timm
        from tokenmerge.tools.evaluate import evaluate
        from tokenmerge.tools.models import load_model
        from tokenmerge.tools.onnx_files import export_onnx, graph_signature
        from tokenmerge.tools.train import train
        from tokenmerge.tools.visualize import visualize

        functions = [benchmark, evaluate, load_model, train, visualize, transformers_from_timm, export_onnx,
                     graph_signature]
    else:
        functions = [function]
    for item in functions:
        signature = inspect.signature(item)
        untyped = [name for name, parameter in signature.parameters.items()
                   if parameter.annotation is inspect.Parameter.empty and parameter.kind not in (
                       inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        assert not untyped and signature.return_annotation is not inspect.Signature.empty, (item.__name__, untyped)
