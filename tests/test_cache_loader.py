"""WebDataset loader over the feature cache: layout, determinism, resume, crops, node/worker splits."""
from __future__ import annotations

import itertools
import random
import uuid

import pytest
import torch

from cache.collate import choose_variant, collate, crop_song, make_sample, max_frames
from cache.loader import LoaderSettings, make_loader
from cache.schema import LATENT_RATE, STREAMS, SongFeatures
from cache.shards import ShardSettings, write_shard
from pipeline.errors import CacheError

K = 3  # prompt variants per song


def timed_song(key: str, frames: int, variant_lengths=(4, 6, 5)) -> SongFeatures:
    """Every stream carries its own frame index (exact in bfloat16: index % 256 and index // 256)."""

    def clock(n, *shape):
        idx = torch.arange(n, dtype=torch.float32)
        out = torch.zeros(n, *shape)
        out[:, 0], out[:, 1] = idx % 256, idx // 256
        return out

    n_mert, n_hub = round(frames / LATENT_RATE * 75), round(frames / LATENT_RATE * 50)
    latents = torch.zeros(8, 16, frames)
    latents[0, 0], latents[0, 1] = torch.arange(frames) % 256, torch.arange(frames) // 256
    l_txt = max(variant_lengths)
    states = torch.zeros(K, l_txt, 4)
    masks = torch.zeros(K, l_txt, dtype=torch.long)
    for k, n in enumerate(variant_lengths):
        states[k, :n] = k + 1
        masks[k, :n] = 1
    n_lyr = 3 + len(key)
    return SongFeatures(key=key, latents=latents, mert=clock(n_mert, 6), mhubert=clock(n_hub, 5),
                        lyric_ids=torch.arange(1, n_lyr + 1), text_states=states, text_masks=masks)


def build_cache(folder, n_songs=17, frames=lambda i: 30 + 7 * i, per_shard=6, streams=tuple(STREAMS)):
    songs = {f"s{i:02d}": timed_song(f"s{i:02d}", frames(i)) for i in range(n_songs)}
    keys = list(songs)
    for stream in streams:
        for j in range(0, n_songs, per_shard):
            part = {k: songs[k] for k in keys[j:j + per_shard]}
            write_shard(folder, stream, None, part, f"fp-{stream}", {k: "h" for k in part},
                        settings=ShardSettings(chunk_bytes=4096))
    return songs


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    build_cache(folder)
    return folder


def frame_of(values: torch.Tensor) -> torch.Tensor:
    values = values.float()  # bf16 cannot hold the sum
    return (values[..., 0] + 256 * values[..., 1]).long()


def settings(**kw) -> LoaderSettings:
    base = dict(batch_size=2, max_seconds=4.0, shuffle_buffer=8, songs_per_unit=2, epochs=2, seed=7)
    base.update(kw)
    return LoaderSettings(**base)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys() or x["keys"] != y["keys"]:
            return False
        for name, value in x.items():
            if isinstance(value, torch.Tensor) and not torch.equal(value, y[name]):
                return False
            if name in ("mert", "mhubert") and not all(torch.equal(p, q) for p, q in zip(value, y[name])):
                return False
    return True


def test_batch_layout(cache_dir):
    batch = next(iter(make_loader(cache_dir, settings(batch_size=3, max_seconds=240.0, speaker_dim=512))))
    assert len(batch["keys"]) == 3
    b, t = 3, batch["latents"].shape[-1]
    assert batch["latents"].shape == (b, 8, 16, t) and batch["latents"].dtype == torch.bfloat16
    assert batch["latent_mask"].shape == (b, t) and batch["latent_mask"].dtype == torch.bfloat16
    assert batch["mert"][0].dtype == torch.bfloat16
    assert batch["text_states"].shape[0] == b and batch["text_states"].shape[2] == 4
    assert batch["text_mask"].dtype == torch.long and batch["text_mask"].shape == batch["text_states"].shape[:2]
    assert batch["speaker"].shape == (b, 512) and not batch["speaker"].any()
    assert batch["lyric_ids"].dtype == torch.long and batch["lyric_mask"].dtype == torch.long
    assert len(batch["mert"]) == b and batch["mert"][0].shape[1] == 6
    assert len(batch["mhubert"]) == b and batch["mhubert"][0].shape[1] == 5
    # equal-length crops: every sample is a window as long as the shortest song, nothing is padded
    lengths = [30 + 7 * int(key[1:]) for key in batch["keys"]]
    assert t == min(lengths) and batch["latent_mask"].all()
    for i in range(b):
        start = int(frame_of(batch["latents"][i, 0].T[:1]))
        assert torch.equal(frame_of(batch["latents"][i, 0].T), torch.arange(start, start + t))  # one window
        assert 0 <= start <= lengths[i] - t
        assert int(frame_of(batch["mert"][i][:1])) == round(start / LATENT_RATE * 75)  # the same time span
        assert int(batch["lyric_mask"][i].sum()) == int((batch["lyric_ids"][i] > 0).sum())


