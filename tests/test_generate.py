"""`generate`, the `aceturbo generate` command and the training preview.

Plumbing tests use small stand-ins for the models (fast, independent of the model modules); the
end-to-end tests run the real loaders on the tiny random checkpoint from pipeline/tiny."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

import pipeline.sampling.generation as gen
from pipeline.errors import CheckpointError, ConfigError
from pipeline.preview import PreviewSettings, make_preview_callback, preview_text
from pipeline.sampling import SamplerSettings, frames_for_duration, generate, params_path


# ------------------------------------------------------------------------------ stand-ins
class _Lin(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_q = torch.nn.Linear(d, d)


class StandInTransformer(torch.nn.Module):
    def __init__(self, d=4, text_dim=6, speaker_dim=3, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.genre_embedder = torch.nn.Linear(text_dim, d)
        self.speaker_embedder = torch.nn.Linear(speaker_dim, d)
        self.lyric_embs = torch.nn.Embedding(vocab, d)
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
        for blk in self.transformer_blocks:
            blk.attn, blk.cross_attn = _Lin(d), _Lin(d)
        self.out = torch.nn.Linear(d, 8)

    def encode(self, encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask):
        states = torch.cat([self.speaker_embedder(speaker_embeds)[:, None],
                            self.genre_embedder(encoder_text_hidden_states), self.lyric_embs(lyric_token_idx)], 1)
        mask = torch.cat([torch.ones_like(text_attention_mask[:, :1]), text_attention_mask, lyric_mask], 1)
        return states, mask

    def decode(self, hidden_states, attention_mask, encoder_hidden_states, encoder_hidden_mask, timestep):
        ctx = encoder_hidden_states.mean(1)
        for blk in self.transformer_blocks:
            ctx = ctx + 0.1 * torch.tanh(blk.attn.to_q(ctx) + blk.cross_attn.to_q(ctx))
        return (0.5 * hidden_states + self.out(ctx)[:, :, None, None],)


class StandInTextEncoder:
    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts[0]))
        return torch.randn(len(prompts), 5, 6, generator=g), torch.ones(len(prompts), 5, dtype=torch.long)

    def erg_null_encode(self, prompts):
        return torch.zeros(len(prompts), 5, 6)


class StandInTokenizer:
    def tokenize(self, lyrics):
        return [1] + [ord(c) % 50 for c in lyrics][:20]

    def require_fits(self, embedding_rows, checkpoint):
        assert embedding_rows >= 50


class StandInCodec:
    released = 0

    def decode(self, latents, audio_lengths=None, sr=None):
        n = int(latents.shape[-1] * 4096 * 48000 / 44100)
        curves = [torch.tanh(lat.mean(dim=(0, 1)))[None, None] for lat in latents]
        wavs = [0.5 * torch.nn.functional.interpolate(c, size=n)[0].repeat(2, 1) for c in curves]
        return 48000, wavs

    decode_auto = decode

    def __del__(self):
        StandInCodec.released += 1


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    monkeypatch.setattr(gen, "load_transformer", lambda root, device, dtype: StandInTransformer().to(device, dtype))
    monkeypatch.setattr(gen, "load_text_encoder", lambda root, device, dtype: StandInTextEncoder())
    monkeypatch.setattr(gen, "load_lyric_tokenizer", lambda vocab: StandInTokenizer())
    monkeypatch.setattr(gen, "load_codec", lambda root, device: StandInCodec())
    import pipeline.preview as preview

    monkeypatch.setattr(preview, "load_codec", lambda root, device: StandInCodec())
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "lyrics_vocab.json").write_text("{}")
    return root


FAST = SamplerSettings(steps=4)


# ------------------------------------------------------------------------------ plumbing
def test_generate_writes_wav_and_every_parameter(stand_ins, tmp_path):
    out = generate(stand_ins, "synthwave, female vocals", "[verse]\nhello", duration=2.0, steps=4, seed=7,
                   out=tmp_path / "song.wav", settings=FAST, progress=False)
    assert out == tmp_path / "song.wav"
    data, sr = sf.read(out)
    assert sr == 48000 and data.shape[1] == 2
    assert data.shape[0] == int(frames_for_duration(2.0) * 4096 * 48000 / 44100)
    meta = json.loads(params_path(out).read_text())
    assert params_path(out) == tmp_path / "song.json"
    assert meta["prompt"] == "synthwave, female vocals" and meta["lyrics"] == "[verse]\nhello"
    assert meta["seed"] == 7 and meta["steps"] == 4 and meta["guidance_scale"] == 15.0
    assert meta["cfg_type"] == "apg" and meta["sampler"]["omega"] == 10.0
    assert meta["lora"] is None and meta["latent_frames"] == frames_for_duration(2.0)
    assert meta["sample_rate"] == 48000 and math.isclose(meta["duration_s"], data.shape[0] / 48000)
    assert {"load_transformer_s", "encode_s", "sampling_s", "decode_s", "total_s"} <= set(meta["timings"])
    assert "torch" in meta["versions"] and "diffusers" in meta["versions"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_generate_same_seed_same_audio(stand_ins, tmp_path):
    a = generate(stand_ins, "p", "la la", 2.0, 4, seed=3, out=tmp_path / "a.wav", settings=FAST, progress=False)
    b = generate(stand_ins, "p", "la la", 2.0, 4, seed=3, out=tmp_path / "b.wav", settings=FAST, progress=False)
    c = generate(stand_ins, "p", "la la", 2.0, 4, seed=4, out=tmp_path / "c.wav", settings=FAST, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_generate_user_errors(stand_ins, tmp_path):
    with pytest.raises(ConfigError, match=r"\.wav"):
        generate(stand_ins, "p", "", 2.0, 4, out=tmp_path / "song.mp3", settings=FAST)
    with pytest.raises(ConfigError, match="duration"):
        generate(stand_ins, "p", "", 0.0, 4, out=tmp_path / "song.wav", settings=FAST)
    with pytest.raises(CheckpointError, match="--checkpoint"):
        generate(tmp_path / "nowhere", "p", "", 2.0, 4, out=tmp_path / "song.wav", settings=FAST)
    with pytest.raises(CheckpointError, match="--lyric-vocab"):
        generate(stand_ins, "p", "", 2.0, 4, out=tmp_path / "s.wav", lyric_vocab=tmp_path / "no.json", settings=FAST)
    with pytest.raises(CheckpointError, match="--lora"):
        generate(stand_ins, "p", "", 2.0, 4, out=tmp_path / "s.wav", lora=tmp_path / "missing_lora", settings=FAST)


def test_cli_generate(stand_ins, tmp_path):
    from stages.cli import group

    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("[chorus]\nsing along\n", encoding="utf-8")
    out = tmp_path / "cli.wav"
    result = CliRunner().invoke(group, [
        "generate", "--checkpoint", str(stand_ins), "--prompt", "lofi, piano", "--lyrics", str(lyrics),
        "--duration", "2", "--steps", "3", "--seed", "5", "--out", str(out), "--guidance", "7",
        "--cfg-type", "cfg", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    meta = json.loads(out.with_suffix(".json").read_text())
    assert (meta["steps"], meta["seed"], meta["guidance_scale"], meta["cfg_type"]) == (3, 5, 7.0, "cfg")
    assert meta["lyrics"] == "[chorus]\nsing along" and meta["prompt"] == "lofi, piano"
    assert out.exists()


def test_cli_user_error_is_one_line(stand_ins, tmp_path, capsys):
    from stages.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "--checkpoint", str(stand_ins), "--prompt", "p", "--lyrics", str(tmp_path / "none.txt"),
              "--out", str(tmp_path / "x.wav")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error:") and "--lyrics" in err and "\n" not in err


def _batch(frames=(6, 4), keys=("songs/a", "b")):
    g = torch.Generator().manual_seed(0)
    T = max(frames)
    mask = torch.zeros(len(frames), T)
    for i, n in enumerate(frames):
        mask[i, :n] = 1
    return {
        "latents": torch.randn(len(frames), 8, 16, T, generator=g),
        "latent_mask": mask,
        "text_states": torch.randn(len(frames), 5, 6, generator=g),
        "text_mask": torch.ones(len(frames), 5, dtype=torch.long),
        "speaker": torch.zeros(len(frames), 3),
        "lyric_ids": torch.randint(0, 50, (len(frames), 9), generator=g),
        "lyric_mask": torch.ones(len(frames), 9, dtype=torch.long),
        "keys": list(keys),
    }


def test_preview_callback_writes_reference_files(stand_ins, tmp_path):
    run = tmp_path / "run"
    texts = {"b": ("rock, guitar", "[verse]\nyeah")}
    cb = make_preview_callback(stand_ins, None, run, PreviewSettings(sampler=FAST, sample_index=1), texts=texts)
    model = StandInTransformer()
    model.train()
    released = StandInCodec.released
    folder = cb(model, _batch(), 20)
    assert folder == run / "eval_results" / "step_20"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["key_prompt_lyric_b_0.txt", "pred_wav_b_0.wav", "target_wav_b_0.wav"]
    target, sr = sf.read(folder / "target_wav_b_0.wav")
    pred, _ = sf.read(folder / "pred_wav_b_0.wav")
    assert sr == 48000 and target.shape == pred.shape == (int(4 * 4096 * 48000 / 44100), 2)  # own length
    assert (folder / "key_prompt_lyric_b_0.txt").read_text() == preview_text("b", "rock, guitar", "[verse]\nyeah", 1234)
    assert model.training  # the trainer's mode is left as it was
    assert StandInCodec.released > released  # the codec did not outlive the preview


def test_preview_callback_safe_file_names_and_missing_texts(stand_ins, tmp_path):
    cb = make_preview_callback(stand_ins, None, tmp_path, FAST)
    folder = cb(StandInTransformer(), _batch(), 0)
    assert (folder / "pred_wav_songs_a_0.wav").exists()
    assert "not given" in (folder / "key_prompt_lyric_songs_a_0.txt").read_text()


def test_preview_callback_from_project(stand_ins, tmp_path):
    from pipeline.config import ProjectConfig

    project = ProjectConfig()
    project.models.acestep = str(stand_ins)
    project.paths.cache = str(tmp_path / "cache")  # no manifest yet: texts unknown
    cb = make_preview_callback(project=project, run_dir=tmp_path / "run", settings=FAST)
    assert cb(StandInTransformer(), _batch(), 2).parent == tmp_path / "run" / "eval_results"


# ------------------------------------------------------------------------------ real tiny models
LYRICS = "[verse]\nhello world\nsing along with me\n\n[chorus]\nla la la"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint in the real layout (+ a demo lyric vocabulary), built once."""
    for mod in ("pipeline.tiny.transformer", "pipeline.tiny.codec", "pipeline.tiny.text",
                "pipeline.models.transformer", "pipeline.models.codec", "pipeline.models.text_encoder",
                "pipeline.text.lyrics"):
        pytest.importorskip(mod)
    from pipeline.tiny.codec import save_tiny_codec
    from pipeline.tiny.text import save_demo_lyric_vocab, save_tiny_umt5
    from pipeline.tiny.transformer import save_tiny_transformer

    root = tmp_path_factory.mktemp("tiny")
    ckpt = root / "ACE-Step-v1-tiny"
    vocab = root / "lyrics_vocab.json"  # beside the checkpoint: found without --lyric-vocab
    vocab_size = save_demo_lyric_vocab(vocab, [LYRICS])
    save_tiny_umt5(ckpt / "umt5-base", d_model=12)
    save_tiny_codec(ckpt)
    save_tiny_transformer(ckpt / "ace_step_transformer", text_embedding_dim=12, lyric_vocab_size=vocab_size)
    return ckpt


