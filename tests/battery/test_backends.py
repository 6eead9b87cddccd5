"""Bad-input battery of backend choice: a backend that cannot run is rejected by the oracle with
its reason (a :class:`oqcore.NoBackendError` naming the layer and the reason when it is pinned), a
Triton driver failure at run time is a ``NoBackendError`` naming the layer (never a raw
``RuntimeError: 0 active drivers``), and a refused quantize leaves the model bit for bit as it was.

Triton is installed here, with no GPU: its real driver check fails ("0 active drivers"), so the
"CUDA machine whose Triton has no driver" cases only pretend torch sees a GPU.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

import oqcore
import oq_toolkit.triton_support as ts
from battery.tiny_models import net
from battery.util import assert_unchanged, raises_naming, snapshot
from oqcore import ConfigError, NoBackendError, UnsupportedLayerError

DRIVER_ERROR = "0 active drivers ([]). There should only be one."


class Experts(nn.Module):
    """A minimal fused-experts module (Mixtral layout): E=4, H=64, I=32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(4, 64, 64, dtype=torch.bfloat16) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(4, 64, 32, dtype=torch.bfloat16) * 0.1)
        self.act_fn = nn.SiLU()


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = Experts()


def _fake_cuda(monkeypatch, capability=(9, 0)):
    """torch says there is one CUDA device of ``capability`` (plan-time checks only: nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def _meta_net():
    with torch.device("meta"):
        return net()


# ---- plan time: the oracle rejects what cannot run ------------------------------------------------


def _no_interpreter(mp):
    mp.delenv("TRITON_INTERPRET", raising=False)


def _disabled(mp):
    mp.setenv("OQ_DISABLE_TRITON", "1")


def _not_installed(mp):
    real = ts.importlib.util.find_spec
    mp.setattr(ts.importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))


def _stale_kernels(mp):
    """A kernel module of the plugin imported while TRITON_INTERPRET was unset: its kernels are
    JITFunctions (built for a GPU driver), not the interpreter's."""
    from triton.runtime.jit import JITFunction

    mod = types.ModuleType("oq_plugin_fp8.kernels._stale")
    mod.kernel = JITFunction(_dummy_kernel)
    mp.setitem(sys.modules, "oq_plugin_fp8.kernels._stale", mod)
    mp.setenv("TRITON_INTERPRET", "1")


def _dummy_kernel(x_ptr):  # never launched: only its JITFunction wrapper is inspected
    pass


# (environment change, config, culprits beyond the layer name)
PINNED_TRITON_CPU = {
    "no interpreter": (_no_interpreter, {"linear": "fp8_per_tensor", "backend": {"linear": "triton"}},
                       ["triton", "TRITON_INTERPRET=1"]),
    "OQ_DISABLE_TRITON": (_disabled, {"linear": "mxfp8", "backend": {"linear": "triton"}},
                          ["triton", "OQ_DISABLE_TRITON=1"]),
    "triton not installed": (_not_installed, {"linear": {"weight": "int8_per_channel_static"}, "backend": {"linear": "triton"}},
                             ["triton", "triton is not installed"]),
    "kernels imported before TRITON_INTERPRET": (_stale_kernels, {"linear": "fp8_per_block", "backend": {"linear": "triton"}},
                                                 ["triton", "oq_plugin_fp8.kernels._stale", "TRITON_INTERPRET=1"]),
}


@pytest.mark.parametrize("case", list(PINNED_TRITON_CPU))
def test_pinned_triton_that_cannot_run_on_cpu(monkeypatch, case):
    setup, cfg, culprits = PINNED_TRITON_CPU[case]
    setup(monkeypatch)
    model = net()
    snap = snapshot(model)
    with raises_naming(NoBackendError, "'layers.0'", *culprits):
        oqcore.quantize_(model, cfg)
    assert_unchanged(model, snap)


def test_unpinned_triton_without_interpreter_falls_back_with_reason(monkeypatch):
    _no_interpreter(monkeypatch)
    qplan = oqcore.plan(net(), "fp8_per_tensor")
    lp = next(lp for lp in qplan.quantized if lp.name == "layers.0")
    assert lp.backend.name == "cpu"  # the C kernel (W8A8: C activation quantizer), not triton
    rejected = {c.backend.name: c.reason for c in lp.candidates if c.reason and c.backend.activation_key == lp.backend.activation_key}
    assert "TRITON_INTERPRET=1" in rejected["triton"]