def test_batches_hold_songs_of_one_length_bucket(cache_dir):
    from cache.collate import latent_bucket

    window = max_frames(8.0)  # 86 frames: 9 of the 17 songs (30..142 frames) fill it, 8 are shorter
    bucket = {f"s{i:02d}": latent_bucket(min(30 + 7 * i, window), window) for i in range(17)}
    assert sorted(bucket.values()).count(window) == 9 and len(set(bucket.values())) == 7
    batches = list(make_loader(cache_dir, settings(batch_size=3, max_seconds=8.0, epochs=1)))
    assert [len(b["keys"]) for b in batches] == [3] * 5 + [2]  # as many as plain batching gives
    assert sorted(k for b in batches for k in b["keys"]) == sorted(bucket)
    one_bucket = [len({bucket[k] for k in b["keys"]}) == 1 for b in batches]
    assert one_bucket[:3] == [True] * 3  # the full-window songs; then the leftovers, longest first
    for b in batches:
        assert b["latent_mask"].all()  # equal-length crops, nothing padded
        assert b["latents"].shape[-1] == min(min(30 + 7 * int(k[1:]), window) for k in b["keys"])


def test_collate_pads_and_masks(cache_dir):
    a, b = timed_song("a", 10), timed_song("bbbb", 14)
    samples = [make_sample(a, random.Random(0), 240.0), make_sample(b, random.Random(1), 240.0)]
    batch = collate(samples, speaker_dim=7)
    assert batch["latents"].shape == (2, 8, 16, 14) and batch["latents"].dtype == torch.float32
    assert batch["mert"][1].dtype == torch.float32 and batch["text_states"].dtype == torch.float32
    assert batch["latent_mask"].tolist()[0] == [1.0] * 10 + [0.0] * 4
    assert batch["lyric_mask"].sum(1).tolist() == [4, 7]
    assert batch["speaker"].shape == (2, 7)
    wide = next(iter(make_loader(cache_dir, settings(dtype="float32"))))
    assert all(wide[n].dtype == torch.float32 for n in ("latents", "latent_mask", "text_states", "speaker"))
    assert wide["mhubert"][0].dtype == torch.float32


def test_choose_variant_trims_padding_and_covers_all():
    song = timed_song("x", 10, variant_lengths=(2, 6, 4))
    seen = set()
    for seed in range(40):
        states, mask = choose_variant(song, random.Random(seed))
        k = int(states[0, 0]) - 1
        assert states.shape == (len(mask), 4) and mask.tolist() == [1] * [2, 6, 4][k]
        seen.add(k)
    assert seen == {0, 1, 2}


def test_crop_song_aligns_streams():
    song = timed_song("x", 3000)
    start, n = 1234, 500
    crop = crop_song(song, start, n)
    t0, t1 = start / LATENT_RATE, (start + n) / LATENT_RATE
    assert frame_of(crop.latents[0].T).tolist() == list(range(start, start + n))
    assert frame_of(crop.mert).tolist() == list(range(round(t0 * 75), round(t1 * 75)))
    assert frame_of(crop.mhubert).tolist() == list(range(round(t0 * 50), round(t1 * 50)))
    assert torch.equal(crop.lyric_ids, song.lyric_ids) and crop.text_states is song.text_states


def test_random_crops_are_aligned_and_bounded(cache_dir):
    loader = make_loader(cache_dir, settings(batch_size=1, max_seconds=3.0, epochs=3))
    window = max_frames(3.0)
    starts = {}
    for batch in loader:
        lat = frame_of(batch["latents"][0, 0].T)
        n = lat.shape[0]
        start = int(lat[0])
        assert n <= window and torch.equal(lat, torch.arange(start, start + n))
        t0, t1 = start / LATENT_RATE, (start + n) / LATENT_RATE
        mert, hub = frame_of(batch["mert"][0]), frame_of(batch["mhubert"][0])
        assert mert.tolist() == list(range(round(t0 * 75), round(t1 * 75)))  # the same span
        assert hub.tolist() == list(range(round(t0 * 50), round(t1 * 50)))
        starts.setdefault(batch["keys"][0], set()).add(start)
    assert len(starts) == 17
    assert any(len(s) > 1 for s in starts.values())  # the window moves between epochs


