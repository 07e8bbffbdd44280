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

    with pytest.raises(ConfigError, match="--allow-cpu-full"):
        bench.run_benchmark(bench.BenchSettings(size="full", device="cpu"), echo=lambda *_: None)


def test_rows_take_any_train_setting_and_check_them():
    from pipeline.errors import ConfigError

    settings = bench.BenchSettings(ranks=(16, 64), train={"max_seconds": "120"},
                                   matrix={"gradient_checkpointing": ["true", "false"], "batch_size": ["1", "2"]})
    rows = bench.bench_rows(settings)
    assert len(rows) == 8 and rows[0]["label"] == "r=16, gradient_checkpointing=true, batch_size=1"
    assert all(r["train"]["max_seconds"] == "120" and r["train"]["precision"] == "bf16-true" for r in rows)
    with pytest.raises(ConfigError, match="unknown train setting"):
        bench.bench_rows(bench.BenchSettings(matrix={"gradient_chekpointing": ["true"]}))
    with pytest.raises(ConfigError, match="not a valid"):
        bench.bench_rows(bench.BenchSettings(train={"batch_size": "two"}))
    with pytest.raises(ConfigError, match="set by the bench itself"):
        bench.bench_rows(bench.BenchSettings(train={"rank": "8"}))
    assert bench.run_key(settings, cuda=True) == \
        "demo-cuda-bf16-true-180s-max_seconds=120-gradient_checkpointing=true|false-batch_size=1|2"


def _probe(gib: float) -> dict:
    return {"machine": {"gpu": "Test GPU", "gpu_memory_bytes": int(gib * 2**30)}, "encoder_params": 848_000_000}


def test_full_size_memory_is_estimated_before_anything_loads():
    """A GPU too small for every row: one line with the estimate and what to change. One too small for
    some rows: those are skipped (one line each), the others run."""
    from pipeline.errors import ConfigError

    settings = bench.BenchSettings(size="full", modes=("floor", "cached"), matrix={"gradient_checkpointing": ["true", "false"]})
    with pytest.raises(ConfigError) as info:
        bench.check_memory_up_front(settings, bench.bench_rows(settings), _probe(4), cuda=True, checkpoint_ready=True)
    message = str(info.value)
    assert "\n" not in message and "GiB" in message and "Test GPU" in message and "lower --rank (now 64)" in message
    lines = []
    fits = bench.check_memory_up_front(settings, bench.bench_rows(settings), _probe(12), cuda=True,
                                       checkpoint_ready=True, echo=lines.append)
    assert [r["label"] for r in fits] == ["r=64, gradient_checkpointing=true"]
    assert len(lines) == 1 and "gradient_checkpointing=false" in lines[0] and "--set gradient_checkpointing=true" in lines[0]
    live = bench.BenchSettings(size="full", modes=("live",))  # the encoders (fp32) count too
    with pytest.raises(ConfigError, match="encoders"):
        bench.check_memory_up_front(live, bench.bench_rows(live), _probe(8), cuda=True, checkpoint_ready=True)


def test_out_of_memory_in_a_mode_is_one_line_and_recorded(tmp_path, monkeypatch):
    from pipeline.tiny.small import FULL_TRANSFORMER_CONFIG

    def child(spec, workdir, label, echo=print):
        return {"mode": spec["mode"], "error": "out_of_memory",
                "message": "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB total capacity)"}

    monkeypatch.setattr(bench, "_run_child", child)
    monkeypatch.setattr(bench, "_transformer_config", lambda base: FULL_TRANSFORMER_CONFIG)
    settings = bench.BenchSettings(size="full", modes=("cached",), train={"gradient_checkpointing": "false"})
    lines = []
    modes = bench._run_modes(settings, bench.bench_rows(settings)[0], {}, tmp_path, lines.append)
    assert modes["cached"]["error"] == "out_of_memory"
    assert len(lines) == 1 and "Tried to allocate 2.00 GiB" in lines[0]
    assert "recompute every block (--set gradient_checkpointing=true)" in lines[0] and "lower --rank (now 64)" in lines[0]


def test_the_feature_build_is_shared_by_every_rank(tmp_path):
    """The prepare child (all four encoders) runs once per workdir, whatever the rank: the checkpoint,
    songs and cache do not depend on it. The FLOP ratio does, and is counted for each run's rank."""
    calls = []

    def child(spec, workdir, label, echo=print):
        calls.append(spec)
        return {"configs": configs("small"), "shapes": {"tokens": 1938, "text_tokens": 64, "lyric_tokens": 300},
                "encoder_flops": {"total": 1e13}, "encoder_flops_full_size": {"total": 1e14}}

    cache = tmp_path / "cache"
    cache.mkdir()
    base = {"project": {"paths": {"cache": str(cache)}}}
    ratios = []
    for rank in (16, 256):
        settings = bench.BenchSettings(size="small", ranks=(rank,))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(bench, "_run_child", child)
            prep = bench._prepare(settings, base, tmp_path, tmp_path / "ckpt", lambda *_: None)
        ratios.append(bench._flop_ratios(settings, prep))
    assert len(calls) == 1 and "rank" not in calls[0]
    small, big = (r["flop_ratio"]["transformer_step"] for r in ratios)
    assert small < big and ratios[0]["flop_ratio_full_size"]["encoders_over_step"] > 0


