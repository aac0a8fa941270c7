"""Lossless codecs for compressed checkpoints: a thin wrapper over ``blosc2``.

A codec turns one chunk of a tensor's raw bytes (at most a few MiB) into stored bytes and
back.  It is numeric-aware: the bytes are shuffled by element size before compression
(bit-shuffle for LZ4, byte-shuffle for ZSTD, as Blosc does), which groups the slowly varying
sign and exponent bytes of floats together.  The C code runs without the GIL
(``compress2`` and ``decompress2`` release it), so a thread pool over chunks scales with cores,
and ``decompress2(dst=...)`` writes straight into the destination tensor.

Why blosc2 (``benchmarks/results/codecs_cpu.md``): LZ4 + bit-shuffle is the only
configuration near 1 GB/s per core (ratio 1.32 on bf16 weights, 1.14-1.22 on Adam moments);
ZSTD level 1 + byte-shuffle gives 1.45 / 1.18-1.24 at a third of the speed.  Both come from
one optional package: ``pip install 'asyncckpt[compress]'``.

The manifest names the codec that decodes a record (``"blosc2"``): Blosc's own frame header
records the inner codec, filter and level, so any blosc2 can decode what any setting wrote.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

__all__ = ["COMPRESSIONS", "CODECS", "Codec", "encoder", "decoder"]

# option value -> (inner codec, filter, default level): what WriterOptions(compression=...) takes
COMPRESSIONS: dict[str, tuple[str, str, int]] = {
    "lz4": ("LZ4", "BITSHUFFLE", 5),  # ~1 GB/s per core; the default choice
    "zstd": ("ZSTD", "SHUFFLE", 1),  # smaller files, ~0.3-0.6 GB/s per core
}
# manifest codec name -> the package that decodes it
CODECS: dict[str, str] = {"blosc2": "blosc2"}
_INSTALL = "pip install 'asyncckpt[compress]' (or: pip install blosc2)"


@functools.cache
def _blosc2() -> Any:
    try:
        import blosc2
    except ImportError:
        raise ConfigError(f"compressed checkpoints need the blosc2 package: {_INSTALL}") from None
    return blosc2


def available() -> bool:
    """Whether compression can be used here (the blosc2 package imports)."""
    try:
        _blosc2()
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class Codec:
    """One compression setting.  Thread-safe: every call builds its own blosc2 context.

    Attributes:
        name: the manifest's codec name (what decodes it).
        setting: the option value (``"lz4"``, ``"zstd"``), or ``""`` for a decoder.
        level: the compression level (1-9).
    """

    name: str
    setting: str = ""
    level: int = 0

    def encode(self, data: memoryview, typesize: int) -> bytes:
        """Compress ``data`` (a whole number of ``typesize``-byte elements)."""
        b = _blosc2()
        inner, filt, _ = COMPRESSIONS[self.setting]
        cp = b.CParams(
            codec=getattr(b.Codec, inner),
            clevel=self.level,
            typesize=max(1, min(255, typesize)),
            nthreads=1,  # parallelism is across chunks, on the caller's pool
            filters=[getattr(b.Filter, filt)],
        )
        return bytes(b.compress2(data, cparams=cp))

    def decoded_size(self, data: memoryview) -> int:
        """The raw size ``data``'s header announces; ValueError when it is not a blosc2 chunk."""
        if data.nbytes < 32:
            raise ValueError("shorter than a blosc2 header")
        return int(_blosc2().get_cbuffer_sizes(data)[0])

    def decode_into(self, data: memoryview, out: memoryview) -> None:
        """Decompress ``data`` straight into ``out`` (exactly its decoded size)."""
        b = _blosc2()
        b.decompress2(data, dst=out, dparams=b.DParams(nthreads=1))


def encoder(compression: str, level: int | None = None) -> Codec:
    """The codec for ``WriterOptions(compression=..., compression_level=...)``.

    Raises:
        ConfigError: an unknown setting, a bad level, or blosc2 is not installed.
    """
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"compression must be None or one of {', '.join(map(repr, COMPRESSIONS))}, got {compression!r}"
        )
    lvl = COMPRESSIONS[compression][2] if level is None else level
    if isinstance(lvl, bool) or not isinstance(lvl, int) or not 1 <= lvl <= 9:
        raise ConfigError(f"compression_level must be None or an int in 1..9, got {level!r}")
    _blosc2()
    return Codec("blosc2", compression, lvl)


def decoder(name: str) -> Codec:
    """The codec that reads records the manifest says ``name`` wrote.

    Raises:
        ConfigError: the codec's package is not installed (the message names it), or the
            codec is unknown to this asyncckpt (a newer one wrote it).
    """
    if name not in CODECS:
        raise ConfigError(
            f"this checkpoint is compressed with codec {name!r}, which this asyncckpt does not "
            f"know (it reads {', '.join(CODECS)}); upgrade asyncckpt to load it"
        )
    _blosc2()
    return Codec(name)
