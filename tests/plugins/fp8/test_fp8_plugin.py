"""The plugin's hooks: registrations, backend candidates, and a cheap import."""

from __future__ import annotations

import subprocess
import sys

import torch

import oqcore

WEIGHTS = {
    # + static per-tensor activations (a calibrated input_scale read from a checkpoint)
    "fp8_per_tensor_static": {None, "fp8_per_tensor_dynamic", "fp8_per_token", "fp8_per_tensor_static"},
    "fp8_per_channel_static": {None, "fp8_per_token", "fp8_per_tensor_dynamic"},
    "fp8_per_block_static": {None, "fp8_per_block_dynamic"},
}


def test_methods_and_quantizers_registered():
    reg = oqcore.get_registry()
    for kind in ("linear", "moe"):
        for name, acts in WEIGHTS.items():
            entry = reg.method(kind, oqcore.quant_key(name))
            assert entry is not None and entry.plugin == "fp8"
            cls = entry.cls
            assert {None if k is None else reg.name_of(k, "activation") for k in cls.supported_activation_keys} == acts
    for name in ("fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static"):
        for backend in ("torch", "triton"):
            assert (oqcore.quant_key(name), backend) in reg.quantizers
    for name in ("fp8_per_tensor_dynamic", "fp8_per_token", "fp8_per_block_dynamic"):
        assert (oqcore.quant_key(name, "activation"), "torch") in reg.quantizers


def test_backend_candidates_cover_every_activation_with_reasons():
    pm = oqcore.get_plugin_manager()
    reg = pm.registry
    for kind in ("linear", "moe"):
        for name, acts in WEIGHTS.items():
            cands = [b for b in pm.backend_candidates(kind, oqcore.quant_key(name)) if b.plugin == "fp8"]
            by = {(b.name, None if b.activation_key is None else reg.name_of(b.activation_key, "activation")): b for b in cands}
            # static input scales: only the torch reference reads the stored input_scale
            dynamic = {a for a in acts if a != "fp8_per_tensor_static"}
            expected = {(n, a) for n in ("torch", "triton", "cpu") for a in dynamic}
            expected |= {("torch", a) for a in acts - dynamic}
            if kind == "linear" and name != "fp8_per_block_static":
                expected |= {("scaled-mm", a) for a in dynamic if a is not None}
            assert set(by) == expected
            for (bname, act), b in by.items():
                ok, why = b.is_supported(None, torch.device("cpu"))
                assert why and ok == (bname != "scaled-mm")  # torch anywhere, triton under the interpreter
                if bname == "triton":
                    assert b.priority == 100 and b.forward is not None
                    need = "8.0" if act is None else "8.9"
                    assert f">= {need}" in b.description
                    ok, why = b.is_supported(None, torch.device("cuda"))
                    if not torch.cuda.is_available():
                        assert not ok and "CUDA" in why
                elif bname == "scaled-mm":
                    ok, why = b.is_supported(torch.nn.Linear(64, 64), torch.device("cpu"))
                    assert not ok and "CUDA only" in why
                elif bname == "cpu":
                    assert b.priority == 50 and b.forward is not None and "CPU" in b.description
                    assert not b.is_supported(None, torch.device("cuda"))[0]
                else:
                    assert b.priority == 0 and b.forward is None
    assert pm.backend_candidates("linear", oqcore.quant_key("int8_per_channel_static")) == [] or all(
        b.plugin != "fp8" for b in pm.backend_candidates("linear", oqcore.quant_key("int8_per_channel_static"))
    )


def test_plugin_import_and_registration_do_not_import_triton():
    code = (
        "import sys\n"
        "import oq_plugin_fp8.plugin as p\n"
        "calls = []\n"
        "p.oq_register_quant_keys(lambda *a, **k: calls.append(a))\n"
        "p.oq_register_schemes(lambda *a, **k: calls.append(a))\n"
        "from oq_plugin_fp8 import keys\n"
        "scheme = calls[-1][0]\n"
        "assert scheme.backends('linear', None)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "print(len(calls), sum(len(f.implementations) for s in calls[6:] for f in s[0].formats()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # 6 keys + 3 schemes; each scheme's formats (weight + activations: 3 + 3 + 2) carry 4 implementations
    # (torch + triton + cpu + compiled)
    assert out.stdout.split() == [str(6 + 3), str(4 * (4 + 3 + 2))]  # per tensor: 3 dynamic pairings + static
