"""More bad inputs for models oqcore quantized: sparse tensors given to ``reload_weights`` and
``quantize_tensor``, odd strides (must give the contiguous bytes), hooks and train mode kept by
``quantize_``, and forwards of quantized linears fed what a bf16 ``nn.Linear`` would refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import oqcore
from battery.tiny_models import net
from battery.util import assert_unchanged, raises_naming, snapshot
from oqcore import CheckpointError, UnsupportedLayerError

SCHEMES = ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8"]
KEYS = ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static", "mxfp8", "int8_per_channel_static", "mxfp4", "nvfp4"]


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def new_weights(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in net(seed, torch.float32).named_parameters()}


def _state_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().view(torch.uint8).clone() for k, v in model.state_dict().items() if v.numel()}


# ---- reload_weights: layouts --------------------------------------------------------------------

SPARSE = {
    "coo": lambda t: t.to_sparse(),
    "csr": lambda t: t.to_sparse_csr(),
}


@pytest.mark.parametrize("layout", list(SPARSE))
def test_reload_sparse_is_refused_unchanged(layout):
    model = oqcore.quantize_(net(), "fp8_per_channel")
    w = new_weights()
    w["layers.3.weight"] = SPARSE[layout](w["layers.3.weight"])
    snap = snapshot(model)
    with raises_naming(CheckpointError, "layers.3.weight", "dense"):
        oqcore.reload_weights(model, w)
    assert_unchanged(model, snap)


STRIDES = {
    "transposed": lambda t: t.t().contiguous().t() if t.dim() == 2 else t,
    "every_other": lambda t: torch.cat([t, t], -1)[..., ::2] if t.dim() == 2 else t,
    "expanded_stride0": lambda t: t[:1].expand_as(t) if t.dim() == 2 else t,
    "requires_grad_param": lambda t: nn.Parameter(t.clone()),
    "float64": lambda t: t.double(),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("how", list(STRIDES))
def test_reload_odd_strides_equal_contiguous(scheme, how):
    """A non-contiguous / stride-0 / grad-requiring / float64 tensor reloads to the same bytes as its
    contiguous float32 copy, into the same storages."""
    w = {k: STRIDES[how](v) for k, v in new_weights().items()}
    ref = oqcore.quantize_(net(), scheme)
    oqcore.reload_weights(ref, {k: v.detach().float().contiguous() for k, v in w.items()})
    model = oqcore.quantize_(net(), scheme)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    oqcore.reload_weights(model, w)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    got, want = _state_bytes(model), _state_bytes(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---- quantize_tensor ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(SPARSE))
def test_quantize_tensor_sparse_is_refused(layout):
    w = SPARSE[layout](torch.randn(64, 64))
    with raises_naming(UnsupportedLayerError, "w_sparse", "dense"):
        oqcore.quantize_tensor(w, "fp8_per_channel_static", name="w_sparse")


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 256, generator=g)
    return {
        "transposed": base.t().contiguous().t(),
        "strided": torch.cat([base, base], -1)[:, ::2],
        "expanded": base[:1].expand(64, 256),
        "offset_view": torch.randn(65, 256, generator=g)[1:],
        "stack_3d_transposed": torch.randn(3, 256, 64, generator=g).transpose(1, 2),
        "bf16": base.bfloat16(),
        "fp16_subnormal": (base * 1e-6).half(),
        "fp32_subnormal": base * 1e-40,
        "all_zero": base * 0,
        "huge": base * 1e37,
        "requires_grad": base.clone().requires_grad_(),
    }


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("case", list(_inputs()))
def test_quantize_tensor_default_equals_reference_bytes(key, case):
    w = _inputs()[case]
    got = oqcore.quantize_tensor(w, key)
    ref = oqcore.quantize_tensor(w.detach().contiguous(), key, backend="torch")
    for a, b in ((got.qdata, ref.qdata), (got.scale, ref.scale)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert torch.equal(a.detach().contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---- quantize_: hooks and train mode --------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_keeps_hooks_and_mode(scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).bfloat16().train()
    calls = []
    model[0].register_forward_hook(lambda mod, inp, out: out * 2)
    handle = model[2].register_forward_pre_hook(lambda mod, inp: calls.append(1))
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        ref = model(x)
    oqcore.quantize_(model, scheme)
    assert type(model[0]).__name__ == "QuantizedLinear" and model[0].training
    with torch.no_grad():
        out = model(x)
    assert calls == [1, 1]  # the pre-hook still runs on the quantized layer
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 0.1  # the x2 output hook still applies (else rel is ~0.5)
    handle.remove()  # the user's handle still removes it
    with torch.no_grad():
        model(x)
    assert calls == [1, 1]


# ---- forwards of quantized linears --------------------------------------------------------------

BAD_INPUTS = {
    "int_token_ids": lambda: torch.randint(0, 5, (3, 64)),
    "K_plus_1": lambda: torch.randn(3, 65).bfloat16(),
    "zero_dim": lambda: torch.tensor(1.0).bfloat16(),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_forward_bad_input_same_kind_as_bf16(scheme, case):
    base = nn.Sequential(nn.Linear(64, 128)).bfloat16()
    qm = oqcore.quantize_(copy.deepcopy(base), scheme)
    x = BAD_INPUTS[case]()
    with pytest.raises(RuntimeError):
        base(x)
    with pytest.raises(RuntimeError, match="layer '0'"):
        qm(x)


GOOD_INPUTS = {
    "empty_batch": lambda: torch.randn(0, 64).bfloat16(),
    "empty_3d": lambda: torch.randn(2, 0, 64).bfloat16(),
    "3d": lambda: torch.randn(2, 3, 64).bfloat16(),
    "4d": lambda: torch.randn(2, 2, 3, 64).bfloat16(),
    "1d": lambda: torch.randn(64).bfloat16(),
    "non_contiguous": lambda: torch.randn(64, 3).bfloat16().t(),
    "non_contiguous_3d": lambda: torch.randn(3, 64, 2).bfloat16().transpose(1, 2),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", list(GOOD_INPUTS))
def test_forward_shapes_match_bf16(scheme, case):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128)).bfloat16()
    qm = oqcore.quantize_(copy.deepcopy(base), scheme)
    x = GOOD_INPUTS[case]()
    with torch.no_grad():
        ref, out = base(x), qm(x)
    assert (out.shape, out.dtype) == (ref.shape, ref.dtype)
    if ref.numel():
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 0.1
        # the same values as the contiguous input gives
        with torch.no_grad():
            assert torch.equal(qm(x.contiguous()), out)


# ---- reload after save_quantized -> load: the original checkpoint names still map --------------


@pytest.fixture(scope="module")
def saved_mixtral(tmp_path_factory):
    from oqcore.synthetic import make_tiny_moe

    d = tmp_path_factory.mktemp("mixtral-saved")
    kw = dict(hidden_size=64, intermediate_size=64, num_layers=1)
    src = make_tiny_moe("mixtral", d / "src", seed=0, **kw)
    new = make_tiny_moe("mixtral", d / "new", seed=1, **kw)
    oqcore.save_quantized(oqcore.load(src, "fp8_per_channel"), d / "q")
    return d / "q", new


def _checkpoint(path) -> dict[str, torch.Tensor]:
    from oqcore.loading.checkpoint import iter_checkpoint

    return dict(iter_checkpoint(path))


def test_reload_saved_folder_maps_checkpoint_names(saved_mixtral):
    saved, new = saved_mixtral
    model = oqcore.load(saved)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    touched = oqcore.reload_weights(model, _checkpoint(new))
    assert touched
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs
    want = _state_bytes(oqcore.load(new, "fp8_per_channel"))
    got = _state_bytes(model)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _drop_expert(w):
    key = next(k for k in w if ".experts.1.w1." in k)
    return {k: v for k, v in w.items() if k != key}, "experts"


def _bad_expert_shape(w):
    key = next(k for k in w if ".experts.1.w2." in k)
    return {**w, key: w[key][:, :-1].clone()}, "experts"


@pytest.mark.parametrize("make", [_drop_expert, _bad_expert_shape])
def test_reload_saved_folder_bad_experts_unchanged(saved_mixtral, make):
    saved, new = saved_mixtral
    model = oqcore.load(saved)
    w, culprit = make(_checkpoint(new))
    snap = snapshot(model)
    with raises_naming(CheckpointError, culprit):
        oqcore.reload_weights(model, w)
    assert_unchanged(model, snap)


# ---- quantize_ / reload: shared modules and tied weights ----------------------------------------


class _Shared(nn.Module):
    """One nn.Linear reachable at two paths."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(64, 64)
        self.a = shared
        self.b = shared

    def forward(self, x):
        return self.b(self.a(x))


