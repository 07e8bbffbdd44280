"""What the feature cache stores: streams, their fields, frame rates, dtypes, and one song's container.

A *stream* is what one encode step writes (latents from the codec, mert and mhubert from the SSL
models, text from UMT5 + the lyric tokenizer). Each stream is written and versioned on its own, so
re-running one encoder never touches the files of the others; a song is the join of its streams by
key.

Every field is stored as "rows": the per-song ragged axes are moved to the front and flattened, the
fixed trailing axes stay (latents [8,16,T] -> [T,8,16]; text_states [K,L,D] -> [K*L,D]). Rows of
the songs of one shard are concatenated, so zarr (which has no ragged arrays) holds one plain
array per field plus an offsets array; the per-song shape kept in the shard attrs undoes the
flattening.

Float fields are stored as 16 bits. ``bfloat16`` (the default, because training is bf16-true and
the encoders run in bf16) has no zarr dtype: its bits are stored as uint16 and viewed back, which is
exact. ``float16`` is the alternative for tools that want to open the arrays without us.
"""
from __future__ import annotations

from dataclasses import dataclass, fields as dc_fields
from typing import Literal

import numpy as np
import torch

# Bump whenever the on-disk layout changes; readers refuse other versions (rerun `dvc repro`).
SCHEMA_VERSION = 1

# Frame rates (spec §3.2, §5).
LATENT_RATE = 44100 / 4096  # ≈ 10.7666 latent frames per second
MERT_RATE = 75.0
MHUBERT_RATE = 50.0
LATENT_CHANNELS = (8, 16)

FloatStorage = Literal["bfloat16", "float16"]
FLOAT_STORAGES: tuple[str, ...] = ("bfloat16", "float16")
DEFAULT_FLOAT_STORAGE: FloatStorage = "bfloat16"


@dataclass(frozen=True)
class FieldSpec:
    """How one field of a song is laid out on disk."""

    name: str
    stream: str
    ndim: int
    # Axis holding time, moved to the front before flattening (None: the ragged axes lead already).
    time_axis: int | None
    # Number of leading axes (after the move) whose length varies per song; flattened into rows.
    ragged_dims: int
    # "float": 16-bit float storage; otherwise the numpy dtype the integers are stored as.
    storage: str

    @property
    def is_float(self) -> bool:
        return self.storage == "float"

    def storage_dtype(self, float_storage: str) -> np.dtype:
        if not self.is_float:
            return np.dtype(self.storage)
        return np.dtype(np.uint16) if float_storage == "bfloat16" else np.dtype(np.float16)


FIELDS: dict[str, FieldSpec] = {
    "latents": FieldSpec("latents", "latents", 3, time_axis=2, ragged_dims=1, storage="float"),
    "mert": FieldSpec("mert", "mert", 2, time_axis=0, ragged_dims=1, storage="float"),
    "mhubert": FieldSpec("mhubert", "mhubert", 2, time_axis=0, ragged_dims=1, storage="float"),
    "text_states": FieldSpec("text_states", "text", 3, time_axis=None, ragged_dims=2, storage="float"),
    # Masks are 0/1: int8 on disk, long in memory (the text encoder's attention-mask convention).
    "text_masks": FieldSpec("text_masks", "text", 2, time_axis=None, ragged_dims=2, storage="int8"),
    # Vocab is 6693 ids (spec §4.3); int32 keeps room for other tokenizers.
    "lyric_ids": FieldSpec("lyric_ids", "text", 1, time_axis=None, ragged_dims=1, storage="int32"),
}

# stream -> its fields, in storage (and checksum) order.
STREAMS: dict[str, tuple[str, ...]] = {
    "latents": ("latents",),
    "mert": ("mert",),
    "mhubert": ("mhubert",),
    "text": ("text_states", "text_masks", "lyric_ids"),
}
STREAM_NAMES: tuple[str, ...] = tuple(STREAMS)