def test_generate_end_to_end_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    settings = SamplerSettings(steps=3, guidance_interval=1.0)
    # Short clips: the tiny codec still decodes at real audio rates (seconds per second on a CPU).
    out = generate(tiny_checkpoint, "synthwave, female vocals", LYRICS, duration=0.3, steps=3, seed=1,
                   out=tmp_path / "a.wav", settings=settings, progress=False)
    data, sr = sf.read(out)
    assert sr == 48000 and data.ndim == 2 and data.shape[1] == 2
    assert abs(data.shape[0] - frames_for_duration(0.3) * 4096 * 48000 / 44100) <= 2
    assert np.isfinite(data).all()
    meta = json.loads(params_path(out).read_text())
    assert meta["lyric_tokens"] > 5 and meta["dtype"] == "float32" and meta["device"] == "cpu"
    again = generate(tiny_checkpoint, "synthwave, female vocals", LYRICS, duration=0.3, steps=3, seed=1,
                     out=tmp_path / "b.wav", settings=settings, progress=False)
    assert out.read_bytes() == again.read_bytes()  # deterministic per seed


def _tiny_lora(tiny_checkpoint, folder: Path, r=4, alpha=32.0, rslora=True) -> Path:
    lora = pytest.importorskip("pipeline.lora")
    from pipeline.models.transformer import ACEStepTransformer2DModel

    model = ACEStepTransformer2DModel.from_pretrained(tiny_checkpoint / "ace_step_transformer")
    settings = lora.LoraSettings(r=r, alpha=alpha, use_rslora=rslora)
    lora.apply_lora(model, settings)
    with torch.no_grad():  # B starts at zero: give the adapter an effect
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return Path(lora.save_lora(model, folder, settings))


