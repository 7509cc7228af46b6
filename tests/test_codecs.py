"""The codec contract, parametrized over the registry (issue: codec library extends it)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from actcompile.codecs import available_codecs, get_codec, register_codec
from actcompile.codecs.base import TensorSpec, packed_bytes, relative_error
from actcompile.codecs.bits import pack_bits, unpack_bits
from actcompile.errors import CodecError

# Documented error bounds of the fixed-rate codecs on Gaussian data (relative L2).
GAUSSIAN_BOUND = {"none": 0.0, "int8": 0.01, "int4": 0.15, "int2": 0.6}
QUANTIZERS = ("int8", "int4", "int2")


def _inputs():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(16, 8, 33, generator=g)
    return {"gaussian": gaussian, "post_relu": torch.relu(gaussian),
            "channels_last": torch.randn(4, 8, 6, 6, generator=g).to(memory_format=torch.channels_last),
            "non_contiguous": torch.randn(32, 48, generator=g).t()}


@pytest.mark.parametrize("name", available_codecs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", list(_inputs()))
def test_roundtrip_keeps_shape_dtype_and_declared_size(name, dtype, kind):
    codec = get_codec(name)
    x = _inputs()[kind].to(dtype)
    packed = codec.pack(x)
    y = codec.unpack(packed)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert packed_bytes(packed) == codec.packed_nbytes(TensorSpec.of(x)) or name == "none"
    if name in GAUSSIAN_BOUND and kind != "post_relu":
        err = relative_error(x, y)
        bound = GAUSSIAN_BOUND[name] + (0.01 if dtype != torch.float32 else 0.0)
        assert err <= bound, f"{name}/{dtype}/{kind}: rel err {err:.3g} > {bound}"


@pytest.mark.parametrize("name", QUANTIZERS)
def test_quantizers_keep_zeros_and_signs_of_nonnegative_tensors(name):
    x = torch.relu(torch.randn(64, 300)) * torch.rand(64, 300) ** 4   # many tiny positives
    y = get_codec(name).unpack(get_codec(name).pack(x))
    assert torch.equal(y == 0, x == 0), f"{name}: zero pattern changed"
    assert bool((y >= 0).all()), f"{name}: negative value from a non-negative input"


@pytest.mark.parametrize("name", QUANTIZERS)
def test_size_ratio_matches_bit_width(name):
    codec = get_codec(name)
    spec = TensorSpec((1024, 1024), torch.float32)
    ratio = codec.packed_nbytes(spec) / spec.nbytes
    assert ratio == pytest.approx(codec.bits / 32 + 8 / (256 * 4), rel=1e-6)


def test_mask_is_exact_for_relu_use_and_two_valued_tensors():
    from actcompile.plan import Use

    codec = get_codec("mask")
    x = torch.randn(8, 1000)
    y = codec.unpack(codec.pack(torch.relu(x)))
    assert torch.equal(y > 0, x > 0)
    noise = (torch.rand(8, 1000) > 0.3).float() / 0.7
    assert relative_error(noise, codec.unpack(codec.pack(noise))) == 0.0
    relu6 = codec.exact_for((Use("HardtanhBackward0", (("max_val", 6.0), ("min_val", 0.0))),))
    z = torch.randn(4096) * 4
    inside = (z > 0) & (z < 6)
    w = relu6.unpack(relu6.pack(z))
    assert torch.equal((w > 0) & (w < 6), inside)
    assert codec.exact_for((Use("ReluBackward0"), Use("ConvolutionBackward0"))) is None


@pytest.mark.parametrize("name", [n for n in available_codecs() if n != "none"])  # 'none' keeps anything
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_tensors_are_not_supported(name, dtype):
    assert not get_codec(name).supports(TensorSpec((4, 4), dtype))


@pytest.mark.parametrize("name", available_codecs())
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 0, 2), (1, 1, 1)])
def test_empty_and_single_element_tensors(name, shape):
    codec = get_codec(name)
    x = torch.rand(shape)
    y = codec.unpack(codec.pack(x))
    assert y.shape == x.shape
    if x.numel():
        assert relative_error(x, y) <= GAUSSIAN_BOUND.get(name, 0.0) + 1e-6 or name == "mask"


@pytest.mark.parametrize("name", QUANTIZERS + ("mask",))
def test_pack_and_unpack_trace_with_make_fx(name):
    from torch.fx.experimental.proxy_tensor import make_fx

    codec = get_codec(name)
    x = torch.randn(4, 512)
    packed = codec.pack(x)
    tensors = [p for p in packed if isinstance(p, torch.Tensor)]
    pack_graph = make_fx(lambda t: tuple(p for p in codec.pack(t) if isinstance(p, torch.Tensor)))(x)
    for a, b in zip(pack_graph(x), tensors):
        assert torch.equal(a, b)
    rest = packed[len(tensors):]
    unpack_graph = make_fx(lambda *ts: codec.unpack((*ts, *rest)))(*tensors)
    assert torch.equal(unpack_graph(*tensors), codec.unpack(packed))


def test_stochastic_rounding_uses_its_own_generator_and_is_unbiased():
    codec = get_codec("int2", stochastic=True, seed=3)
    x = torch.linspace(0, 1, 256 * 64).reshape(64, 256)
    state = torch.get_rng_state()
    y = codec.unpack(codec.pack(x))
    assert torch.equal(state, torch.get_rng_state()), "stochastic rounding drew from the global RNG"
    deterministic = get_codec("int2").unpack(get_codec("int2").pack(x))
    bias_stochastic = (y - x).mean().abs().item()
    assert bias_stochastic < 0.01, f"stochastic rounding bias {bias_stochastic:.3g}"
    assert torch.equal(codec.unpack(codec.pack(x)), y), "same seed must give the same rounding"
    assert not torch.equal(y, deterministic)


def test_registry_errors_list_what_exists():
    with pytest.raises(CodecError, match="available: .*int8"):
        get_codec("zstd")
    with pytest.raises(CodecError, match="no option"):
        get_codec("int8", bits=3)
    with pytest.raises(CodecError, match="fixed-rate"):
        get_codec("int8", epsilon=0.1)
    with pytest.raises(CodecError, match="already registered"):
        @register_codec
        class Impostor:  # noqa: F811
            name = "int8"


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_packing_roundtrip(bits):
    values = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       name=st.sampled_from(QUANTIZERS), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_property_quantizers_bound_error_and_size(shape, dtype, name, scale, seed):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    codec = get_codec(name)
    packed = codec.pack(x)
    y = codec.unpack(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert packed_bytes(packed) == codec.packed_nbytes(TensorSpec.of(x))
    # per-group error is at most half a step of the group's range, so ≤ range/(2·levels)·√n
    levels = 2**codec.bits - 1
    x32, y32 = x.float(), y.float()
    assert (x32 - y32).abs().max() <= (x32.max() - x32.min()) / levels * 0.5 + 1e-2 * x32.abs().max() + 1e-6
