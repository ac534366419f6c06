"""``tokenmerge.compile``: ``torch.compile`` with ``fullgraph=True`` and CUDA graphs on a
GPU. The compiled merged model merges the same tokens as the eager one; the mode is
chosen as documented; anything but a module is refused."""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import tokenmerge
from tests.adapters.test_contract import CASES_BY_ID, R, images, make, run
from tokenmerge.state import CappedRWarning


def test_the_compiled_merged_model_gives_the_eager_outputs_sizes_and_sources():
    """Inductor, the backend users get, in one graph; the compiled pass writes the state
    the eager pass wrote (a pass at another batch size comes between them)."""
    case = CASES_BY_ID["timm_class_token"]
    model = tokenmerge.apply(make(case), r=R, trace_source=True)
    x = images(2)
    expected = run(case, model, x)
    state = tokenmerge.get_state(model)
    size, source = state.size.clone(), state.source.clone()
    run(case, model, images(3, seed=1))
    assert state.size.shape[0] == 3

    torch._dynamo.reset()
    compiled = tokenmerge.compile(model)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    with torch.no_grad():
        out = compiled(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert tokenmerge.get_state(compiled) is state
    assert state.size.shape == size.shape == (2, tokenmerge.token_counts(compiled)[-1], 1)
    assert torch.equal(state.size, size) and torch.equal(state.source, source)

    tokenmerge.apply(compiled, r=2)  # the settings of the model inside, seen through the wrapper
    assert tokenmerge.is_applied(compiled) and state.r == 2 and tokenmerge.get_state(model).r == 2
    tokenmerge.remove(compiled)
    assert not tokenmerge.is_applied(model)


def test_a_graph_break_is_an_error():
    class Breaks(torch.nn.Linear):
        def forward(self, x):
            torch._dynamo.graph_break()
            return super().forward(x)

    torch._dynamo.reset()
    compiled = tokenmerge.compile(Breaks(2, 2), backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(torch.ones(1, 2))


def test_an_r_more_than_a_block_can_merge_compiles_in_one_graph():
    case = CASES_BY_ID["timm_class_token"]
    model = tokenmerge.apply(make(case), r=20)  # the last of the three blocks can merge 12
    x = images(2)
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedRWarning)
        out = tokenmerge.compile(model, backend="eager")(x)
        torch.testing.assert_close(out, run(case, model, x))


class OnCuda(torch.nn.Module):
    """A module whose parameters say they are on a CUDA device, for the mode's choice."""

    def parameters(self, recurse=True):
        yield SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def compile_calls(monkeypatch):
    """The keyword arguments of every ``torch.compile`` call; the model comes back as it was."""
    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_the_mode_is_reduce_overhead_on_cuda_and_torchs_default_elsewhere(compile_calls):
    cpu_model = make(CASES_BY_ID["timm_class_token"])
    assert tokenmerge.compile(cpu_model) is cpu_model
    assert tokenmerge.compile(OnCuda()) is not None
    assert tokenmerge.compile(torch.nn.Identity()) is not None  # nothing to say where it runs
    assert tokenmerge.compile(torch.nn.Linear(2, 2, device="meta")) is not None
    assert compile_calls == [dict(mode=None, dynamic=None, fullgraph=True),
                             dict(mode="reduce-overhead", dynamic=None, fullgraph=True),
                             dict(mode=None, dynamic=None, fullgraph=True),
                             dict(mode=None, dynamic=None, fullgraph=True)]


def test_what_the_caller_gives_wins_and_other_backends_get_no_mode(compile_calls):
    tokenmerge.compile(OnCuda(), mode="max-autotune", dynamic=True)
    tokenmerge.compile(OnCuda(), fullgraph=False)
    tokenmerge.compile(OnCuda(), backend="inductor")
    tokenmerge.compile(OnCuda(), backend="aot_eager")
    tokenmerge.compile(OnCuda(), options={"triton.cudagraphs": False})  # torch refuses a mode with options
    assert compile_calls == [
        dict(mode="max-autotune", dynamic=True, fullgraph=True),
        dict(mode="reduce-overhead", dynamic=None, fullgraph=False),
        dict(mode="reduce-overhead", dynamic=None, backend="inductor", fullgraph=True),
        dict(mode=None, dynamic=None, backend="aot_eager", fullgraph=True),
        dict(mode=None, dynamic=None, options={"triton.cudagraphs": False}, fullgraph=True),
    ]


@pytest.mark.parametrize("thing", [lambda images: images, "vit_small_patch16_224", None])
def test_anything_but_a_module_is_refused_in_one_line(thing, compile_calls):
    with pytest.raises(TypeError, match=r"^tokenmerge.compile takes a torch.nn.Module, not \w+$"):
        tokenmerge.compile(thing)
    assert compile_calls == []
