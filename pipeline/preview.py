"""Training previews: a callback the trainer calls every N steps to hear what the LoRA does.

For one sample of the current batch it samples a prediction with the training transformer (same
conditioning, the sample's own length — not the reference's fixed 240 s, which made previews
slow enough to break training) and decodes both the target latents and the prediction to 48 kHz
wavs, plus a text file with key, prompt, lyrics and seed, into
``<run>/eval_results/step_N/`` (the reference's file names).

The codec (and the text encoder, needed only for ERG-null text) is loaded for the preview and
released right after it, so cached training keeps its memory; the trainer never imports them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from pipeline.fileio import write_text_atomic
from pipeline.sampling.generation import OUTPUT_SAMPLE_RATE, load_codec, load_text_encoder, release
from pipeline.sampling.sampler import SamplerSettings, sample, unwrap

PreviewCallback = Callable[[torch.nn.Module, dict, int], Path]


@dataclass
class PreviewSettings:
    """What a preview generates. ``sampler`` defaults to the reference's (60 steps, APG 15)."""

    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    seed: int = 1234  # the reference seeds its previews from random.seed(1234)
    sample_index: int = 0  # which sample of the batch is previewed (clamped to the batch size)
    max_frames: int | None = None  # optional cap on the previewed length (latent frames)


def _safe_name(key: str) -> str:
    # Keys become part of file names: keep them readable but never a path.
    return re.sub(r"[^\w.\-]+", "_", str(key)).strip("._") or "sample"


def preview_text(key: str, prompt: str, lyrics: str, seed: int) -> str:
    """The reference's key/prompt/lyric file: markdown sections KEY, PROMPT, LYRIC, SEED."""
    return f"# KEY\n\n{key}\n\n\n# PROMPT\n\n{prompt}\n\n\n# LYRIC\n\n{lyrics}\n\n\n# SEED\n\n{seed}\n\n"


def _pick(batch: Mapping, name: str, i: int):
    value = batch[name]
    return value[i : i + 1]


def _fit_length(states: torch.Tensor, length: int) -> torch.Tensor:
    """Pad with zeros / crop along the sequence so ERG-null states line up with the cached mask."""
    if states.shape[1] >= length:
        return states[:, :length]
    pad = torch.zeros(states.shape[0], length - states.shape[1], *states.shape[2:], dtype=states.dtype,
                      device=states.device)
    return torch.cat([states, pad], 1)


def texts_from_manifest(manifest: str | Path) -> dict[str, tuple[str, str]]:
    """{song id: (prompt, lyrics)} from the dataset manifest (prompt = the tags joined by ", ");
    empty when the manifest does not exist."""
    from pipeline.dataset import read_manifest

    path = Path(manifest)
    if not path.exists():
        return {}
    return {song.id: (", ".join(song.tags), song.lyrics) for song in read_manifest(path)}


def make_preview_callback(
    checkpoint_root: str | Path | None = None,
    lyric_vocab: str | Path | None = None,
    out_root: str | Path | None = None,
    settings: PreviewSettings | SamplerSettings | None = None,
    texts: Mapping[str, tuple[str, str]] | None = None,
    progress: bool = False,
    *,
    project=None,
    run_dir: str | Path | None = None,
) -> PreviewCallback:
    """Return ``callback(transformer, batch, step) -> step folder`` for the trainer.

    ``checkpoint_root``: the ACE-Step folder (its codec decodes the previews).
    ``lyric_vocab``: accepted for symmetry with generate; batches already carry lyric ids, so it is
    not read here.
    ``out_root``: the run folder; files go to ``out_root/eval_results/step_N/``.
    ``settings``: PreviewSettings, or SamplerSettings (then seed 1234, first sample).
    ``texts``: optional {key: (prompt, lyrics)} for the text file (and for ERG-null text, which
    needs the prompt); without it the text file says the texts were not given.
    ``project`` (a pipeline.config.ProjectConfig) and ``run_dir`` may stand in for the first three:
    the checkpoint comes from project.models, the texts from the dataset manifest.
    """
    if project is not None:
        checkpoint_root = checkpoint_root or project.models.acestep
        lyric_vocab = lyric_vocab or project.models.lyric_vocab
        if texts is None:
            texts = texts_from_manifest(project.paths.manifest)
    out_root = out_root if out_root is not None else run_dir
    if checkpoint_root is None or out_root is None:
        raise TypeError("make_preview_callback needs checkpoint_root and out_root (or project and run_dir)")
    if settings is None:
        settings = PreviewSettings()
    elif isinstance(settings, SamplerSettings):
        settings = PreviewSettings(sampler=settings)
    settings.sampler.validate()
    root = Path(checkpoint_root)
    out_root = Path(out_root)
    texts = dict(texts or {})
    del lyric_vocab  # see the docstring

    def callback(transformer: torch.nn.Module, batch: dict, step: int) -> Path:
        transformer = unwrap(transformer)
        param = next(transformer.parameters())
        device, dtype = param.device, param.dtype
        latents = batch["latents"]
        i = min(max(settings.sample_index, 0), latents.shape[0] - 1)
        keys = batch.get("keys") or [f"sample{j}" for j in range(latents.shape[0])]
        key = str(keys[i])
        n_frames = latents.shape[-1]
        if batch.get("latent_mask") is not None:
            n_frames = max(int(batch["latent_mask"][i].float().sum().item()), 1)
        if settings.max_frames:
            n_frames = min(n_frames, settings.max_frames)
        target = latents[i : i + 1, ..., :n_frames].to(device=device, dtype=torch.float32)
        cond = {name: _pick(batch, name, i) for name in ("text_states", "text_mask", "speaker", "lyric_ids", "lyric_mask")}
        prompt, lyrics = texts.get(key, ("(prompt not given to the preview)", "(lyrics not given to the preview)"))

        s = settings.sampler
        if s.guided and s.use_erg_tag and s.use_erg_lyric and key in texts:
            text_encoder = load_text_encoder(root, device, dtype)
            with torch.no_grad():
                null = text_encoder.erg_null_encode([prompt])
            null = null[0] if isinstance(null, (tuple, list)) else null
            cond["text_states_null"] = _fit_length(null.to(device=device, dtype=dtype), cond["text_states"].shape[1])
            del text_encoder, null
            release()

        pred = sample(transformer, cond, s, seeds=[settings.seed], n_frames=n_frames, progress=progress)

        folder = out_root / "eval_results" / f"step_{step}"
        folder.mkdir(parents=True, exist_ok=True)
        name = _safe_name(key)
        codec = load_codec(root, device)
        try:
            with torch.no_grad():
                sr, target_wavs = codec.decode_auto(target, sr=OUTPUT_SAMPLE_RATE)
                _, pred_wavs = codec.decode_auto(pred, sr=OUTPUT_SAMPLE_RATE)
        finally:
            del codec
            release()
        from pipeline.audio import save_wav

        save_wav(folder / f"target_wav_{name}_0.wav", target_wavs[0].float().cpu(), int(sr))
        save_wav(folder / f"pred_wav_{name}_0.wav", pred_wavs[0].float().cpu(), int(sr))
        write_text_atomic(folder / f"key_prompt_lyric_{name}_0.txt", preview_text(key, prompt, lyrics, settings.seed))
        return folder

    return callback
