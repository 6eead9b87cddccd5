"""Peak resident memory of an online load stays within (loaded model bytes + largest single layer in
bf16) x 1.15 over the process baseline, on a synthetic ~300 MB bf16 MoE checkpoint.

Measured in fresh processes (the kernel's own high-water mark, VmHWM), so nothing a previous test
allocated is counted or hidden; the checkpoint is read without mmap, so its pages count only while
a tensor is alive.
"""

import json
import subprocess
import sys

import pytest

LOAD = """
import json, sys, oqcore
m = oqcore.load(sys.argv[1], json.loads(sys.argv[2]))
s = m.oq_state.stats
print(json.dumps({"peak_added": s.peak_added, "model": s.model_bytes, "largest": s.largest_layer_bytes,
                  "read": s.bytes_read}))
"""


@pytest.mark.parametrize("config", ["fp8_per_block", {"moe": "int8_per_channel_weight_only"}], ids=["fp8-block", "int8-moe"])
def test_online_load_peak_memory_bound(big_checkpoint, config):
    env = {"OQ_DISABLE_TRITON": "1"}
    import os

    out = subprocess.run([sys.executable, "-c", LOAD, str(big_checkpoint), json.dumps(config)],
                         capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    s = json.loads(out.stdout.strip().splitlines()[-1])
    assert s["read"] > 300e6  # the checkpoint really is a few hundred MB of bf16
    bound = (s["model"] + s["largest"]) * 1.15
    print(f"peak added {s['peak_added'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, read {s['read'] / 2**20:.1f} MiB")
    assert s["peak_added"] <= bound
    assert s["peak_added"] < 0.75 * s["read"]