def test_deterministic_and_seed_dependent(cache_dir):
    first = list(make_loader(cache_dir, settings()))
    again = list(make_loader(cache_dir, settings()))
    other = list(make_loader(cache_dir, settings(seed=8)))
    assert same_batches(first, again)
    assert [b["keys"] for b in first] != [b["keys"] for b in other]
    per_epoch = len(first) // 2
    epoch0 = sorted(k for b in first[:per_epoch] for k in b["keys"])
    epoch1 = [k for b in first[per_epoch:] for k in b["keys"]]
    assert epoch0 == sorted(epoch1) == [f"s{i:02d}" for i in range(17)]
    assert [k for b in first[:per_epoch] for k in b["keys"]] != epoch1  # reshuffled each epoch


def test_worker_count_does_not_change_batches(cache_dir):
    single = list(make_loader(cache_dir, settings()))
    workers = list(make_loader(cache_dir, settings(num_workers=2)))
    assert same_batches(single, workers)


@pytest.mark.parametrize("stop_after,workers", [(0, 0), (3, 0), (9, 0), (11, 2)])
def test_resume_matches_uninterrupted_run(cache_dir, stop_after, workers):
    full = list(make_loader(cache_dir, settings(epochs=3)))
    loader = make_loader(cache_dir, settings(epochs=3, num_workers=workers))
    taken = list(itertools.islice(loader, stop_after))  # a batch handed over counts as consumed
    state = loader.state_dict()
    resumed = make_loader(cache_dir, settings(epochs=3, num_workers=workers))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert same_batches(taken + rest, full)
    assert resumed.state_dict()["epoch"] == 2


def test_nodes_and_workers_cover_each_song_once(cache_dir, monkeypatch):
    seen = []
    for rank in range(2):
        loader = make_loader(cache_dir, settings(epochs=1, num_workers=2, rank=rank, world_size=2))
        seen += [k for b in loader for k in b["keys"]]
    assert sorted(seen) == [f"s{i:02d}" for i in range(17)]
    # same split when the node comes from the environment (torchrun's RANK / WORLD_SIZE)
    from_env = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        from_env += [k for b in make_loader(cache_dir, settings(epochs=1)) for k in b["keys"]]
    assert from_env == seen


def test_memory_url_with_workers(tmp_path):
    url = f"memory://loadertest-{uuid.uuid4().hex[:6]}"
    build_cache(url, n_songs=5)
    local = tmp_path / "c"
    build_cache(local, n_songs=5)
    got = list(make_loader(url, settings(num_workers=2)))
    want = list(make_loader(local, settings()))
    assert same_batches(got, want) and len(got) == 6


def test_subset_missing_streams_and_errors(tmp_path):
    build_cache(tmp_path, n_songs=5, streams=("latents", "text", "mert"))
    with pytest.raises(CacheError, match=r"no mhubert features.*dvc repro"):
        make_loader(tmp_path, settings())
    loader = make_loader(tmp_path, settings(streams=("latents", "text"), epochs=1), keys=["s01", "s03"])
    batches = list(loader)
    assert sorted(k for b in batches for k in b["keys"]) == ["s01", "s03"]
    assert batches[0]["mert"] == [None] * len(batches[0]["keys"])
    with pytest.raises(CacheError, match="not in the feature cache"):
        make_loader(tmp_path, settings(streams=("latents", "text")), keys=["nope"])
    # few songs on several nodes: units shrink so every node gets some ...
    make_loader(tmp_path, settings(streams=("latents", "text"), songs_per_unit=4, rank=2, world_size=3))
    # ... until there are more nodes than songs
    with pytest.raises(CacheError, match="node 5 of 6 gets no songs"):
        make_loader(tmp_path, settings(streams=("latents", "text"), songs_per_unit=4, rank=5, world_size=6))
    with pytest.raises(CacheError, match="empty or missing"):
        make_loader(tmp_path / "nothing", settings())