@pytest.mark.parametrize("rslora", [True, False])
def test_lora_is_applied_at_its_trained_scale(tiny_checkpoint, tmp_path, rslora, monkeypatch):
    lora_dir = _tiny_lora(tiny_checkpoint, tmp_path / "epoch=0-step=1_lora", rslora=rslora)  # the file form
    dev = torch.device("cpu")
    model = gen.load_transformer(tiny_checkpoint, dev, torch.float32)
    import pipeline.lora

    headers = []
    real = pipeline.lora._read_header
    monkeypatch.setattr(pipeline.lora, "_read_header", lambda file: headers.append(file) or real(file))
    info = gen.apply_lora(model, lora_dir, 0.5)
    assert len(headers) == 1  # the file's header is read once
    expected = 32.0 / math.sqrt(4) if rslora else 32.0 / 4
    assert math.isclose(info["trained_scale"], expected) and math.isclose(info["effective_scale"], 0.5 * expected)
    assert info["baked"] and "baked" in info["scale_source"]
    # the file's lora_B carries the trained scale: the layers apply weight × 1 to it
    scalings = {m.scaling["ace_step_lora"] for m in model.modules() if hasattr(m, "scaling") and "ace_step_lora" in m.scaling}
    assert scalings == {0.5}


def test_cli_generate_with_lora_end_to_end(tiny_checkpoint, tmp_path):
    from stages.cli import group

    lora_dir = _tiny_lora(tiny_checkpoint, tmp_path / "epoch=0-step=1_lora").parent  # the folder form
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text(LYRICS, encoding="utf-8")
    args = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "synthwave", "--lyrics", str(lyrics),
            "--duration", "0.2", "--steps", "3", "--seed", "9", "--device", "cpu"]
    runner = CliRunner()
    with_lora = runner.invoke(group, args + ["--lora", str(lora_dir), "--lora-weight", "1.5", "--out", str(tmp_path / "l.wav")])
    assert with_lora.exit_code == 0, with_lora.output
    meta = json.loads((tmp_path / "l.json").read_text())
    assert meta["lora_weight"] == 1.5 and math.isclose(meta["lora_effective_scale"], 1.5 * 32 / 2)
    assert "weight 1.5 x trained scale 16 (r=4, alpha=32, rsLoRA=True; the trained scale is baked into lora_B) " \
           "= applied scale 24" in with_lora.output
    assert meta["lora_path"] == str(lora_dir.resolve())
    plain = runner.invoke(group, args + ["--out", str(tmp_path / "p.wav")])
    assert plain.exit_code == 0, plain.output
    assert (tmp_path / "l.wav").read_bytes() != (tmp_path / "p.wav").read_bytes()


