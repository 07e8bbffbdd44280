"""The cache end to end on the tiny demo models: incremental encoding, parallel workers, kill and
rerun, stale-cache refusal, and cached == live (same batch, same loss)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from cache.collate import collate, make_sample, max_frames, sample_rng
from cache.fingerprint import check_cache
from cache.shards import CacheIndex
from pipeline.config import EncodeConfig, IngestConfig, PathsConfig, ProjectConfig
from pipeline.dataset import read_manifest, scan_dataset, write_manifest, write_stage_views
from pipeline.encoding import decode_songs, encode_stream
from pipeline.errors import CacheError
from pipeline.features import STREAMS, stream_fingerprint
from pipeline.tiny.demo import build_demo_checkpoint
from pipeline.tiny.songs import make_demo_songs

MAX_SECONDS = 2.5  # shorter than the songs, so the crop path is exercised


def _ingest(project: ProjectConfig) -> None:
    report = scan_dataset(project.paths.data, project.ingest, progress=False)
    report.raise_for_problems()
    write_manifest(project.paths.manifest, report.songs)
    write_stage_views(report.songs, project.paths.audio_list, project.paths.text_list)


def _encode_all(project: ProjectConfig, worker=(0, 1)) -> dict[str, int]:
    return {s: encode_stream(project, s, worker, progress=False).encoded for s in STREAMS}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-models")
    build_demo_checkpoint(root, ["[verse]\nhello world\n[chorus]\nsing it loud\n"])
    return root


@pytest.fixture
def project(tmp_path, demo_root) -> ProjectConfig:
    from pipeline.tiny.demo import demo_models

    data = tmp_path / "data"
    make_demo_songs(data, n=3, seconds=4.0)
    project = ProjectConfig(
        paths=PathsConfig(data=str(data), cache=str(tmp_path / "cache"), exps=str(tmp_path / "exps")),
        models=demo_models(demo_root),
        ingest=IngestConfig(),
        encode=EncodeConfig(text_variants=3),
    )
    _ingest(project)
    decode_songs(project, progress=False)
    return project


def test_incremental_encoding_add_and_remove(project):
    assert _encode_all(project) == {s: 3 for s in STREAMS}
    assert _encode_all(project) == {s: 0 for s in STREAMS}, "a rerun must encode nothing"
    data = Path(project.paths.data)
    # one new song → one song encoded per stream
    make_demo_songs(data / "more", n=1, seconds=4.0, seed=7)
    _ingest(project)
    decode_songs(project, progress=False)
    assert _encode_all(project) == {s: 1 for s in STREAMS}
    # edit one prompt → only the text stream re-encodes that song
    prompt = next(data.glob("demo_01_*_prompt.txt"))
    prompt.write_text("lofi, piano, rain\n", encoding="utf-8")
    _ingest(project)
    assert _encode_all(project) == {"latents": 0, "mert": 0, "mhubert": 0, "text": 1}
    # a removed song leaves the cache
    removed = next(data.glob("demo_02_*.mp3"))
    for f in data.glob(removed.stem + "*"):
        f.unlink()
    _ingest(project)
    decode_songs(project, progress=False)
    _encode_all(project)
    index = CacheIndex.open(project.paths.features)
    for stream in STREAMS:
        assert removed.stem not in index.keys(stream)
        assert len(index.keys(stream)) == 3
    check_cache(project.paths.features)


def test_parallel_workers_cover_every_song_once(project):
    first = _encode_all(project, worker=(0, 2))
    second = _encode_all(project, worker=(1, 2))
    assert all(first[s] + second[s] == 3 for s in STREAMS)
    index = CacheIndex.open(project.paths.features)
    for stream in STREAMS:
        assert len(index.keys(stream)) == 3
        # each worker wrote its own shard (a worker with no song writes none)
        assert len(index.shards[stream]) == (first[stream] > 0) + (second[stream] > 0)
    assert _encode_all(project) == {s: 0 for s in STREAMS}


def test_killed_encode_then_rerun_gives_complete_cache(project, monkeypatch):
    from pipeline import features

    real = features.StreamEncoder.audio
    calls = {"n": 0}

    def dies_on_second_song(self, wav):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C half way
        return real(self, wav)

    monkeypatch.setattr(features.StreamEncoder, "audio", dies_on_second_song)
    with pytest.raises(KeyboardInterrupt):
        encode_stream(project, "mert", progress=False)
    monkeypatch.setattr(features.StreamEncoder, "audio", real)
    assert encode_stream(project, "mert", progress=False).encoded == 3
    index = CacheIndex.open(project.paths.features)
    assert len(index.keys("mert")) == 3
    for key in index.keys("mert"):
        index.read_song(key, streams=("mert",))  # checksums verified


def test_cache_from_other_settings_is_refused(project):
    _encode_all(project)
    other = dataclasses.replace(project.encode, text_variants=5)
    expected = {s: stream_fingerprint(s, project.models, other, project.ingest.min_seconds) for s in STREAMS}
    with pytest.raises(CacheError, match="dvc repro"):
        check_cache(project.paths.features, expected)


def test_a_text_code_version_bump_leaves_the_audio_fingerprints(demo_root, monkeypatch):
    """FEATURES_CODE_VERSION is per stream: a lyric-cleaner change re-encodes text only. The audio
    streams still hash code version "1", so caches made before the text bump stay valid."""
    from cache.fingerprint import fingerprint
    from pipeline import features
    from pipeline.tiny.demo import demo_models

    models, encode = demo_models(demo_root), EncodeConfig()

    def prints():
        return {s: stream_fingerprint(s, models, encode, 1.0) for s in STREAMS}

    before = prints()
    for stream in features.AUDIO_STREAMS:
        as_released = fingerprint(features.stream_sources(stream, models),
                                  features.stream_settings(stream, encode, 1.0), "1")
        assert before[stream] == as_released, stream
    monkeypatch.setitem(features.FEATURES_CODE_VERSION, "text", "99")
    after = prints()
    assert after["text"] != before["text"]
    assert {s: after[s] for s in features.AUDIO_STREAMS} == {s: before[s] for s in features.AUDIO_STREAMS}


def test_cached_and_live_give_the_same_batch_and_loss(project, demo_root):
    from pipeline.live import LiveSource
    from pipeline.train import compute_loss, load_transformer_for_training
    from pipeline.train_config import TrainConfig
    from pipeline.objective import training_sigmas

    _encode_all(project)
    index = CacheIndex.open(project.paths.features)
    songs = read_manifest(project.paths.manifest)
    live = LiveSource(project, songs, max_seconds=MAX_SECONDS, seed=3, speaker_dim=8)
    config = TrainConfig(rank=4, precision="fp32", gradient_checkpointing=False, seed=0)
    model = load_transformer_for_training(Path(project.models.acestep) / "ace_step_transformer", config, "cpu")
    model.eval()  # no dropout: the comparison is about the data, not the model's noise
    sigmas = training_sigmas()
    for song in songs:
        cached_batch = collate([make_sample(index.read_song(song.id), sample_rng(3, 0, song.id), MAX_SECONDS)],
                               speaker_dim=8, dtype=torch.bfloat16)
        live_batch = collate([live.sample(song, 0)], speaker_dim=8, dtype=torch.bfloat16)
        assert cached_batch["latents"].shape[-1] < index.read_song(song.id).latents.shape[-1]  # cropped
        for name in ("latents", "latent_mask", "text_states", "text_mask", "lyric_ids", "lyric_mask", "speaker"):
            assert torch.equal(cached_batch[name], live_batch[name]), name
        for name in ("mert", "mhubert"):
            assert torch.equal(cached_batch[name][0], live_batch[name][0]), name
        losses = []
        for batch in (cached_batch, live_batch):
            gen = torch.Generator().manual_seed(11)
            with torch.no_grad():
                loss, _ = compute_loss(model, batch, gen, sigmas, config, torch.device("cpu"), torch.float32)
            losses.append(float(loss))
        assert losses[0] == losses[1]


def test_encode_and_load_through_an_fsspec_url(project):
    """Shards on object storage: encode into a memory:// store and train-load from it."""
    from cache.loader import LoaderSettings, make_loader

    project.paths.feature_store = "memory://aceturbo-test/features"
    assert _encode_all(project) == {s: 3 for s in STREAMS}
    loader = make_loader(project.paths.features, LoaderSettings(max_seconds=MAX_SECONDS, speaker_dim=8))
    batch = next(iter(loader))
    assert batch["latents"].shape[:3] == (1, 8, 16) and batch["mert"][0] is not None
    assert _encode_all(project) == {s: 0 for s in STREAMS}


