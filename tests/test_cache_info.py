"""`aceturbo cache info` and the size measurement behind it."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cache.bench import measure_cache, synthetic_song
from cache.schema import LATENT_RATE, STREAMS
from cache.shards import write_shard
from stages.cache_info import cli
from stages.cli import main


@pytest.fixture
def cache_dir(tmp_path):
    songs = {f"k{i}": synthetic_song(f"k{i}", seconds=30.0, seed=i, text_variants=2, text_len=8, text_dim=16,
                                     mert_dim=32, mhubert_dim=24, lyric_len=20) for i in range(3)}
    for stream in STREAMS:
        write_shard(tmp_path, stream, None, songs, f"fp-{stream}-0123456789abcdef", {k: "h" for k in songs})
    return tmp_path


def test_measure_cache(cache_dir):
    m = measure_cache(cache_dir)
    assert m["songs"] == 3
    assert m["minutes"] == pytest.approx(3 * int(30 * LATENT_RATE) / LATENT_RATE / 60)
    assert set(m["bytes"]) == set(STREAMS) and all(b > 0 for b in m["bytes"].values())
    assert m["bytes_total"] == sum(m["bytes"].values())
    assert m["mb_per_minute"]["total"] == pytest.approx(m["bytes_total"] / 1e6 / m["minutes"])


def test_info_table_and_json(cache_dir):
    runner = CliRunner()
    out = runner.invoke(cli, ["info", "--cache", str(cache_dir)])
    assert out.exit_code == 0, out.output
    assert "3 songs, 1.5 minutes of audio" in out.output
    assert "fp-mert-0123" in out.output and "bfloat16" in out.output
    assert [line.split()[0] for line in out.output.splitlines()[5:]] == ["latents", "mert", "mhubert", "text", "total"]
    out = runner.invoke(cli, ["info", "--cache", str(cache_dir), "--json"])
    data = json.loads(out.output)
    assert data["songs"] == 3 and data["streams"]["text"]["fingerprints"] == ["fp-text-0123456789abcdef"]
    assert data["streams"]["mert"]["shards"] == 1 and data["streams"]["mert"]["bytes"] > 0


def test_info_empty_cache_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "info", "--cache", str(tmp_path / "none")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: feature cache") and "dvc repro" in err and "\n" not in err


def test_info_through_the_cli_group(cache_dir, capsys):
    main(["cache", "info", "--cache", str(cache_dir), "--json"])
    assert json.loads(capsys.readouterr().out)["streams"]["latents"]["songs"] == 3