def test_preview_on_tiny_checkpoint(tiny_checkpoint, tmp_path):
    from pipeline.models.transformer import ACEStepTransformer2DModel

    model = ACEStepTransformer2DModel.from_pretrained(tiny_checkpoint / "ace_step_transformer")
    model.train()
    batch = _batch(frames=(2, 1))
    batch["text_states"] = torch.randn(2, 5, 12)
    batch["speaker"] = torch.zeros(2, 8)
    batch["lyric_ids"] = batch["lyric_ids"] % 10
    cb = make_preview_callback(tiny_checkpoint, None, tmp_path, SamplerSettings(steps=2))
    folder = cb(model, batch, 0)
    target, sr = sf.read(folder / "target_wav_songs_a_0.wav")
    pred, _ = sf.read(folder / "pred_wav_songs_a_0.wav")
    assert sr == 48000 and target.shape == pred.shape and abs(target.shape[0] - 2 * 4096 * 48000 / 44100) <= 2
    assert model.training


def test_cli_checkpoint_and_vocab_default_from_params(stand_ins, tmp_path, monkeypatch):
    from stages.cli import group

    (stand_ins / "lyrics_vocab.json").unlink()  # only params.yaml knows where the vocab is
    vocab = tmp_path / "vocab" / "v.json"
    vocab.parent.mkdir()
    vocab.write_text("{}")
    (tmp_path / "params.yaml").write_text(f"models:\n  acestep: {stand_ins}\n  lyric_vocab: {vocab}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(group, ["generate", "--prompt", "p", "--duration", "1", "--steps", "2",
                                        "--out", "d.wav", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "d.json").read_text())
    assert meta["checkpoint"] == str(stand_ins.resolve()) and meta["lyric_vocab"] == str(vocab.resolve())
    assert meta["lyrics"] == ""


def test_build_conditioning_with_real_text_encoder_and_erg_null(tiny_checkpoint):
    dev = torch.device("cpu")
    enc = gen.load_text_encoder(tiny_checkpoint, dev, torch.float32)
    tok = gen.load_lyric_tokenizer(tiny_checkpoint.parent / "lyrics_vocab.json")
    cond = gen.build_conditioning(enc, tok, ["rock, guitar", "a"], [LYRICS, ""], 8, dev, torch.float32, erg_null=True)
    assert cond.text_states.shape[:2] == cond.text_mask.shape == cond.text_states_null.shape[:2]
    assert cond.lyric_ids.shape == cond.lyric_mask.shape and cond.lyric_mask[1].sum() == 0  # no lyrics: [0], mask 0
    assert cond.speaker.shape == (2, 8) and torch.count_nonzero(cond.speaker) == 0
    model = gen.load_transformer(tiny_checkpoint, dev, torch.float32)
    latents = gen.sample(model, cond.as_dict(), SamplerSettings(steps=2, use_erg_lyric=True, guidance_interval=1.0),
                         seeds=0, n_frames=3, progress=False)
    assert latents.shape == (2, 8, 16, 3) and torch.isfinite(latents).all()