def test_compiled_rows_count_the_bucketed_shapes():
    """Compiled, a 3-minute song (1938 frames) is cut to its shape bucket and the lyrics padded: the
    FLOPs are for the tokens the model computes on, the sizes bucket_batch gives."""
    from cache.collate import bucket_batch

    batch = {"latents": torch.zeros(1, 8, 16, 1938, dtype=torch.bfloat16),
             "latent_mask": torch.ones(1, 1938, dtype=torch.bfloat16),  # a bf16 sum would say 1936
             "text_states": torch.zeros(1, 64, 8), "text_mask": torch.ones(1, 64, dtype=torch.long),
             "lyric_ids": torch.zeros(1, 300, dtype=torch.long), "lyric_mask": torch.ones(1, 300, dtype=torch.long)}
    cut = bucket_batch(batch, torch.Generator().manual_seed(0), 240.0)
    shapes, eager = {}, {}
    assert list(bench._Shapes([batch], shapes, 240.0)) == [batch] and list(bench._Shapes([batch], eager)) == [batch]
    assert (shapes["tokens"], shapes["lyric_tokens"]) == (cut["latents"].shape[-1], cut["lyric_ids"].shape[1])
    assert shapes["tokens"] < 1938 and shapes["lyric_tokens"] > 300 and shapes["text_tokens"] == 64
    assert (eager["tokens"], eager["lyric_tokens"]) == (1938, 300)


def test_demo_bench_parent_holds_no_model_and_reports_memory(tmp_path):
    """The demo size end to end, its parent in a fresh interpreter: it never imports torch or a model,
    every mode reports host memory next to the memory model, and (CI regression check, a ratio of
    medians from one run, never an absolute time) the cached step is not slower than the live one."""
    import subprocess
    import sys

    out = tmp_path / "result.json"
    code = f"""
import json, sys
from pipeline import bench
settings = bench.BenchSettings(size="demo", song_seconds=6.0, precision="fp32", steps=3, warmup=1, device="cpu",
                               threads=1, workdir={str(tmp_path / "work")!r}, loader_seconds=1.0,
                               command="pytest tests/test_bench.py")
record = bench.run_benchmark(settings, echo=lambda *_: None)
bench.write_reports({{"runs": {{record["key"]: record}}}}, __import__("pathlib").Path({str(tmp_path / "benchmarks.md")!r}),
                    __import__("pathlib").Path({str(tmp_path / "benchmarks.json")!r}))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "peft", "zarr",
               "webdataset") or m.startswith(("pipeline.models", "cache.loader", "pipeline.train.")))
json.dump({{"record": record, "heavy": heavy}}, open({str(out)!r}, "w"))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["heavy"] == []  # the parent imported no torch and no model
    record = data["record"]
    assert record["parent"]["peak_rss_mb"] > 0
    row = bench.summary_rows(record)[0]
    assert row["cached_s"] < row["live_s"], bench.table_text(record)
    modes = record["rows"][0]["modes"]
    for mode in ("floor", "cached", "live"):
        m = modes[mode]
        assert len(m["step_times"]) == 4
        assert m["peak_rss_mb"] > 0 and m["rss_anon_mb"] > 0 and "rss_file_mb" in m
        assert m["after_load"]["rss_mb"] > 0 and m["training_peak_rss_mb"] > 0
    assert len(modes["paired"]["step_times"]) == 8 and row["paired_cached_over_floor"] > 0
    assert modes["live"]["encoders_param_bytes"] > 0
    assert modes["floor"]["loader_workers"] == modes["cached"]["loader_workers"] == 0  # as `aceturbo train` on the CPU
    assert "loader_workers" not in modes["live"]  # live encodes in process: no cache loader
    assert modes["floor"]["shapes"] == modes["cached"]["shapes"]
    estimate = record["rows"][0]["estimate"]
    assert estimate["total"] > estimate["weights"] > 0 and row["estimate_over_measured"] > 0
    assert record["cache"]["mb_per_minute"]["total"] > 0 and record["loader_samples_per_s"] > 0
    assert all(v["audio_s_per_s"] > 0 for v in record["prepare"]["streams"].values())
    text = (tmp_path / "benchmarks.md").read_text()
    assert "Not run yet" in text and "pytest tests/test_bench.py" in text and "## Memory" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["runs"][record["key"]]["size"] == "demo"


def test_bad_bench_options_are_one_line(capsys):
    from stages.cli import main

    for argv, expected in ((["bench", "--set", "gradient_checkpointing"], "--set takes NAME=VALUE"),
                           (["bench", "--matrix", "warp_speed=1,2"], "unknown train setting(s) warp_speed"),
                           (["bench", "--modes", "floor,fast"], "--modes takes")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert info.value.code == 1 and err.startswith("Error: ") and expected in err and "\n" not in err
