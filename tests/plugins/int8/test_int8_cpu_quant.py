"""The C int8 quantizer (backend ``"cpu"``) gives the torch reference's exact bytes and scales."""

import pytest
import torch

import oqcore
from oq_plugin_int8 import cpu
from oq_plugin_int8 import quant

lib = cpu.LIBRARY.load()
needs_lib = pytest.mark.skipif(lib is None, reason=f"C kernel unavailable: {cpu.kernel_status()[1]}")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SHAPES = ((1, 1), (3, 5), (257, 1000), (16, 4096))


def _assert_same(x, lib=None):
    q, s = cpu.quantize_int8_rowwise_cpu(x, lib=lib)
    rq, rs = quant.quantize_int8_rowwise(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape
    assert torch.equal(q, rq), f"{(q != rq).sum().item()} bytes differ"
    # bitwise scale comparison (torch.equal would accept -0.0 == 0.0)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))


def _cases(dtype, n=37, k=203, seed=0):
    """Named inputs exercising every branch of the row rule."""
    g = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max / 4
    tiny = torch.finfo(dtype).smallest_normal / 8  # subnormal in every format
    cases = {"randn": torch.randn(n, k, generator=g)}
    z = torch.randn(n, k, generator=g)
    z[::3] = 0.0
    cases["zero_rows"] = z
    cases["neg_zero"] = torch.full((n, k), -0.0)
    cases["tiny"] = torch.randn(n, k, generator=g) * tiny
    cases["huge"] = torch.randn(n, k, generator=g).clamp(-3, 3) * big / 3
    mixed = torch.randn(n, k, generator=g) * torch.logspace(-8, 4, k)[None, :]
    cases["mixed"] = mixed
    # exact .5 ties: amax 127 -> scale exactly 1.0, amax 254 -> scale 2.0
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5])
    ties2 = torch.tensor([254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 253.0, -253.0, 7.0])
    cases["ties"] = torch.stack([ties, ties2, -ties])
    out = {name: t.to(dtype) for name, t in cases.items()}
    if dtype == torch.float32:
        # amax so small that amax / 127 underflows to 0: the eps rule
        out["underflow"] = torch.tensor([[1e-45, -1e-45, 0.0], [2e-45, 0.0, -0.0]])
    return out


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
def test_cases_bit_exact(dtype):
    for name, x in _cases(dtype).items():
        try:
            _assert_same(x)
        except AssertionError as e:
            raise AssertionError(f"{name} {dtype}") from e


@needs_lib
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_bit_exact(dtype, shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    _assert_same((torch.randn(*shape, generator=g) * 3).to(dtype))


@needs_lib
def test_expert_stack_and_non_contiguous():
    x = torch.randn(3, 40, 64).bfloat16()
    _assert_same(x)
    _assert_same(torch.randn(64, 40).t())  # transposed view: made contiguous first


@needs_lib
def test_registered_backend_matches_torch():
    x = torch.randn(130, 260).bfloat16()
    for key, role in (("int8_per_channel_static", "weight"), ("int8_per_token", "activation")):
        a = oqcore.quantize_tensor(x, key, quantizer="cpu", role=role)
        b = oqcore.quantize_tensor(x, key, quantizer="torch", role=role)
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def _spy(monkeypatch):
    called = []
    real = quant.quantize_int8_rowwise
    monkeypatch.setattr(quant, "quantize_int8_rowwise", lambda x, o=None: called.append(1) or real(x, o))
    return called


@needs_lib
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_falls_back(monkeypatch, bad):
    x = torch.randn(8, 32)
    x[3, 5] = bad
    expected = quant.quantize_int8_rowwise(x)
    called = _spy(monkeypatch)
    q, s = cpu.quantize_int8_rowwise_cpu(x)
    assert called
    assert torch.equal(q, expected[0])
    torch.testing.assert_close(s, expected[1], rtol=0, atol=0, equal_nan=True)


def test_unsupported_inputs_fall_back(monkeypatch):
    called = _spy(monkeypatch)
    for x in (torch.randn(0, 8), torch.randn(5, 8, dtype=torch.float64), torch.randn(16), torch.randn(2, 2, 3, 4)):
        q, s = cpu.quantize_int8_rowwise_cpu(x)
        assert q.shape == x.shape and s.shape == (*x.shape[:-1], 1)
    assert len(called) == 4


def test_eager_fallback_without_compile(monkeypatch):
    """``OQ_COMPILE=0``: no library, the registered cpu quantizer is the torch reference."""
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert cpu.LIBRARY.load() is None
    ok, reason = cpu.kernel_status()
    assert not ok and "OQ_COMPILE=0" in reason
    called = _spy(monkeypatch)
    x = torch.randn(64, 96).bfloat16()
    a = oqcore.quantize_tensor(x, "int8_per_channel_static", quantizer="cpu")
    b = oqcore.quantize_tensor(x, "int8_per_channel_static", quantizer="torch")
    assert called and torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """The same source built without AVX-512 intrinsics (the portable C loop)."""
    import ctypes

    path = str(tmp_path_factory.mktemp("generic") / "k.so")
    try:
        cpu.LIBRARY.build(path, extra_flags=(*cpu.LIBRARY.extra_flags, "-DOQ_GENERIC"))
    except Exception as e:  # pragma: no cover - no compiler
        pytest.skip(f"cannot build the generic kernel: {e}")
    g = ctypes.CDLL(path)
    cpu._bind(g)
    return g


@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_build_bit_exact(generic_lib, dtype):
    for name, x in _cases(dtype, seed=3).items():
        try:
            _assert_same(x, lib=generic_lib)
        except AssertionError as e:
            raise AssertionError(f"generic {name} {dtype}") from e
    _assert_same(torch.randn(3, 5).to(dtype), lib=generic_lib)


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "OQ_COMPILE=0"])
def test_check_finite_raises_on_every_path(monkeypatch, compiled):
    """``check_finite=True`` (the registered quantizer): NonFiniteError from the kernel's own amax
    and from the reference path; the core turns it into an error naming the layer."""
    if not compiled:
        monkeypatch.setenv("OQ_COMPILE", "0")
    x = torch.randn(3, 16, 32)
    q, s = cpu.quantize_int8_rowwise_cpu(x, check_finite=True)
    assert torch.equal(q, quant.quantize_int8_rowwise(x)[0])
    x[2, 5, 1] = float("-inf")
    with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[3, 16, 32\] holds NaN/Inf"):
        cpu.quantize_int8_rowwise_cpu(x, check_finite=True)
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"^layer 'e.w2\[expert 2\]': weight holds 1 NaN/Inf value\(s\) of 512;"):
        oqcore.quantize_tensor(x, "int8_per_channel_static", quantizer="cpu", name="e.w2")
