"""Staging buffers reused across layers during a load, and the chunked parallel checkpoint reader."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore.errors import CheckpointError
from oqcore.loading.checkpoint import TensorReader, file_entries
from oqcore.loading.staging import StagingPool
from oqcore.torch_compat import storage_use_count

needs_use_count = pytest.mark.skipif(storage_use_count(torch.empty(1)) is None, reason="torch does not expose storage use counts")


@needs_use_count
def test_buffers_come_back_and_are_reused_by_shape_and_dtype():
    pool = StagingPool(cap_bytes=1 << 20)
    a = pool.take("layer0", (8, 16), torch.bfloat16)
    b = pool.take("layer0", (4,), torch.float32)
    ptr_a, ptr_b = a.data_ptr(), b.data_ptr()
    del a, b
    pool.give_back("layer0")
    c = pool.take("layer1", (8, 16), torch.bfloat16)
    d = pool.take("layer1", (8, 16), torch.float16)  # other dtype: a fresh buffer
    e = pool.take("layer1", (4,), torch.float32)
    assert c.data_ptr() == ptr_a and e.data_ptr() == ptr_b and d.data_ptr() not in (ptr_a, ptr_b)
    assert pool.reused_bytes == 8 * 16 * 2 + 4 * 4


@needs_use_count
def test_a_buffer_still_referenced_is_not_reused():
    pool = StagingPool(cap_bytes=1 << 20)
    kept = pool.take("layer0", (32,), torch.float32)[4:8]  # e.g. a method keeping a view
    pool.give_back("layer0")
    again = pool.take("layer1", (32,), torch.float32)
    again.fill_(1.0)
    assert again.data_ptr() != kept.data_ptr() - 16 and pool.reused_bytes == 0


@needs_use_count
def test_free_buffers_are_capped():
    pool = StagingPool(cap_bytes=100)
    pool.take("a", (20,), torch.float32)  # 80 bytes: kept
    pool.take("a", (10,), torch.float32)  # 40 more: over the cap, dropped
    pool.give_back("a")
    pool.take("b", (20,), torch.float32)
    pool.take("b", (10,), torch.float32)
    assert pool.reused_bytes == 80


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_chunked_reads_equal_safetensors(tmp_path, threads, monkeypatch):
    import oqcore.loading.checkpoint as ck

    monkeypatch.setattr(ck, "PARALLEL_READ_MIN_BYTES", 4096)  # small tensors take the chunked path too
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(300, 257, generator=g).bfloat16(),
        "odd": torch.randn(12_345, generator=g),
        "small": torch.arange(7, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    ref = load_file(str(path))
    with TensorReader(threads=threads) as reader:
        for e in file_entries(path):
            got = reader.read(e)
            assert got.dtype == ref[e.name].dtype and torch.equal(got, ref[e.name]), e.name


def test_truncated_file_is_an_error_on_the_chunked_path(tmp_path, monkeypatch):
    import oqcore.loading.checkpoint as ck

    monkeypatch.setattr(ck, "PARALLEL_READ_MIN_BYTES", 4096)
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(200, 100)}, str(path))
    entries = file_entries(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with TensorReader(threads=2) as reader, pytest.raises(CheckpointError, match=r"tensor 'w' is truncated \(79000 of 80000 bytes\)"):
        reader.read(entries[0])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.element_size() == 1:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.dtype == b.dtype and torch.equal(a, b)


@needs_use_count
@pytest.mark.parametrize("ckpt_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_load_reuses_staging_buffers_and_matches_quantize_(tiny_moe, ckpt_dtype):
    """Every layer after the first reads into the first one's buffers; the bytes are those of
    quantizing the bf16 model in place, also from an fp32 checkpoint (converted chunk by chunk
    while reading, rounding as ``from_pretrained(dtype=bf16)`` does)."""
    from oqcore.fidelity import reference_model

    path = tiny_moe("mixtral", dtype=ckpt_dtype)
    m = oqcore.load(path, {"linear": "fp8_per_block", "moe": "int8_per_channel_weight_only"})
    st = m.oq_state.stats
    layers = len(m.model.layers)
    assert layers >= 2
    # all quantized weights of every layer but the first came from reused buffers
    assert st.reused_bytes >= st.hp_bytes * (layers - 1) / layers * 0.99
    ref = oqcore.quantize_(reference_model(path, torch.bfloat16), {"linear": "fp8_per_block", "moe": "int8_per_channel_weight_only"})
    got, want = m.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert _same(got[k], want[k]), k


def test_converting_read_in_chunks(tmp_path, monkeypatch):
    """fp32 bytes read into a bf16 tensor through the small scratch (several chunks): the same
    values as ``Tensor.to(bfloat16)``, and a truncated file still names the tensor."""
    import oqcore.loading.checkpoint as ck

    monkeypatch.setattr(ck, "CONVERT_CHUNK_BYTES", 4096)
    w = torch.randn(100, 77, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "model.safetensors"
    save_file({"w": w}, str(path))
    (e,) = file_entries(path)
    with TensorReader(threads=2) as reader:
        out = reader.read_into(e, torch.empty(100, 77, dtype=torch.bfloat16))
        assert torch.equal(out, w.to(torch.bfloat16))
        with pytest.raises(ValueError, match="needs a contiguous CPU torch.float32 tensor"):
            reader.read_into(e, torch.empty(100, 77, dtype=torch.int32))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with TensorReader() as reader, pytest.raises(CheckpointError, match=r"tensor 'w' is truncated \(30790 of 30800 bytes\)"):
        reader.read_into(e, torch.empty(100, 77, dtype=torch.bfloat16))
