"""One song → its features. The single definition of what the cache stores.

The encode stages call these functions to fill the cache, and the live source (``--live``
training, the cached-vs-live comparison) calls the very same functions on the fly: that is why a
cached batch equals a live one. Each stream has its own encoder, its own fingerprint and its own
DVC stage, so changing one encoder (or editing a prompt) re-encodes only that stream.

Streams (frame rates from spec §3.2 and §5):
  latents  [8, 16, T]   music DCAE latents, 44100/4096 ≈ 10.77 frames/s
  mert     [T_m, D_m]   MERT last hidden state, 75 frames/s
  mhubert  [T_h, D_h]   mHuBERT last hidden state, 50 frames/s
  text     K prompt variants → UMT5 states [K, L, D_txt] + masks [K, L]; lyric token ids [L_lyr]
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.checkpoints import lyric_embedding_rows
from pipeline.config import EncodeConfig, ModelsConfig, resolve_device, resolve_dtype

# Per stream, part of its fingerprint: bump a stream's entry when the way ITS features are computed
# changes, and only that stream's cached shards are refused and re-encoded (a lyric-cleaner change
# must not re-run DCAE, MERT and mHuBERT over a whole dataset).
FEATURES_CODE_VERSION = {
    "latents": "1",
    "mert": "1",
    "mhubert": "1",
    # 2: lyric cleaners with the reference's currency and line-strip rules (#14); 3: curly quotes
    # removed before that strip, so '“ hi ”' no longer keeps edge spaces; 4: no English ordinal
    # step ("1st" → "onest") and num2words' capitals kept ("drei Komma fünf"), as the reference
    "text": "4",
}
AUDIO_STREAMS = ("latents", "mert", "mhubert")
STREAMS = AUDIO_STREAMS + ("text",)


def stream_sources(stream: str, models: ModelsConfig) -> list[Path]:
    """The model folders/files a stream is computed with (checked, then fingerprinted)."""
    paths = models.paths()
    if stream == "latents":
        return [paths.require("music_dcae_f8c8"), paths.require("music_vocoder")]
    if stream == "mert":
        return [paths.require("mert")]
    if stream == "mhubert":
        return [paths.require("mhubert")]
    if stream == "text":
        vocab = Path(models.lyric_vocab)
        if not vocab.is_file():
            from pipeline.errors import CheckpointError

            raise CheckpointError(
                f"lyric vocabulary not found at '{vocab}'. Copy acestep/models/lyrics_utils/vocab.json "
                "from an ACE-Step checkout there (or set params.yaml → models → lyric_vocab)."
            )
        return [paths.require("umt5-base"), vocab]
    raise ValueError(f"unknown stream {stream!r}; streams: {', '.join(STREAMS)}")


def stream_settings(stream: str, encode: EncodeConfig, min_seconds: float) -> dict:
    """Everything besides the weights that changes a stream's numbers."""
    device = resolve_device(encode.device)
    settings = {
        "stream": stream,
        "compute_dtype": str(resolve_dtype(encode.dtype, device)),
        "storage_dtype": encode.storage_dtype,
    }
    if stream in AUDIO_STREAMS:
        settings["min_seconds"] = min_seconds
    else:
        from pipeline.text.lyrics import MAX_LYRIC_TOKENS

        settings.update(text_variants=encode.text_variants, text_seed=encode.text_seed,
                        max_lyric_tokens=MAX_LYRIC_TOKENS)
    return settings


def stream_fingerprint(stream: str, models: ModelsConfig, encode: EncodeConfig, min_seconds: float,
                       cache_dir: Path | None = None) -> str:
    from cache.fingerprint import fingerprint, hash_cache_path

    memo = hash_cache_path(cache_dir) if cache_dir is not None else None
    return fingerprint(stream_sources(stream, models), stream_settings(stream, encode, min_seconds),
                       FEATURES_CODE_VERSION[stream], hash_cache=memo)


def song_seed(text_seed: int, key: str) -> int:
    """A per-song seed for the prompt variants that does not depend on the order of songs."""
    return (text_seed * 1_000_003 + zlib.crc32(key.encode("utf-8"))) & 0x7FFFFFFF


@dataclass
class StreamEncoder:
    """Loads one stream's encoder once and turns songs into that stream's tensors."""

    stream: str
    models: ModelsConfig
    encode: EncodeConfig

    def __post_init__(self):
        self.device = resolve_device(self.encode.device)
        self.dtype = resolve_dtype(self.encode.dtype, self.device)
        paths = self.models.paths()
        if self.stream == "latents":
            from pipeline.models.codec import MusicDCAE

            # offload=False: an encode step (or live training) calls it for song after song, so it
            # stays on the device instead of moving its weights there and back on every call.
            self.model = MusicDCAE.from_checkpoint(paths.acestep, dtype=self.dtype, device=self.device,
                                                   offload=False)
        elif self.stream == "mert":
            from pipeline.models.ssl import MertExtractor

            self.model = MertExtractor.from_folder(paths.require("mert"), dtype=self.dtype, device=self.device)
        elif self.stream == "mhubert":
            from pipeline.models.ssl import MHubertExtractor

            self.model = MHubertExtractor.from_folder(paths.require("mhubert"), dtype=self.dtype, device=self.device)
        elif self.stream == "text":
            from pipeline.models.text_encoder import UMT5TextEncoder
            from pipeline.text.lyrics import LyricTokenizer

            stream_sources("text", self.models)  # clear error for a missing vocab
            self.model = UMT5TextEncoder.from_folder(paths.require("umt5-base"), dtype=self.dtype, device=self.device)
            self.tokenizer = LyricTokenizer(self.models.lyric_vocab)
            rows = lyric_embedding_rows(paths.transformer)
            if rows is not None:  # ids the transformer could not embed: fail now, clearly
                self.tokenizer.require_fits(rows, paths.transformer)
        else:
            raise ValueError(f"unknown stream {self.stream!r}")
        if self.stream != "latents":
            self.model.to(self.device)  # resident for the same reason (the extractors offload otherwise)

    @torch.inference_mode()
    def audio(self, wav: torch.Tensor) -> torch.Tensor:
        """wav [2, N] float32 at 48 kHz → this stream's tensor (float32, on the CPU)."""
        # fp32 audio in: each encoder does its own fp32 preprocessing and casts for the model.
        batch = wav[None].float()
        lengths = torch.tensor([wav.shape[-1]])
        if self.stream == "latents":
            latents, _ = self.model.encode(batch, lengths)
            return latents[0].float().cpu()
        return self.model.extract(batch, lengths)[0].float().cpu()

    @torch.inference_mode()
    def text(self, key: str, tags: list[str], recaption: dict, lyrics: str) -> dict[str, torch.Tensor]:
        """→ text_states [K, L, D], text_masks [K, L], lyric_ids [L_lyr]."""
        from pipeline.text.prompts import prompt_variants

        prompts = prompt_variants(tags, recaption or {}, self.encode.text_variants,
                                  song_seed(self.encode.text_seed, key))
        states, mask = self.model.encode(prompts)
        from pipeline.text.lyrics import truncate_lyric_ids

        ids = truncate_lyric_ids(self.tokenizer.tokenize(lyrics))
        return {
            "text_states": states.float().cpu(),
            "text_masks": mask.long().cpu(),
            "lyric_ids": torch.tensor(ids, dtype=torch.long),
        }
