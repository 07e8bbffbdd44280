"""The demo checkpoint: every model the pipeline needs, tiny and with RANDOM weights.

It lets a fresh clone run the whole pipeline end to end (ingest → decode → encode → train →
preview) in minutes on a CPU. It sounds like noise and is for trying the pipeline only; real
training needs the downloaded checkpoints (README "Real checkpoints"). The folders use the real
layouts, so they load through exactly the same code as the real ones.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelsConfig

LABEL = (
    "RANDOM WEIGHTS - tiny demo checkpoint made by `aceturbo demo` for trying the pipeline only.\n"
    "It produces noise. For real training download ACE-Step/ACE-Step-v1-3.5B, m-a-p/MERT-v1-330M and\n"
    "utter-project/mHuBERT-147 and point params.yaml -> models at them.\n"
)

# Widths that must agree between the tiny parts (the transformer reads the others' outputs).
TEXT_DIM = 16
MERT_DIM = 24
MHUBERT_DIM = 20
SPEAKER_DIM = 8


def demo_models(root: str | Path) -> ModelsConfig:
    """Where build_demo_checkpoint(root) puts each part, as a params.yaml `models:` section."""
    root = Path(root)
    return ModelsConfig(
        acestep=str(root / "ACE-Step-v1-tiny"),
        mert=str(root / "MERT-tiny"),
        mhubert=str(root / "mHuBERT-tiny"),
        lyric_vocab=str(root / "lyrics_vocab.json"),
    )


def build_demo_checkpoint(root: str | Path, lyrics_corpus: list[str], seed: int = 0) -> ModelsConfig:
    """Write the tiny random checkpoint under ``root`` (skipped when already complete)."""
    from pipeline.tiny.codec import save_tiny_codec
    from pipeline.tiny.ssl import save_tiny_mert, save_tiny_mhubert
    from pipeline.tiny.text import save_demo_lyric_vocab, save_tiny_umt5
    from pipeline.tiny.transformer import save_tiny_transformer

    root = Path(root)
    models = demo_models(root)
    done = root / "COMPLETE"
    if done.exists():
        return models
    root.mkdir(parents=True, exist_ok=True)
    (root / "README-RANDOM-WEIGHTS.txt").write_text(LABEL, encoding="utf-8")
    acestep = Path(models.acestep)
    vocab_size = save_demo_lyric_vocab(Path(models.lyric_vocab), lyrics_corpus)
    save_tiny_umt5(acestep / "umt5-base", seed=seed, d_model=TEXT_DIM)
    save_tiny_codec(acestep, seed=seed)
    save_tiny_transformer(
        acestep / "ace_step_transformer",
        seed=seed,
        text_embedding_dim=TEXT_DIM,
        ssl_latent_dims=(MERT_DIM, MHUBERT_DIM),
        lyric_vocab_size=vocab_size,
        speaker_embedding_dim=SPEAKER_DIM,
    )
    save_tiny_mert(Path(models.mert), seed=seed, hidden_size=MERT_DIM)
    save_tiny_mhubert(Path(models.mhubert), seed=seed, hidden_size=MHUBERT_DIM)
    (acestep / "README-RANDOM-WEIGHTS.txt").write_text(LABEL, encoding="utf-8")
    done.write_text("ok\n", encoding="utf-8")
    return models
