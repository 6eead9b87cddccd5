"""Battery: loads are thread-safe and leave no process-wide state changed.

transformers' ``_from_config(dtype=...)`` builds a model under ``torch.set_default_dtype`` (process
wide): two threads loading at once could get float32 parameters. oqcore builds under a thread-local
torch function mode instead (:class:`oqcore.loading.meta.DefaultFloatMode`). These tests force the
interleavings that broke the old build deterministically (with events, not timing), check the mode
against transformers' own build over many architectures, and load several models in parallel
threads, comparing every byte with a serial load.
"""

from __future__ import annotations

import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

import oqcore
from oqcore import CheckpointError, UnsupportedLayerError
from oqcore.loading.meta import DefaultFloatMode, _keep_in_fp32, build_meta_model
from tests.battery.st_forge import replace_tensor
from tests.battery.util import raises_naming

WAIT_S = 60  # a generous bound on event waits, so a broken build fails instead of hanging


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def _signature(model) -> dict:
    return {("p", n): (t.dtype, tuple(t.shape)) for n, t in model.named_parameters()} | {
        ("b", n): (t.dtype, tuple(t.shape)) for n, t in model.named_buffers()
    }


def _floating_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


def _run(name, fn, results):
    def target():
        try:
            results[name] = fn()
        except BaseException as e:  # reported by the test, not lost in the thread
            results[name] = e

    t = threading.Thread(target=target, name=name)
    t.start()
    return t


def _bytes_equal(a: dict, b: dict) -> list[str]:
    """Names whose dtype, shape or bytes differ between two state dicts (plus missing names)."""
    bad = sorted(a.keys() ^ b.keys())
    for k in a.keys() & b.keys():
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            bad.append(k)
        elif x.numel() and not torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8)):
            bad.append(k)
    return bad


# ---- the meta build --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_build_never_sets_the_process_default_dtype(tiny_moe, monkeypatch, dtype):
    path = tiny_moe("mixtral")  # made (by transformers, under set_default_dtype) before the patch

    def refuse(d):
        raise AssertionError(f"torch.set_default_dtype({d}) called during a build")

    monkeypatch.setattr(torch, "set_default_dtype", refuse)
    model = build_meta_model(path, dtype)
    assert _floating_dtypes(model) == {dtype}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # made with an explicit float32
    assert model.config.dtype == dtype


def test_other_threads_see_the_process_default_during_a_build(tiny_moe, monkeypatch):
    """While one thread is inside a bf16 build, another thread creates tensors in the process default."""
    from transformers.models.mixtral import modeling_mixtral as mm

    path = tiny_moe("mixtral")  # made before the hook is installed
    seen: list = []
    orig = mm.MixtralRMSNorm.__init__

    def hooked(self, *a, **k):
        orig(self, *a, **k)
        if not seen:
            out: dict = {}
            _run("observer", lambda: (torch.get_default_dtype(), torch.empty(2).dtype, torch.tensor(1.5).dtype), out).join(WAIT_S)
            seen.append(out["observer"])
            seen.append((torch.empty(2).dtype, torch.get_default_dtype()))  # this thread: the build's dtype

    monkeypatch.setattr(mm.MixtralRMSNorm, "__init__", hooked)
    model = build_meta_model(path, torch.bfloat16)
    assert seen[0] == (torch.float32, torch.float32, torch.float32)
    assert seen[1] == (torch.bfloat16, torch.float32)
    assert _floating_dtypes(model) == {torch.bfloat16}


