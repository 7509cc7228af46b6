"""Compiled codec kernels (actcompile/codecs/kernels.py): the same bytes and values as eager, cached,
and an eager fallback where compilation fails. Speed is measured in benchmarks/codecs.py."""

import dataclasses
import warnings
from typing import ClassVar

import pytest
import torch
from torch.utils._pytree import tree_leaves

from actcompile import actcompile
from actcompile.codecs import get_codec
from actcompile.codecs.base import TensorSpec
from actcompile.codecs.kernels import CompiledCodec, cached_kernels, clear_kernels
from actcompile.measure import compare_gradients, forward_backward

DEFAULT = ("int8", "int4", "int2", "fp8", "mask")


def same_payload(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


@pytest.mark.parametrize("name", DEFAULT)
def test_compiled_codec_matches_eager_exactly(name):
    codec = get_codec(name)
    x = torch.relu(torch.randn(16, 24, 9, 7, generator=torch.Generator().manual_seed(0)))   # numel not a multiple of 256
    fast = CompiledCodec(codec)
    packed, reference = fast.pack(x), codec.pack(x)
    assert same_payload(packed, reference), f"{name}: compiled pack differs from eager"
    assert torch.equal(fast.unpack(packed), codec.unpack(reference)), f"{name}: compiled unpack differs"


def test_integer_codecs_compile_and_stay_bit_exact():
    """Codec kernels are compiled by default: the lossless integer codecs must be as exact there."""
    from actcompile.codecs.integer import BitsCodec, PoolOffsetsCodec

    x = torch.randn(4, 8, 30, 30, generator=torch.Generator().manual_seed(0))
    _, indices = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    pool = PoolOffsetsCodec(input_size=(30, 30), kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    flags = torch.rand(1003, generator=torch.Generator().manual_seed(1)) > 0.5
    for codec, value in ((pool, indices), (BitsCodec(), flags)):
        fast = CompiledCodec(codec)
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # an eager fallback warns: it must compile
            packed = fast.pack(value)
            assert same_payload(packed, codec.pack(value))
            assert torch.equal(fast.unpack(packed), value)


def test_kernels_are_cached_per_shape():
    clear_kernels()
    fast = CompiledCodec(get_codec("int8"))
    for _ in range(3):
        fast.unpack(fast.pack(torch.randn(32, 256)))
    assert cached_kernels() == 2        # one pack, one unpack
    fast.unpack(fast.pack(torch.randn(64, 256)))
    assert cached_kernels() == 4        # a new shape compiles its own


@dataclasses.dataclass(frozen=True)
class _OpaqueCodec:
    """A codec that cannot be one static kernel: what it returns depends on the data."""

    name: ClassVar[str] = "opaque_identity"
    fixed_rate: ClassVar[bool] = True
    epsilon: float | None = None

    def supports(self, spec: TensorSpec) -> bool:
        return True

    def packed_nbytes(self, spec: TensorSpec) -> int:
        return spec.nbytes

    def pack(self, x):
        return (x.clone(), float(x.abs().max()))

    def unpack(self, packed):
        return packed[0]


def test_a_codec_that_cannot_compile_runs_eagerly_with_one_warning():
    fast = CompiledCodec(_OpaqueCodec())
    x = torch.randn(8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fast.unpack(fast.pack(x))
        fast.unpack(fast.pack(x))
    assert torch.equal(y, x)
    messages = [str(w.message) for w in caught if "could not compile" in str(w.message)]
    assert len(messages) == 1, messages


def test_training_with_compiled_codecs_gives_the_eager_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.Tanh(), torch.nn.Linear(256, 10))
    x = torch.randn(64, 256)
    eager = actcompile(model, budget=0.3, example_inputs=x, compile_codecs=False)
    fast = actcompile(model, budget=0.3, example_inputs=x, compile_codecs=True)
    assert fast.plan.assignments == eager.plan.assignments
    _, expected = forward_backward(eager, x)
    clear_kernels()
    _, got = forward_backward(fast, x)
    assert fast.last_stats.packed_tensors > 0
    assert cached_kernels() >= 2, "the compressed step ran no compiled kernel"
    cosine, rel = compare_gradients(expected, got)
    assert rel == 0.0, f"compiled kernels changed the gradients: rel err {rel:.3g}"


def test_a_codec_with_cached_constants_compiles_without_poisoning_them():
    """The DCT codec keeps its matrices behind an lru_cache: compiling must not cache FakeTensors."""
    from actcompile.codecs import transform

    transform._dct_matrix.cache_clear()
    transform._zigzag.cache_clear()
    codec = get_codec("dct", keep=0.25)   # a fixed kept size: one static kernel
    x = torch.randn(4, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    fast = CompiledCodec(codec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast.unpack(fast.pack(x))
    assert not [w for w in caught if "could not compile" in str(w.message)], [str(w.message) for w in caught]
    expected = codec.unpack(codec.pack(x))   # an eager call afterwards still works
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), "compiled DCT differs from eager"
