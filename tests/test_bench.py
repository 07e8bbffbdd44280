"""aceturbo bench: the FLOP counter on the real config, the size configs, and the CI regression check
(on the demo size, the cached training step must not be slower than the live one — a ratio, never a time)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline import bench
from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG, configs


def _meta_transformer(config):
    from pipeline.models.transformer import ACEStepTransformer2DModel

    with torch.device("meta"):
        return ACEStepTransformer2DModel(**config)


@pytest.mark.parametrize("size", ["full", "small"])
def test_param_count_matches_the_model(size):
    config = configs(size)["transformer"]
    model = _meta_transformer(config)
    assert bench.transformer_params(config)["total"] == sum(p.numel() for p in model.parameters())


def test_full_config_counts_match_the_spec():
    params = bench.transformer_params(FULL_TRANSFORMER_CONFIG)
    assert params["total"] == 3_305_659_264  # spec §1 (6.611 GB in 16 bits)
    assert params["blocks"] == 24 * 127_905_280  # "24 blocks × 127.9 M"
    assert 2.1e9 < params["latent_path"] < 2.3e9  # what each of the ~1,900 latent tokens goes through
    # spec §7: official rap LoRA r=256 with speaker_embedder; low-VRAM r=16 without it
    assert bench.lora_params(FULL_TRANSFORMER_CONFIG, 256) == 261_881_856
    targets = tuple(t for t in bench.OFFICIAL_TARGETS if t != "speaker_embedder")
    assert round(bench.lora_params(FULL_TRANSFORMER_CONFIG, 16, targets) / 1e6, 1) == 16.3


def test_step_flops_of_the_full_model():
    flops = bench.transformer_step_flops(FULL_TRANSFORMER_CONFIG, tokens=1900, rank=64)
    assert 25e12 <= flops["step_flops"] <= 35e12
    assert math.isclose(flops["step_flops"], flops["six_n_t"], rel_tol=0.15)  # the 6·N·T rule of thumb
    assert flops["model_flops"] < flops["step_flops"]  # recompute is not model work
    no_ckpt = bench.transformer_step_flops(FULL_TRANSFORMER_CONFIG, tokens=1900, rank=64, gradient_checkpointing=False)
    assert no_ckpt["step_flops"] == pytest.approx(flops["model_flops"])
    double = bench.transformer_step_flops(FULL_TRANSFORMER_CONFIG, tokens=3800, rank=64)
    assert 1.9 < double["step_flops"] / flops["step_flops"] < 2.2  # ~linear in tokens (attention terms)


@pytest.mark.parametrize("size", ["full", "small"])
def test_forward_count_agrees_with_torch_flop_counter(size):
    """The analytic forward (rank 0 = no LoRA) equals FlopCounterMode's on the model, within 2 %."""
    config = configs(size)["transformer"]
    model = _meta_transformer(config)
    T, L_txt, L_lyr = 1938, 64, 300
    with torch.device("meta"):
        kwargs = dict(
            hidden_states=torch.zeros(1, 8, 16, T), attention_mask=torch.ones(1, T),
            encoder_text_hidden_states=torch.zeros(1, L_txt, config["text_embedding_dim"]),
            text_attention_mask=torch.ones(1, L_txt), speaker_embeds=torch.zeros(1, config["speaker_embedding_dim"]),
            lyric_token_idx=torch.zeros(1, L_lyr, dtype=torch.long), lyric_mask=torch.ones(1, L_lyr),
            timestep=torch.ones(1),
            ssl_hidden_states=[[torch.zeros(13500, config["ssl_latent_dims"][0])],
                               [torch.zeros(9000, config["ssl_latent_dims"][1])]])
        counted = bench._meta_flops(lambda: model(**kwargs))
    analytic = bench.transformer_step_flops(config, T, L_txt, L_lyr, rank=0)["forward"]
    assert analytic == pytest.approx(counted, rel=0.02)


def test_full_size_encoders_are_real_size():
    from diffusers import AutoencoderDC
    from transformers import HubertConfig, HubertModel, UMT5Config, UMT5EncoderModel

    c = configs("full")
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    with torch.device("meta"):
        assert 150 < n(AutoencoderDC(**c["dcae"])) < 160  # spec §1: ~156 M
        assert 300 < n(HubertModel(HubertConfig(**c["mert"]))) < 335  # MERT-v1-330M
        assert 90 < n(HubertModel(HubertConfig(**c["mhubert"]))) < 100  # HuBERT-base
        u = c["umt5"]
        umt5 = UMT5EncoderModel(UMT5Config(d_model=u["d_model"], num_layers=u["num_layers"], num_heads=u["num_heads"],
                                           d_kv=u["d_kv"], d_ff=u["d_ff"], vocab_size=u["vocab_size"],
                                           feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        assert 275 < n(umt5) < 290  # spec §1.4: ~282 M


def test_small_size_keeps_the_real_compute_ratio():
    full = bench.compute_ratio(configs("full"), 180)
    small = bench.compute_ratio(configs("small"), 180)
    assert 0.5 < full["encoders_over_step"] < 2.0  # encoders per song ~ one transformer step
    assert small["encoders_over_step"] == pytest.approx(full["encoders_over_step"], rel=0.2)


def test_full_size_needs_a_gpu_or_an_explicit_flag():
    from pipeline.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="--allow-cpu-full"):
        bench.run_benchmark(bench.BenchSettings(size="full", device="cpu"), echo=lambda *_: None)


def test_cached_step_is_not_slower_than_live(tmp_path):
    """CI regression check on the demo size: a ratio of medians from one run, never an absolute time."""
    settings = bench.BenchSettings(size="demo", song_seconds=6.0, precision="fp32", steps=3, warmup=1,
                                   device="cpu", threads=1, workdir=str(tmp_path / "work"), loader_seconds=1.0,
                                   command="pytest tests/test_bench.py")
    record = bench.run_benchmark(settings, echo=lambda *_: None)
    row = bench.summary_rows(record)[0]
    assert row["cached_s"] < row["live_s"], bench.table_text(record)
    # every mode ran its steps and reported memory; the cache was measured
    modes = record["ranks"]["64"]["modes"]
    for mode in ("floor", "cached", "live"):
        assert len(modes[mode]["step_times"]) == 4 and modes[mode]["peak_rss_mb"] > 0
    assert len(modes["paired"]["step_times"]) == 8 and row["paired_cached_over_floor"] > 0
    assert record["ranks"]["64"]["modes"]["live"]["encoders_param_bytes"] > 0
    assert record["cache"]["mb_per_minute"]["total"] > 0 and record["loader_samples_per_s"] > 0
    assert all(v["audio_s_per_s"] > 0 for v in record["prepare"]["streams"].values())
    # the reports
    md, js = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    bench.write_reports({"runs": {record["key"]: record}}, md, js)
    text = md.read_text()
    assert "GPU table: not run" in text and "pytest tests/test_bench.py" in text
    assert json.loads(js.read_text())["runs"][record["key"]]["size"] == "demo"