class _Tied(nn.Module):
    """An lm_head sharing the embedding's weight (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.mid = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.mid(self.embed(ids)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_shared_module_replaced_at_every_path(scheme):
    torch.manual_seed(0)
    model = _Shared().bfloat16()
    oqcore.quantize_(model, scheme)
    assert model.a is model.b and type(model.b).__name__ == "QuantizedLinear"
    with raises_naming(CheckpointError, "b.weight", "a.weight"):  # one layer, named once
        oqcore.reload_weights(model, {"b.weight": torch.zeros(64, 64), "b.bias": torch.zeros(64)})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_reload_tied_lm_head_follows_the_embedding(scheme):
    """``named_parameters()`` lists a tied weight once (as embed.weight): reloading it must refresh
    the quantized lm_head too, exactly as quantizing the new model does."""
    torch.manual_seed(0)
    model = oqcore.quantize_(_Tied().bfloat16(), scheme)
    torch.manual_seed(1)
    new = _Tied().bfloat16()
    touched = oqcore.reload_weights(model, dict(new.named_parameters()))
    assert "lm_head" in touched
    want = _state_bytes(oqcore.quantize_(new, scheme))
    got = _state_bytes(model)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("bad", [nn.Linear(2, 2), None, "model"])
def test_report_of_a_model_oqcore_did_not_make(bad):
    with raises_naming(oqcore.ConfigError, "model", "oqcore.load"):
        oqcore.report(bad)


# ---- reload: values read from the model's own storages ----------------------------------------


def _own_swapped(model, w):
    w["norm.weight"], w["norm.bias"] = model.norm.bias.detach(), model.norm.weight.detach()
    return w


def _own_overlapping(model, w):
    w["embed.weight"] = torch.as_strided(model.embed.weight.detach(), (16, 64), (32, 1))
    return w


def _own_expanded(model, w):
    w["embed.weight"] = model.embed.weight.detach()[3:4].expand(16, 64)
    return w


@pytest.mark.parametrize("make", [_own_swapped, _own_overlapping, _own_expanded])
def test_reload_from_own_storages_reads_values_as_given(make):
    """The new values are those the tensors held when reload_weights was called, even when they
    are views of the model's own parameters that the commit overwrites."""
    model = oqcore.quantize_(net(), "fp8_per_channel")
    w = make(model, new_weights())
    expected = {k: v.detach().clone() for k, v in w.items()}
    oqcore.reload_weights(model, w)
    params = dict(model.named_parameters())
    for k in ("embed.weight", "norm.weight", "norm.bias"):
        assert torch.equal(params[k].detach(), expected[k].to(params[k].dtype)), k


