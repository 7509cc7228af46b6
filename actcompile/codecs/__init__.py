"""The codec registry: one decorator, one lookup, one error that lists what exists.

>>> from actcompile.codecs import available_codecs, get_codec
>>> {"none", "mask", "int8", "int4", "int2", "dct", "hosvd"} <= set(available_codecs())
True
>>> get_codec("int8", group_size=128).group_size
128
>>> get_codec("zstd")
Traceback (most recent call last):
...
actcompile.errors.CodecError: unknown codec 'zstd'; available: bits, dct, fft_lowpass, fp8, hosvd, int2, int4, int8, mask, narrow, none, offload, pool_offsets, random, svd, threshold, wavelet

Third-party codecs register through the entry-point group ``actcompile.codecs``: each entry
point names a codec class, loaded the first time the registry is consulted.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata

from actcompile.errors import CodecError

_REGISTRY: dict[str, type] = {}
_ENTRY_POINTS_LOADED = False


def register_codec(cls: type) -> type:
    """Class decorator: add ``cls`` (a frozen dataclass with a ``name``) to the registry."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise CodecError(f"{cls.__qualname__}: a codec class needs a non-empty string `name`")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise CodecError(f"codec name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for entry in metadata.entry_points(group="actcompile.codecs"):
        register_codec(entry.load())


def available_codecs() -> tuple[str, ...]:
    """Registered codec names, sorted."""
    _load_entry_points()
    return tuple(sorted(_REGISTRY))


def get_codec(name_or_instance, **options):
    """A codec instance from a registry name (with options) or an instance (returned as is)."""
    if not isinstance(name_or_instance, str):
        if options:
            return dataclasses.replace(name_or_instance, **options)
        return name_or_instance
    _load_entry_points()
    cls = _REGISTRY.get(name_or_instance)
    if cls is None:
        raise CodecError(f"unknown codec {name_or_instance!r}; available: {', '.join(available_codecs())}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise CodecError(f"codec {name_or_instance!r} has no option(s) {sorted(unknown)}; options: {sorted(fields)}")
    return cls(**options)


# Built-in codecs register themselves on import.
from actcompile.codecs import integer, lossless, lowrank, offload, quantize, sparse, transform, wavelet  # noqa: E402,F401
