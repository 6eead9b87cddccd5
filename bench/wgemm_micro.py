"""Micro-benchmark of oq_toolkit.wgemm vs bf16 F.linear (4096x4096 by default), best of 20, ms.

    python bench/wgemm_micro.py [--n 4096 --k 4096 --ms 1,4,16,64,256 --path 0 --threads T --clock wall|thread]
                                [--epilogue] [--reps 20] [--only "fp8 block"]

``--epilogue``: both sides add a bias and return bf16 (``F.linear(x, w, b)`` against
``wgemm(..., bias=b32, out_dtype=torch.bfloat16)``), as a bf16 model's forward does.
``--only``: run only the weight cases whose name contains this text (e.g. ``--only e2m1``: the
4-bit mxfp4 / nvfp4 weights, bf16 and mxfp8 activations).
MiniLM layers (the default ``oq quantize`` model)::

    for kn in "384 384" "384 1536" "1536 384"; do set -- $kn
      python bench/wgemm_micro.py --k $1 --n $2 --ms 64,144,304,608 --threads 2 --epilogue --reps 200 --only "fp8 block"
    done

Rows: weight format / grid x activation format / grid; columns: M. Ratios are bf16 time / wgemm
time, the bf16 ``F.linear`` timed paired with each wgemm cell (alternating calls, same shape,
:func:`best_pair`; the faster of that and the bf16 row's own time, so a disturbed pair cannot
flatter wgemm; >= 1.0 means wgemm is at least as fast as bf16).

``--clock thread`` (with ``--threads 1``) times the calling thread's CPU time instead of the wall
clock: on a machine shared with other jobs the wall clock of a 2-thread call is dominated by
preemption (the same bf16 call measured 1.1 to 15 ms within minutes), CPU time much less."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import oq_toolkit.wgemm as W


CLOCK = time.perf_counter


REPS = 20


def best(f, reps=None):
    """Best of ``reps`` (default :data:`REPS`) timed calls of ``f()`` after two warm-up calls, in
    milliseconds of :data:`CLOCK` (wall clock, or the calling thread's CPU time with ``--clock thread``)."""
    reps = reps or REPS
    f()
    f()
    t = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        f()
        t = min(t, CLOCK() - t0)
    return t * 1e3


def best_pair(f, g, reps=None):
    """``(best f, best g)`` in ms over ``reps`` rounds that call ``f`` then ``g`` (after two warm-up
    rounds): the two are timed side by side, so a burst of other processes hits both."""
    reps = reps or REPS
    for _ in range(2):
        f()
        g()
    tf = tg = float("inf")
    for _ in range(reps):
        t0 = CLOCK()
        f()
        t1 = CLOCK()
        g()
        t2 = CLOCK()
        tf, tg = min(tf, t1 - t0), min(tg, t2 - t1)
    return tf * 1e3, tg * 1e3


def cases(n, k):
    """Weight operands ``[n, k]`` per scheme: ``{name: (codes uint8, q_fmt, scale grid, (rows, cols, ld), wgemm kwargs)}``
    for fp8 128x128 blocks, fp8 per-channel, mxfp8 (e8m0 1x32), int8 per-channel, and the 4-bit
    e2m1 weights of mxfp4 (e8m0 1x32) and nvfp4 (float8_e4m3fn 1x16, ``w_scale_mul`` = 1 / global
    scale) (random codes and scales)."""
    nk128, nk32, nk16 = -(-k // 128), -(-k // 32), -(-k // 16)
    e4 = (torch.randn(n, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    i8 = torch.randint(-127, 128, (n, k), dtype=torch.int8).view(torch.uint8)
    f4 = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    return {
        "fp8 block 128x128": (e4, W.E4M3, torch.rand(-(-n // 128), nk128) + 0.5, (128, 128, nk128), {}),
        "fp8 channel": (e4, W.E4M3, torch.rand(n) + 0.5, (1, k, 1), {}),
        "mxfp8 1x32 e8m0": (e4, W.E4M3, torch.randint(120, 130, (n, nk32), dtype=torch.uint8), (1, 32, nk32), {}),
        "int8 channel": (i8, W.INT8, torch.rand(n) + 0.5, (1, k, 1), {}),
        "mxfp4 e2m1 1x32 e8m0": (f4, W.E2M1, torch.randint(120, 130, (n, nk32), dtype=torch.uint8), (1, 32, nk32), {}),
        "nvfp4 e2m1 1x16 e4m3": (f4, W.E2M1, (torch.rand(n, nk16) * 400 + 1).to(torch.float8_e4m3fn), (1, 16, nk16),
                                 {"w_scale_mul": 1 / 2688.0}),
    }


def acts(m, k, weight):
    """Activation operands ``[m, k]`` that pair with ``weight`` (a :func:`cases` name):
    ``{name: (a, a_fmt, scale grid or None, grid or None)}``: bf16 always, plus the W8A8 codes the
    scheme's activation keys produce (e4m3 per-token / 1x128, int8 per-token, e4m3 1x32 e8m0)."""
    a = torch.randn(m, k).bfloat16()
    out = {"bf16": (a, W.BF16, None, None)}
    if weight.startswith("fp8"):
        codes = (torch.randn(m, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        out["e4m3 per-token"] = (codes, W.E4M3, torch.rand(m) + 0.5, (1, k, 1))
        nk = -(-k // 128)
        out["e4m3 1x128"] = (codes, W.E4M3, torch.rand(m, nk) + 0.5, (1, 128, nk))
    if weight.startswith("int8"):
        codes = torch.randint(-127, 128, (m, k), dtype=torch.int8).view(torch.uint8)
        out["int8 per-token"] = (codes, W.INT8, torch.rand(m) + 0.5, (1, k, 1))
    if weight.startswith(("mxfp8", "mxfp4", "nvfp4")):  # mxfp8 activations (W8A8 / W4A8)
        codes = (torch.randn(m, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
        nk = -(-k // 32)
        out["e4m3 1x32 e8m0"] = (codes, W.E4M3, torch.randint(120, 130, (m, nk), dtype=torch.uint8), (1, 32, nk))
    return out


def main():
    """Command line: print a table of ``wgemm`` times (ms) vs bf16 ``F.linear`` for every weight x
    activation case at each M (``--ms``), with the ratio bf16 / wgemm."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--ms", default="1,4,16,64,256")
    ap.add_argument("--path", type=int, default=0, help="0 auto, 1 AMX, 2 AVX512-BF16, 3 portable")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall", help="thread: CPU time of the calling thread (use with --threads 1)")
    ap.add_argument("--epilogue", action="store_true", help="bias + bf16 output on both sides")
    ap.add_argument("--reps", type=int, default=20, help="best of this many calls")
    ap.add_argument("--only", default="", help="weight cases whose name contains this text")
    args = ap.parse_args()
    global CLOCK, REPS
    REPS = args.reps
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if torch.get_num_threads() != 1:
            ap.error("--clock thread needs --threads 1 (other threads' CPU time is not counted)")
        CLOCK = time.thread_time
    ms = [int(v) for v in args.ms.split(",")]
    n, k = args.n, args.k
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, clock {args.clock}, {W.kernel_status()[1]}, path {args.path}"
          f"{', bias + bf16 output' if args.epilogue else ''}, N={n} K={k}, best of {args.reps}")
    wb = torch.randn(n, k).bfloat16()
    bias = torch.randn(n).bfloat16() if args.epilogue else None
    epi = dict(bias=bias.float(), out_dtype=torch.bfloat16) if args.epilogue else {}
    base = {}
    for m in ms:
        x = torch.randn(m, k).bfloat16()
        base[m] = best(lambda: F.linear(x, wb, bias))
    print(f"{'case':40s}" + "".join(f"{'M=' + str(m):>16s}" for m in ms))
    print(f"{'bf16 F.linear (ms)':40s}" + "".join(f"{base[m]:16.2f}" for m in ms))
    for wname, (q, qf, sw, gw, wkw) in cases(n, k).items():
        if args.only not in wname:
            continue
        for aname in acts(1, k, wname):
            row = []
            for m in ms:
                a, af, sa, ga = acts(m, k, wname)[aname]
                x = a if af == W.BF16 else torch.randn(m, k).bfloat16()
                t, tb = best_pair(lambda: W.wgemm_eager(a, af, sa, ga, q, qf, sw, gw, path=args.path, **epi, **wkw),
                                  lambda: F.linear(x, wb, bias))
                row.append(f"{t:8.2f} {min(tb, base[m]) / t:5.2f}x")
            print(f"{wname + ' / ' + aname:40s}" + "".join(f"{c:>16s}" for c in row))


if __name__ == "__main__":
    main()