def test_held_out_songs_give_the_same_validation_set_cached_and_live(project, demo_root):
    """`aceturbo train` (and --live) holds the val_songs out of training and validates on them."""
    from pipeline import distributed
    from pipeline.train_config import TrainConfig
    from stages.train import make_data

    _encode_all(project)
    ids = sorted(s.id for s in read_manifest(project.paths.manifest))
    transformer_dir = Path(project.models.acestep) / "ace_step_transformer"
    sets = {}
    for live in (False, True):
        config = TrainConfig(live=live, max_seconds=MAX_SECONDS, val_songs=[ids[0]], val_sigmas=3)
        batches, validation = make_data(config, project, transformer_dir, None, torch.device("cpu"), distributed.info())
        epoch = iter(batches)  # one pass over the two training songs
        trained = {k for _ in range(2) for k in next(epoch)["keys"]}
        assert trained == set(ids[1:])
        assert ids[0] not in trained and validation.held_out
        sets[live] = validation
    (cached,), (live,) = sets[False].items, sets[True].items
    assert cached.key == live.key == ids[0] and cached.noise_seed == live.noise_seed
    assert cached.batch["latents"].shape[-1] == max_frames(MAX_SECONDS)  # cropped like a training sample
    for name in ("latents", "text_states", "lyric_ids"):
        assert torch.equal(cached.batch[name], live.batch[name]), name


def test_fingerprints_stage_keeps_a_pulled_fingerprint_without_the_weights(project, tmp_path):
    """`dvc pull` of the cache on a machine without the encoders: the fingerprints stage keeps each
    recorded fingerprint (training works from the cache alone); with nothing recorded it says what is
    missing in one line."""
    from pipeline.encoding import write_fingerprints
    from pipeline.errors import CheckpointError

    first = write_fingerprints(project)
    assert {state for _, state in first.values()} == {"changed"}
    recorded = project.paths.fingerprint_file("mert").read_text(encoding="utf-8")
    no_mert = dataclasses.replace(project, models=dataclasses.replace(project.models, mert=str(tmp_path / "gone")))
    again = write_fingerprints(no_mert)
    assert again["mert"][0] == first["mert"][0] and again["mert"][1].startswith("kept: encoder weights not on")
    assert {again[s][1] for s in STREAMS if s != "mert"} == {"unchanged"}
    assert project.paths.fingerprint_file("mert").read_text(encoding="utf-8") == recorded
    project.paths.fingerprint_file("mert").unlink()
    with pytest.raises(CheckpointError, match="MERT model not found.*records no fingerprint"):
        write_fingerprints(no_mert)