@dataclass
class SongFeatures:
    """One song's features, as produced by pipeline/features.py and read back from the cache.

    Shapes: latents [8,16,T] at LATENT_RATE; mert [T_m,D_m] at 75 Hz; mhubert [T_h,D_h] at 50 Hz;
    lyric_ids [L] long; text_states [K,L_txt,D_txt] (K prompt variants padded to the longest);
    text_masks [K,L_txt] long. A field is None when its stream was not produced / not read.
    """

    key: str
    latents: torch.Tensor | None = None
    mert: torch.Tensor | None = None
    mhubert: torch.Tensor | None = None
    lyric_ids: torch.Tensor | None = None
    text_states: torch.Tensor | None = None
    text_masks: torch.Tensor | None = None

    def stream_arrays(self, stream: str) -> dict[str, torch.Tensor]:
        """The fields of one stream (raises if one is missing: a writer must get them all)."""
        out = {}
        for name in STREAMS[stream]:
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"song {self.key!r}: field {name!r} of stream {stream!r} is missing")
            out[name] = value
        return out

    @property
    def seconds(self) -> float:
        if self.latents is not None:
            return self.latents.shape[-1] / LATENT_RATE
        if self.mert is not None:
            return self.mert.shape[0] / MERT_RATE
        if self.mhubert is not None:
            return self.mhubert.shape[0] / MHUBERT_RATE
        raise ValueError(f"song {self.key!r} has no time-based stream")

    def replace(self, **changes) -> "SongFeatures":
        values = {f.name: getattr(self, f.name) for f in dc_fields(self)}
        values.update(changes)
        return SongFeatures(**values)


def check_stream_arrays(stream: str, key: str, arrays: dict) -> None:
    """Refuse arrays that would make a shard unreadable (an encoder bug, so a plain ValueError)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; streams are {', '.join(STREAM_NAMES)}")
    for name in STREAMS[stream]:
        if name not in arrays or arrays[name] is None:
            raise ValueError(f"song {key!r}: stream {stream!r} needs field {name!r}")
        spec = FIELDS[name]
        if arrays[name].ndim != spec.ndim:
            raise ValueError(f"song {key!r}: {name} must have {spec.ndim} dims, got shape "
                             f"{tuple(arrays[name].shape)}")
    if stream == "latents" and tuple(arrays["latents"].shape[:2]) != LATENT_CHANNELS:
        raise ValueError(f"song {key!r}: latents must be [8,16,T], got {tuple(arrays['latents'].shape)}")
    if stream == "text" and tuple(arrays["text_states"].shape[:2]) != tuple(arrays["text_masks"].shape):
        raise ValueError(f"song {key!r}: text_masks {tuple(arrays['text_masks'].shape)} does not match "
                         f"text_states {tuple(arrays['text_states'].shape)}")


def to_rows(spec: FieldSpec, value, float_storage: str) -> np.ndarray:
    """One song's field (tensor or ndarray) -> C-contiguous storage rows."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    value = value.detach().cpu()
    if spec.time_axis not in (None, 0):
        value = value.movedim(spec.time_axis, 0)
    tail = tuple(value.shape[spec.ragged_dims:])
    value = value.reshape(-1, *tail)
    if spec.is_float:
        if float_storage == "bfloat16":
            # numpy has no bfloat16: keep its exact bits as uint16.
            array = value.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            array = value.to(torch.float16).contiguous().numpy()
    else:
        array = value.numpy().astype(spec.storage, copy=False)
    return np.ascontiguousarray(array)


def from_rows(spec: FieldSpec, rows: np.ndarray, shape: tuple[int, ...], float_storage: str) -> torch.Tensor:
    """Storage rows of one song -> the tensor in its original shape (bf16/f16 floats, long ints)."""
    rows = np.ascontiguousarray(rows)
    if spec.is_float:
        if float_storage == "bfloat16":
            tensor = torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(rows)
    else:
        tensor = torch.from_numpy(rows.astype(np.int64))
    tensor = tensor.reshape(_moved(spec, shape))
    if spec.time_axis not in (None, 0):
        tensor = tensor.movedim(0, spec.time_axis).contiguous()
    return tensor


def _moved(spec: FieldSpec, shape: tuple[int, ...]) -> list[int]:
    moved = list(shape)
    if spec.time_axis not in (None, 0):
        moved.insert(0, moved.pop(spec.time_axis))
    return moved


def n_rows(spec: FieldSpec, shape: tuple[int, ...]) -> int:
    return int(np.prod(_moved(spec, shape)[: spec.ragged_dims], dtype=np.int64))


def row_tail(spec: FieldSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of one storage row of a field of this (original) shape."""
    return tuple(_moved(spec, shape)[spec.ragged_dims:])