@pytest.mark.parametrize("kind", ["linear", "moe"])
def test_pinned_triton_on_cuda_without_driver(monkeypatch, kind):
    """torch sees a GPU, Triton finds no active driver (Triton's own driver lookup raises its
    ``0 active drivers``): the pinned triton backend is refused at plan time with that reason."""
    import triton.runtime  # noqa: F401  (the module; ``triton.runtime.driver`` is its DriverConfig object)

    _fake_cuda(monkeypatch)
    monkeypatch.setattr(sys.modules["triton.runtime.driver"], "_create_driver", _raise_driver)
    with torch.device("meta"):
        model = net() if kind == "linear" else MoEBlock()
    cfg = {kind: "fp8_per_channel", "backend": {kind: "triton"}}
    layer = "'layers.0'" if kind == "linear" else "'experts'"
    with raises_naming(NoBackendError, layer, "triton", "no usable GPU driver", "0 active drivers"):
        oqcore.plan(model, cfg, device="cuda")


def test_pinned_triton_on_cuda_whose_driver_cannot_load(monkeypatch):
    """torch sees a GPU, Triton's CUDA driver is active but fails to initialize (here: no libcuda):
    refused with Triton's message, on one line."""
    _fake_cuda(monkeypatch)
    with raises_naming(NoBackendError, "'layers.0'", "triton", "no usable GPU driver") as info:
        oqcore.plan(_meta_net(), {"linear": "fp8_per_tensor", "backend": {"linear": "triton"}}, device="cuda")
    line = next(ln for ln in str(info.value).splitlines() if "no usable GPU driver" in ln)
    assert line.rstrip().endswith(")")


def test_unpinned_triton_on_cuda_without_driver_is_rejected_with_reason(monkeypatch):
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(ts, "driver_status", lambda: (False, f"Triton has no usable GPU driver (RuntimeError: {DRIVER_ERROR})"))
    qplan = oqcore.plan(_meta_net(), "fp8_per_tensor", device="cuda")
    lp = next(lp for lp in qplan.quantized if lp.name == "layers.0")
    assert lp.backend.name == "scaled-mm"  # the next candidate that can run on that GPU
    reasons = [c.reason for c in lp.candidates if c.backend.name == "triton" and c.backend.activation_key == lp.backend.activation_key]
    assert reasons and "0 active drivers" in reasons[0]


def test_pinned_triton_on_cuda_with_old_gpu(monkeypatch):
    _fake_cuda(monkeypatch, capability=(7, 5))
    with raises_naming(NoBackendError, "'layers.0'", "triton", "needs CUDA compute capability >= 8.9, found 7.5"):
        oqcore.plan(_meta_net(), {"linear": "mxfp8", "backend": {"linear": "triton"}}, device="cuda")


def test_driver_status_quotes_triton():
    ok, why = ts.driver_status()
    assert not ok and "0 active drivers" in why  # no GPU on this machine


# ---- other backends pinned where they cannot run ---------------------------------------------------


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


PINNED_OTHER = {
    "cpu-int8 K % 16 != 0": (lambda: nn.Sequential(nn.Linear(200, 64)), {"linear": {"weight": "int8_per_channel_static"},
                             "backend": {"linear": "cpu-int8"}}, ["'0'", "cpu-int8", "divisible by 16", "K=200"]),
    "scaled-mm on cpu": (net, {"linear": "fp8_per_channel", "backend": {"linear": "scaled-mm"}},
                         ["'layers.0'", "scaled-mm", "CUDA only"]),
    "cpu backend with static fp8 activations": (net, {"linear": {"weight": "fp8_per_tensor_static", "activation": "fp8_per_tensor_static"}, "backend": {"linear": "cpu"}},
                                                ["'layers.0'", "cpu"]),
    "cpu-int8 W8A8 with K past int32 sums": (lambda: nn.Sequential(nn.Linear(133145, 2)),
                                             {"linear": {"weight": "int8_per_channel_static", "activation": "int8_per_token"},
                                              "backend": {"linear": "cpu-int8"}}, ["'0'", "cpu-int8", "int32", "K=133145"]),
}


@pytest.mark.parametrize("case", list(PINNED_OTHER))
def test_pinned_backend_that_cannot_run(no_triton, case):
    make, cfg, culprits = PINNED_OTHER[case]
    model = make()
    snap = snapshot(model)
    with raises_naming(NoBackendError, *culprits):
        oqcore.quantize_(model, cfg)
    assert_unchanged(model, snap)


