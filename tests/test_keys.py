"""QuantKey, GroupShape, ScaleDesc and the name registry (role-aware names, did-you-mean)."""

import pytest
import torch

import oqcore
from oqcore import ConfigError, GroupShape, QuantKey, ScaleDesc, UnknownKeyError


def test_group_shape_standard_shapes_and_str():
    assert GroupShape.PER_TENSOR == GroupShape(-1, -1) and GroupShape.PER_TENSOR.is_per_tensor
    assert GroupShape.PER_TOKEN == GroupShape(1, -1) and GroupShape.PER_TOKEN.is_per_token
    assert GroupShape.PER_CHANNEL == GroupShape(-1, 1) and GroupShape.PER_CHANNEL.is_per_channel
    assert GroupShape(1, 32).is_per_group and not GroupShape(128, 128).is_per_group
    assert [str(g) for g in (GroupShape.PER_TENSOR, GroupShape.PER_TOKEN, GroupShape.PER_CHANNEL, GroupShape(128, 128))] == [
        "per-tensor",
        "per-token",
        "per-channel",
        "128x128",
    ]


@pytest.mark.parametrize("bad", [(0, 1), (1, -2), (1.5, 1)])
def test_group_shape_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="positive ints or -1"):
        GroupShape(*bad)


def test_quant_key_is_frozen_hashable_and_readable():
    a = QuantKey(torch.int8, ScaleDesc(torch.float32, True, GroupShape.PER_CHANNEL))
    b = QuantKey(torch.int8, ScaleDesc(torch.float32, True, GroupShape(-1, 1)))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    with pytest.raises(AttributeError):
        a.dtype = torch.uint8
    assert str(a) == "int8[float32 static per-channel]"
    asym = QuantKey(torch.uint8, ScaleDesc(torch.float32, False, GroupShape(1, 128)), symmetric=False)
    assert str(asym) == "uint8[float32 dynamic 1x128, asym]"


def test_role_aware_names_mxfp8():
    w = oqcore.quant_key("mxfp8")
    a = oqcore.quant_key("mxfp8", role="activation")
    assert w != a
    assert w.scale.static is True and a.scale.static is False
    assert w.scale.group_shape == a.scale.group_shape == GroupShape(1, 32)


def test_dynamic_only_name_is_refused_as_weight():
    with pytest.raises(ConfigError, match="'fp8_per_token' is not valid as a weight key; weight keys: fp8_per_block_static"):
        oqcore.quant_key("fp8_per_token")
    assert oqcore.quant_key("fp8_per_token", "activation").scale.group_shape == GroupShape.PER_TOKEN


def test_unknown_name_has_did_you_mean():
    with pytest.raises(UnknownKeyError) as e:
        oqcore.quant_key("fp8_per_blok_static")
    assert "unknown weight quantization key 'fp8_per_blok_static'; did you mean 'fp8_per_block_static'?" in str(e.value)


def test_bad_role_is_config_error():
    with pytest.raises(ConfigError, match="role must be 'weight' or 'activation', got 'bias'"):
        oqcore.quant_key("mxfp8", role="bias")


def test_list_quant_keys_names_the_providing_plugin():
    infos = {i.name: i for i in oqcore.list_quant_keys()}
    expected = {
        "fp8_per_tensor_static": "fp8",
        "fp8_per_tensor_dynamic": "fp8",
        "fp8_per_token": "fp8",
        "fp8_per_channel_static": "fp8",
        "fp8_per_block_static": "fp8",
        "fp8_per_block_dynamic": "fp8",
        "mxfp8": "mxfp8",
        "int8_per_channel_static": "int8",
        "int8_per_token": "int8",
    }
    assert {n: infos[n].plugin for n in expected} == expected
    assert infos["fp8_per_block_static"].weight.scale.group_shape == GroupShape(128, 128)
    assert infos["fp8_per_block_dynamic"].activation.scale.group_shape == GroupShape(1, 128)
    assert infos["int8_per_channel_static"].weight.dtype == torch.int8


def test_aliases_resolve(seeded):
    from toy_scheme import TOY, register_toy

    register_toy()
    assert oqcore.quant_key("toy4") == TOY
    assert {i.name: i.aliases for i in oqcore.list_quant_keys()}["toy_int4"] == ("toy4",)
