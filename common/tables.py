"""Describing a dataset's columns the way a viewer shows them, from its `datasets` features.

A feature is described by `datasets`'s own serialization (`{"_type": "Value", "dtype": "int64"}`,
`{"_type": "ClassLabel", "names": [...]}`, `{"_type": "Image"}`...), so a reader of the cache can rebuild
it with `datasets.Features.from_dict`. The features travel with the data: the Parquet files a step writes
carry them in their schema's metadata, as `datasets` writes them.

:func:`audio_header` reads what the header of an audio file says (its sampling rate and duration) without
decoding it: WAV, FLAC, Ogg (Vorbis, Opus) and MP3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from common.reading import feature_type

if TYPE_CHECKING:
    from datasets import Features

NUMBER_DTYPES = ("int", "uint", "float", "double", "half")
STRING_DTYPES = ("string", "large_string")


def features(features: Features) -> list[dict[str, Any]]:
    """[{"feature_idx", "name", "type"}], one per column (first rows' `features`)."""
    described = features_dict(features)
    return [{"feature_idx": index, "name": name, "type": described[name]} for index, name in enumerate(features)]


def features_dict(features: Features) -> dict[str, Any]:
    """The features as `datasets.Features.to_dict()` gives them (what `Features.from_dict` and
    `DatasetInfo.from_dict` read back), media columns as the dataset declares them (decoded)."""
    described: dict[str, Any] = _without_decode(features.to_dict())
    return described


def _without_decode(described: Any) -> Any:
    """A step reads media undecoded; how a reader decodes them is the reader's business."""
    if isinstance(described, dict):
        return {key: _without_decode(value) for key, value in described.items() if key != "decode"}
    if isinstance(described, list):
        return [_without_decode(value) for value in described]
    return described


def column_kind(feature: Any) -> str:
    """One of: number, string, bool, class_label, image, audio, other."""
    kind = feature_type(feature)
    if kind == "ClassLabel":
        return "class_label"
    if kind in ("Image", "Audio"):
        return kind.lower()
    if kind != "Value":
        return "other"
    dtype = str(feature.dtype)
    if dtype == "bool":
        return "bool"
    if dtype.startswith(NUMBER_DTYPES):
        return "number"
    if dtype in STRING_DTYPES:
        return "string"
    return "other"


def features_of(schema: pa.Schema) -> Features:
    """The features a Parquet or Arrow schema carries (`datasets`'s metadata), or those its types imply."""
    from datasets import Features

    return Features.from_arrow_schema(schema)


@dataclass(frozen=True)
class AudioHeader:
    sampling_rate: int | None = None  # Hz
    duration: float | None = None  # seconds


def audio_header(data: bytes) -> AudioHeader:
    """The sampling rate and duration an audio file's header gives (each None when it cannot tell): WAV,
    FLAC, Ogg Vorbis and Opus, MP3 (its Xing header's frame count, or else its first frame's bit rate)."""
    try:
        if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
            return _wav(data)
        start = _after_id3(data)
        if data[start : start + 4] == b"fLaC":
            return _flac(data, start + 4)
        if data[:4] == b"OggS":
            return _ogg(data)
        return _mp3(data, start)
    except (struct.error, IndexError, ZeroDivisionError):  # a truncated or inconsistent header
        return AudioHeader()


def _wav(data: bytes) -> AudioHeader:
    rate = byte_rate = None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"fmt ":
            rate, byte_rate = struct.unpack_from("<II", data, offset + 12)
        elif chunk == b"data":
            if size in (0, 0xFFFFFFFF) or size > len(data) - offset - 8:  # unknown when written: up to the end
                size = len(data) - offset - 8
            return AudioHeader(rate, size / byte_rate if byte_rate else None)
        offset += 8 + size + size % 2
    return AudioHeader(rate)


def _after_id3(data: bytes) -> int:
    """Where the audio starts after an ID3v2 tag (a syncsafe size)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)
    return 10 + size + (10 if data[5] & 0x10 else 0)


def _flac(data: bytes, offset: int) -> AudioHeader:
    if data[offset] & 0x7F != 0:  # the first block is STREAMINFO
        return AudioHeader()
    packed = int.from_bytes(data[offset + 14 : offset + 22], "big")
    rate, samples = packed >> 44, packed & ((1 << 36) - 1)
    return AudioHeader(rate or None, samples / rate if rate and samples else None)


def _ogg(data: bytes) -> AudioHeader:
    segments = data[26]
    packet = data[27 + segments :]
    last = data.rfind(b"OggS")
    granule = struct.unpack_from("<q", data, last + 6)[0]
    if packet[:7] == b"\x01vorbis":
        rate = struct.unpack_from("<I", packet, 12)[0]
        return AudioHeader(rate, granule / rate if rate and granule > 0 else None)
    if packet[:8] == b"OpusHead":
        pre_skip, rate = struct.unpack_from("<HI", packet, 10)
        # Opus is decoded at 48 kHz whatever the input's rate; its granule positions count at 48 kHz.
        return AudioHeader(48_000, max(0, granule - pre_skip) / 48_000 if granule > 0 else None)
    return AudioHeader()


MP3_RATES = {3: (44_100, 48_000, 32_000), 2: (22_050, 24_000, 16_000), 0: (11_025, 12_000, 8_000)}
MP3_BITRATES = {  # kbit/s by (MPEG-1?, layer)
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}


def _mp3(data: bytes, start: int) -> AudioHeader:
    offset = start
    while offset + 4 <= len(data) and offset < start + 65_536:  # the first frame's sync, near the start
        if data[offset] == 0xFF and data[offset + 1] & 0xE0 == 0xE0:
            header = int.from_bytes(data[offset : offset + 4], "big")
            version, layer = (header >> 19) & 3, 4 - ((header >> 17) & 3)
            bitrate_index, rate_index = (header >> 12) & 15, (header >> 10) & 3
            if version != 1 and layer != 4 and 0 < bitrate_index < 15 and rate_index < 3:
                break
        offset += 1
    else:
        return AudioHeader()
    mpeg1 = version == 3
    rate = MP3_RATES[version][rate_index]
    samples_per_frame = 384 if layer == 1 else 1152 if mpeg1 or layer == 2 else 576
    mono = (header >> 6) & 3 == 3
    xing = offset + 4 + ((17 if mono else 32) if mpeg1 else (9 if mono else 17))
    if data[xing : xing + 4] in (b"Xing", b"Info") and struct.unpack_from(">I", data, xing + 4)[0] & 1:
        frames = struct.unpack_from(">I", data, xing + 8)[0]
        return AudioHeader(rate, frames * samples_per_frame / rate)
    bitrate = MP3_BITRATES[(mpeg1, layer if mpeg1 else min(layer, 2))][bitrate_index] * 1000
    return AudioHeader(rate, (len(data) - offset) * 8 / bitrate)