def test_pinned_cpu_backend_off_the_cpu(no_triton, monkeypatch):
    _fake_cuda(monkeypatch)
    cfg = {"linear": {"weight": "fp8_per_tensor_static", "activation": None}, "backend": {"linear": "cpu"}}
    with raises_naming(NoBackendError, "'layers.0'", "cpu", "run on the CPU, layer runs on cuda"):
        oqcore.plan(_meta_net(), cfg, device="cuda")


def test_unknown_backend_pin_is_a_config_error():
    with raises_naming(ConfigError, "backend.linear", "'trition'", "did you mean 'triton'"):
        oqcore.QuantizationConfig.from_any({"linear": "fp8_per_tensor", "backend": {"linear": "trition"}})


def test_is_supported_that_raises_rejects_only_its_backend():
    def broken(layer, device):
        raise RuntimeError(DRIVER_ERROR)

    cands = [oqcore.Backend("fast", None, broken, 100), oqcore.Backend("slow", None, priority=0)]
    choice = oqcore.select_backend("layers.0", nn.Linear(4, 4), cands, None, "cpu")
    assert choice.backend.name == "slow"
    assert "is_supported raised RuntimeError" in choice.candidates[1].reason
    with raises_naming(NoBackendError, "'layers.0'", "fast", "0 active drivers"):
        oqcore.select_backend("layers.0", nn.Linear(4, 4), cands, None, "cpu", pinned="fast")


def test_compile_path_refuses_mxfp8_with_k_not_multiple_of_32(no_triton):
    model = nn.Sequential(nn.Linear(200, 64))
    snap = snapshot(model)
    with raises_naming(UnsupportedLayerError, "'0'", "divisible by 32", "K=200"):
        oqcore.quantize_(model, "mxfp8")
    assert_unchanged(model, snap)


# ---- run time: a Triton driver failure after planning ---------------------------------------------


def _raise_driver(*a, **k):
    raise RuntimeError(DRIVER_ERROR)


# (config, kernel module, kernel function the forward calls, experts?)
RUNTIME = {
    "fp8 linear": ({"linear": {"weight": "fp8_per_channel_static", "activation": None}}, "oq_plugin_fp8.kernels.gemm", "fp8_gemm", False),
    "fp8 moe": ({"moe": {"weight": "fp8_per_tensor_static", "activation": None}}, "oq_plugin_fp8.kernels.fused_moe", "fused_moe_gemm", True),
    "mxfp8 linear": ({"linear": {"weight": "mxfp8", "activation": None}}, "oq_plugin_mxfp8.kernels.gemm", "mxfp8_gemm", False),
    "int8 linear": ({"linear": {"weight": "int8_per_channel_static"}}, "oq_plugin_int8.kernels.gemm", "int8_gemm", False),
    "int8 moe": ({"moe": {"weight": "int8_per_channel_static"}}, "oq_plugin_int8.kernels.fused_moe", "fused_moe_int8", True),
}


@pytest.mark.parametrize("case", list(RUNTIME))
def test_driver_failure_at_run_time_is_no_backend_error(monkeypatch, case):
    """Planned with Triton under the interpreter; by the forward the driver is gone (the kernel
    launch raises Triton's RuntimeError): one NoBackendError naming the layer and what to do."""
    import importlib

    cfg, module, fn, moe = RUNTIME[case]
    cfg = {**cfg, "backend": {("moe" if moe else "linear"): "triton"}}
    model = MoEBlock() if moe else net()
    oqcore.quantize_(model, cfg)
    monkeypatch.setattr(importlib.import_module(module), fn, _raise_driver)
    if moe:
        x, ids, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.rand(3, 2)
        call, layer = (lambda: model.experts(x, ids, w)), "'experts'"
    else:
        call, layer = (lambda: model(torch.tensor([[1, 2, 3]]))), "'layers.0'"
    with raises_naming(NoBackendError, layer, "triton", "0 active drivers", "backend.", "TRITON_INTERPRET=1"):
        call()


def test_other_runtime_errors_are_not_rewritten(monkeypatch):
    import oq_plugin_fp8.kernels.gemm as gemm

    model = oqcore.quantize_(net(), {"linear": {"weight": "fp8_per_tensor_static", "activation": None}, "backend": {"linear": "triton"}})

    def boom(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gemm, "fp8_gemm", boom)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        model(torch.tensor([[1, 2]]))
