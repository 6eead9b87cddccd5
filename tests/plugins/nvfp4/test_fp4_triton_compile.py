"""Every Triton kernel of oq-plugin-mxfp4 and oq-plugin-nvfp4 compiles ahead of time for CUDA with
Triton's own ptxas, without a GPU (one subprocess without TRITON_INTERPRET): what the interpreter
lets through but the GPU compiler refuses (dot operand dtypes and shapes, bitcasts, NaN constants)
fails here. Each at the minimum compute capability its support check states (sm_80 for bf16 /
float32 dots, sm_89 for float8_e4m3fn dots), and the bf16 / fp8 dots must lower to tensor-core
``mma`` instructions (the float32 IEEE ones to FMAs). fp16 takes the bf16 code path."""

import pytest

pytest.importorskip("triton")
pytest.importorskip("oq_plugin_mxfp4.kernels.gemm")
pytest.importorskip("oq_plugin_nvfp4.kernels.gemm")

from fp4_kernel_reference import compile_for_cuda

MOE_ROUTING = {"sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "weights_ptr": "*fp32", "num_valid": "i32"}


def spec(module, kernel, pointers, ints, consts, cap):
    sig = {**pointers, **{k: "i32" for k in ints}, **{k: "constexpr" for k in consts}}
    return (module, kernel, sig, consts, cap)


def specs():
    out = []
    # mxfp4 GEMM / MoE: bf16 and float32 activations (W4A16, sm_80), fp8 (W4A8, sm_89), packed
    # e2m1 bytes (W4A4, bf16 dots, sm_80)
    for a_dt, fmt, cap in (("bf16", 0, 80), ("fp32", 0, 80), ("fp8e4nv", 1, 89), ("u8", 2, 80)):
        c = {"A_FMT": fmt, "HAS_BIAS": True, "F32_DOT": a_dt == "fp32", "BLOCK_M": 16, "BLOCK_N": 32}
        ptrs = {
            "a_ptr": "*" + a_dt,
            "as_ptr": "*u8",
            "b_ptr": "*u8",
            "bs_ptr": "*u8",
            "bias_ptr": "*bf16",
            "c_ptr": "*fp32",
        }
        out.append(spec("oq_plugin_mxfp4.kernels.gemm", "_mxfp4_gemm_kernel", ptrs, ("M", "N", "K"), c, cap))
        moe_ptrs = {**ptrs, **{k: v for k, v in MOE_ROUTING.items() if k != "num_valid"}}
        out.append(
            spec(
                "oq_plugin_mxfp4.kernels.moe",
                "_mxfp4_moe_kernel",
                moe_ptrs,
                ("num_valid", "N", "K"),
                {"A_ROW_DIV": 2, **c, "MUL_WEIGHT": True},
                cap,
            )
        )
    # nvfp4 GEMM / MoE: bf16 and float32 activations (W4A16), packed e2m1 ones (W4A4, bf16 dots); sm_80
    for a_dt, fp4 in (("bf16", False), ("fp32", False), ("u8", True)):
        c = {"A_FP4": fp4, "HAS_BIAS": True, "F32_DOT": a_dt == "fp32", "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}
        ptrs = {"a_ptr": "*" + a_dt, "as_ptr": "*u8", "ag_ptr": "*fp32", "b_ptr": "*u8", "bs_ptr": "*u8"}
        ptrs = {**ptrs, "g_ptr": "*fp32", "bias_ptr": "*bf16", "c_ptr": "*fp32"}
        out.append(spec("oq_plugin_nvfp4.kernels.gemm", "_nvfp4_gemm_kernel", ptrs, ("M", "N", "K"), c, 80))
        moe_ptrs = {**ptrs, **{k: v for k, v in MOE_ROUTING.items() if k != "num_valid"}}
        moe_c = {"A_ROW_DIV": 1 if fp4 else 2, **c, "MUL_WEIGHT": True}
        out.append(
            spec("oq_plugin_nvfp4.kernels.moe", "_nvfp4_moe_kernel", moe_ptrs, ("num_valid", "N", "K"), moe_c, 80)
        )
    # quantizers (sm_80: integer and float32 arithmetic only)
    for dt in ("fp32", "bf16"):
        for floor in (False, True):
            out.append(
                spec(
                    "oq_plugin_mxfp4.kernels.quant",
                    "_mxfp4_quant_kernel",
                    {"x_ptr": "*" + dt, "q_ptr": "*u8", "s_ptr": "*u8"},
                    ("R", "NBLK"),
                    {"FLOOR": floor, "BLOCK_R": 16, "BLOCK_B": 4},
                    80,
                )
            )
        out.append(
            spec(
                "oq_plugin_nvfp4.kernels.quant",
                "_nvfp4_quant_kernel",
                {"x_ptr": "*" + dt, "g_ptr": "*fp32", "q_ptr": "*u8", "s_ptr": "*u8"},
                ("R", "NBLK", "ROWS_PER_G"),
                {"BLOCK_R": 16, "BLOCK_B": 4},
                80,
            )
        )
    return out


def test_every_fp4_kernel_compiles_for_cuda():
    todo = specs()
    results = compile_for_cuda(todo)
    assert len(results) == len(todo)
    for (module, kernel, sig, consts, cap), r in zip(todo, results):
        what = f"{kernel} a={sig.get('a_ptr', sig.get('x_ptr'))} sm_{cap}"
        assert r["cubin_bytes"] > 0, what
        if kernel.endswith("_quant_kernel"):
            continue
        assert r["mma"] == (sig["a_ptr"] != "*fp32"), what