def test_interleaved_builds_keep_their_dtypes(tiny_moe, monkeypatch):
    """The interleaving that gave float32 parameters: B starts building inside A's build, A finishes
    (transformers restored the process default to float32 here), then B builds the rest."""
    from transformers.models.mixtral import modeling_mixtral as mm

    path = tiny_moe("mixtral")
    results: dict = {}
    threads: dict = {}
    b_inside, a_done = threading.Event(), threading.Event()
    orig = mm.MixtralRMSNorm.__init__

    def hooked(self, *a, **k):
        orig(self, *a, **k)
        me = threading.current_thread().name
        if me == "A" and "B" not in threads:
            threads["B"] = _run("B", lambda: build_meta_model(path, torch.float16), results)
            assert b_inside.wait(WAIT_S)
        elif me == "B" and not b_inside.is_set():
            b_inside.set()
            assert a_done.wait(WAIT_S)

    monkeypatch.setattr(mm.MixtralRMSNorm, "__init__", hooked)
    _run("A", lambda: build_meta_model(path, torch.bfloat16), results).join(WAIT_S)
    a_done.set()
    threads["B"].join(WAIT_S)
    for name in ("A", "B"):
        if isinstance(results.get(name), BaseException):
            raise results[name]
    assert _floating_dtypes(results["A"]) == {torch.bfloat16}
    assert _floating_dtypes(results["B"]) == {torch.float16}
    assert torch.get_default_dtype() == torch.float32


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
ARCHS = ["llama", "mixtral", "qwen3_moe", "olmoe", "gpt_oss", "qwen2_moe", "deepseek_v3", "gemma2", "falcon", "apertus", "gpt2", "bert", "t5", "jamba", "glm4_moe"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_build_matches_transformers_default_dtype_build(tmp_path, arch, dtype):
    """Same parameter and buffer names, dtypes and shapes as transformers' own ``_from_config(dtype=)``
    (which sets the process default dtype): the thread-local mode is a faithful stand-in."""
    import transformers
    from transformers import AutoConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(arch, **TINY)
        cfg.save_pretrained(tmp_path)
        ours = build_meta_model(tmp_path, dtype)
        cls = type(ours)
        with torch.device("meta"):
            ref = cls._from_config(transformers.AutoConfig.from_pretrained(tmp_path), dtype=dtype)
    _keep_in_fp32(ref, dtype)
    assert torch.get_default_dtype() == torch.float32
    assert _signature(ours) == _signature(ref)


def test_keep_in_fp32_modules_as_from_pretrained(tiny_moe):
    """gpt-oss keeps its norms in float32 under fp16 (``_keep_in_fp32_modules``), as
    ``from_pretrained`` does; the loaded model runs."""
    from transformers import AutoModelForCausalLM

    path = tiny_moe("gpt_oss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    ours = oqcore.load(path, "fp8_per_tensor", dtype=torch.float16)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters()}
    quantized = tuple(f"{w}." for w in ours.oq_state.wrappers)
    plain = {n: p.dtype for n, p in ours.named_parameters() if n in ref_dtypes and not n.startswith(quantized)}
    assert len(plain) > 10
    assert plain == {n: ref_dtypes[n] for n in plain}
    assert ours.model.norm.weight.dtype == torch.float32
    assert ours.model.layers[0].input_layernorm.weight.dtype == torch.float32
    out = ours(torch.tensor([[1, 5, 7]])).logits
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


MODE_CASES = [
    ("empty", lambda: torch.empty(2), torch.bfloat16),
    ("ones", lambda: torch.ones(2, 3), torch.bfloat16),
    ("full-float", lambda: torch.full((2,), 0.5), torch.bfloat16),
    ("full-int", lambda: torch.full((2,), 3), torch.int64),
    ("tensor-float", lambda: torch.tensor([1.5]), torch.bfloat16),
    ("tensor-int", lambda: torch.tensor([1, 2]), torch.int64),
    ("arange-int", lambda: torch.arange(4), torch.int64),
    ("arange-float", lambda: torch.arange(0.0, 2.0, 0.5), torch.bfloat16),
    ("int-div-int", lambda: torch.arange(4) / 2, torch.bfloat16),
    ("explicit-float32", lambda: torch.zeros(2, dtype=torch.float32), torch.float32),
    ("explicit-cast", lambda: torch.arange(4).float(), torch.float32),
    ("explicit-to", lambda: torch.arange(4).to(torch.float32), torch.float32),
    ("from-float32-array", lambda: torch.tensor(np.zeros(2, dtype=np.float32)), torch.float32),
    ("as-tensor-of-tensor", lambda: torch.as_tensor(torch.zeros(2, dtype=torch.float32)), torch.float32),
    ("like", lambda: torch.zeros_like(torch.zeros(2, dtype=torch.float64)), torch.float64),
    ("linear", lambda: torch.nn.Linear(3, 2).weight, torch.bfloat16),
]


@pytest.mark.parametrize("make,dtype", [c[1:] for c in MODE_CASES], ids=[c[0] for c in MODE_CASES])
def test_default_float_mode_follows_set_default_dtype(make, dtype):
    """Each tensor gets the dtype it would get under ``torch.set_default_dtype(bfloat16)``."""
    with DefaultFloatMode(torch.bfloat16):
        got = make().dtype
    assert got == dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        assert make().dtype == dtype  # the reference semantics
    finally:
        torch.set_default_dtype(prev)


# ---- whole loads in parallel -----------------------------------------------------------------

JOBS = [
    ("mixtral", torch.bfloat16, "fp8_per_block"),
    ("qwen3_moe", torch.float16, "mxfp8"),
    ("olmoe", torch.float32, "int8_per_channel_weight_only"),
    ("gpt_oss", torch.bfloat16, "fp8_per_tensor"),
]


def test_parallel_loads_equal_serial_loads(tiny_moe):
    """Four different models in four dtypes load at once (started together at a barrier, twice):
    every parameter and buffer has the dtype and the bytes of a serial load."""
    paths = {arch: tiny_moe(arch) for arch, _, _ in JOBS}
    serial = {arch: oqcore.load(paths[arch], cfg, dtype=dt).state_dict() for arch, dt, cfg in JOBS}
    for arch, dt, _ in JOBS:
        floating = {t.dtype for k, t in serial[arch].items() if t.is_floating_point() and "norm" in k}
        assert floating == ({torch.float32} if (arch, dt) == ("gpt_oss", torch.float16) else {dt})
    for _ in range(2):
        barrier = threading.Barrier(len(JOBS))
        results: dict = {}

        def job(arch, dt, cfg):
            barrier.wait(WAIT_S)
            return oqcore.load(paths[arch], cfg, dtype=dt).state_dict()

        threads = [_run(arch, (lambda a=arch, d=dt, c=cfg: job(a, d, c)), results) for arch, dt, cfg in JOBS]
        for t in threads:
            t.join(5 * WAIT_S)
        for arch, _, _ in JOBS:
            if isinstance(results.get(arch), BaseException):
                raise results[arch]
            assert _bytes_equal(results[arch], serial[arch]) == [], arch
    assert torch.get_default_dtype() == torch.float32


def test_load_under_another_process_default(tiny_moe):
    """A user who set float64 as the process default gets the same model, and keeps float64."""
    path = tiny_moe("mixtral")
    ref = oqcore.load(path, "fp8_per_block").state_dict()
    torch.set_default_dtype(torch.float64)
    try:
        got = oqcore.load(path, "fp8_per_block").state_dict()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert _bytes_equal(got, ref) == []


# ---- nothing global stays changed ------------------------------------------------------------


def _global_state() -> dict:
    import transformers

    return {
        "default_dtype": torch.get_default_dtype(),
        "default_device": str(torch.get_default_device()),
        "num_threads": torch.get_num_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "function_modes": torch._C._len_torch_function_stack(),
        "rng": torch.get_rng_state(),
        "linspace": torch.linspace,
        "hf_verbosity": transformers.logging.get_verbosity(),
        "warning_filters": list(warnings.filters),
    }


def _assert_same_state(before: dict) -> None:
    after = _global_state()
    assert after.keys() == before.keys()
    for k in before:
        same = torch.equal(after[k], before[k]) if k == "rng" else after[k] == before[k]
        assert same, f"process-wide {k} changed: {before[k]!r} -> {after[k]!r}"


def test_successful_load_leaves_global_state(tiny_moe):
    before = _global_state()
    oqcore.load(tiny_moe("qwen3_moe"), "fp8_per_block", dtype=torch.float16)
    _assert_same_state(before)


def test_load_refused_from_headers_leaves_global_state(tiny_moe, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), d)
    replace_tensor(d / "model.safetensors", "model.norm.weight", torch.ones(7, dtype=torch.bfloat16))
    before = _global_state()
    with raises_naming(CheckpointError, str(d / "model.safetensors"), "'model.norm.weight'", "[7]"):
        oqcore.load(d, "fp8_per_block")
    _assert_same_state(before)


def test_load_failing_midway_leaves_global_state(tiny_moe, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), d)
    w = torch.zeros(80, 160, dtype=torch.bfloat16)
    w[3, 3] = float("nan")
    replace_tensor(d / "model.safetensors", "model.layers.1.self_attn.v_proj.weight", w)
    before = _global_state()
    with raises_naming(UnsupportedLayerError, "model.layers.1.self_attn.v_proj", "NaN"):
        oqcore.load(d, "fp8_per_block")
    _assert_same_state(before)