# ---- forwards of quantized experts --------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_experts(tmp_path_factory):
    """``{(arch, scheme): QuantizedMoE}`` of tiny loaded MoE models."""
    from oqcore.synthetic import make_tiny_moe

    out = {}
    for arch in ("mixtral", "gpt_oss"):
        src = make_tiny_moe(arch, tmp_path_factory.mktemp(arch), hidden_size=64, intermediate_size=64, num_layers=1)
        for scheme in ("fp8_per_channel", "mxfp8"):
            model = oqcore.load(src, scheme)
            out[arch, scheme] = next(m for m in model.modules() if type(m).__name__ == "QuantizedMoE")
    return out


MOE_CASES = [(a, s) for a in ("mixtral", "gpt_oss") for s in ("fp8_per_channel", "mxfp8")]


@pytest.mark.parametrize("arch,scheme", MOE_CASES)
def test_moe_out_of_range_ids_contribute_nothing(moe_experts, arch, scheme):
    """An expert id outside [0, E) (expert parallelism's 'not here') adds nothing; a fused kernel
    must not read past the stacks (it gave NaN/garbage)."""
    experts = moe_experts[arch, scheme]
    torch.manual_seed(0)
    h = torch.randn(4, 64).bfloat16()
    idx = torch.tensor([[0, 4], [1, -1], [2, 3], [-5, 9]])
    w = torch.rand(4, 2).bfloat16()
    valid = (idx >= 0) & (idx < 4)
    with torch.no_grad():
        out = experts(h, idx, w)
        want = experts(h, torch.where(valid, idx, 0), torch.where(valid, w, 0))
    assert torch.isfinite(out).all()
    assert torch.equal(out, want)
    assert not out[3].any()


@pytest.mark.parametrize("arch,scheme", MOE_CASES)
@pytest.mark.parametrize(
    "case,exc",
    [("float_ids", IndexError), ("hidden_plus_1", RuntimeError), ("int_hidden", RuntimeError), ("zero_dim", RuntimeError)],
)
def test_moe_bad_inputs_raise_torch_kind_naming_layer(moe_experts, arch, scheme, case, exc):
    experts = moe_experts[arch, scheme]
    h, idx, w = torch.randn(4, 64).bfloat16(), torch.randint(0, 4, (4, 2)), torch.rand(4, 2).bfloat16()
    if case == "float_ids":
        idx = idx.float()
    elif case == "hidden_plus_1":
        h = torch.randn(4, 65).bfloat16()
    elif case == "int_hidden":
        h = torch.randint(0, 3, (4, 64))
    else:
        h = torch.tensor(1.0).bfloat16()
    with pytest.raises(exc, match="layer 'model.layers.0.mlp.experts'"):
        experts(h, idx, w)


# ---- quantize_: what a wrapper would drop, sparse weights ----------------------------------------


def _with_buffer():
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].register_buffer("lora_scale", torch.ones(3))
    return model, "lora_scale"


def _with_adapter():
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].adapter = nn.Linear(64, 4)
    return model, "adapter"


def _sparse_weight():
    model = nn.Sequential(nn.Linear(64, 64))
    model[0].weight = nn.Parameter(model[0].weight.detach().to_sparse())
    return model, "sparse"


@pytest.mark.parametrize("make", [_with_buffer, _with_adapter, _sparse_weight])
def test_quantize_refuses_what_the_wrapper_would_drop(make):
    model, culprit = make()
    before = {id(m) for m in model.modules()}
    with raises_naming(UnsupportedLayerError, "'0'", culprit):
        oqcore.quantize_(model, "fp8_per_channel")
    assert {id(m) for m in model.modules()} == before and not hasattr(model, "oq_state")
    if culprit != "sparse":
        snap = snapshot(model)
        with pytest.raises(UnsupportedLayerError):
            oqcore.quantize_(model, "fp8_per_channel")
        assert_unchanged(model, snap)
