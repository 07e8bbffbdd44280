"""The codec wrapper on the tiny random-weight folders written by ``save_tiny_codec``: loading,
shapes, lengths, dtypes, overlapped decode and placement."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import CheckpointError
from pipeline.models import codec as codec_mod
from pipeline.models.codec import LATENT_RATE, MusicDCAE, latent_frames
from pipeline.tiny.codec import save_tiny_codec


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_codec(root, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny(tiny_root):
    return MusicDCAE.from_checkpoint(tiny_root)


def test_missing_folder_names_what_to_download(tmp_path):
    with pytest.raises(CheckpointError, match="music_dcae_f8c8.*ACE-Step/ACE-Step-v1-3.5B"):
        MusicDCAE.from_checkpoint(tmp_path)
    save_tiny_codec(tmp_path)
    (tmp_path / "music_vocoder" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="music_vocoder.*incomplete"):
        MusicDCAE.from_checkpoint(tmp_path)


def test_tiny_folders_have_released_format(tiny_root, tmp_path):
    for folder, cls in (("music_dcae_f8c8", "AutoencoderDC"), ("music_vocoder", "ADaMoSHiFiGANV1")):
        config = json.loads((tiny_root / folder / "config.json").read_text())
        assert config["_class_name"] == cls
    keys = load_file(tiny_root / "music_vocoder" / "diffusion_pytorch_model.safetensors")
    assert "head.conv_pre.weight_g" in keys and "head.conv_pre.weight_v" in keys
    assert "mel_transform.mel_scale.fb" in keys and "mel_transform.spectrogram.window" in keys
    assert not any(k.endswith("conv_pre.weight") or "parametrizations" in k for k in keys)
    # Non-degenerate: layer scales are not the 1e-6 init, biases not all zero.
    assert keys["backbone.stages.0.0.gamma"].abs().min() > 1e-3
    assert keys["head.conv_pre.bias"].abs().max() > 1e-3
    # Deterministic in the seed, different across seeds.
    save_tiny_codec(tmp_path / "a", seed=0)
    save_tiny_codec(tmp_path / "b", seed=1)
    a = load_file(tmp_path / "a" / "music_vocoder" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "music_vocoder" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(a["head.conv_pre.weight_v"], keys["head.conv_pre.weight_v"])
    assert not torch.equal(a["head.conv_pre.weight_v"], b["head.conv_pre.weight_v"])


def test_tiny_vocoder_output_follows_its_input(tiny):
    torch.manual_seed(4)
    mel_a, mel_b = torch.randn(2, 1, 128, 32) * 2 - 5
    wav_a, wav_b = tiny.mel_to_audio(mel_a), tiny.mel_to_audio(mel_b)
    assert (wav_a - wav_b).std() > 0.1 * wav_a.std()


def test_round_trip_shapes_5s_stereo(tiny):
    torch.manual_seed(0)
    audio = 0.1 * torch.randn(2, 2, 5 * 48000)
    latents, lengths = tiny.encode(audio, torch.tensor([5 * 48000, 3 * 48000]))
    frames = latent_frames(5 * 48000)
    assert frames == 54  # 220500 samples at 44.1 kHz -> 54 × 4096 after padding
    assert latents.shape == (2, 8, 16, frames) and latents.dtype == torch.float32
    assert torch.isfinite(latents).all() and latents.std() > 0
    assert not latents.is_inference()  # usable outside inference mode
    assert lengths.tolist() == [int(5 * LATENT_RATE), int(3 * LATENT_RATE)]  # [53, 32]

    # Back to 48 kHz cut to the input length, as the generation pipeline asks for it.
    sr, wavs = tiny.decode(latents[:1], audio_lengths=[5 * 48000], sr=48000)
    assert sr == 48000 and len(wavs) == 1 and wavs[0].shape == (2, 5 * 48000)
    assert torch.isfinite(wavs[0]).all() and wavs[0].abs().max() <= 1.0 and wavs[0].std() > 0
    assert not wavs[0].is_inference()


def test_decode_native_rate_length(tiny):
    sr, wavs = tiny.decode(torch.randn(2, 8, 16, 3))
    assert sr == 44100 and [w.shape for w in wavs] == [(2, 3 * 4096)] * 2


def test_decode_overlap_defaults():
    import inspect

    params = inspect.signature(MusicDCAE.decode_overlap).parameters
    # DCAE windows as the reference; vocoder windows overlap more than its 1024 samples (see codec).
    assert params["dcae_window"].default == 512 and params["dcae_hop"].default == 256
    assert params["vocoder_window"].default == 512 and params["vocoder_overlap"].default == 16384
    assert codec_mod.REFERENCE_VOCODER_OVERLAP == 1024 and codec_mod.VOCODER_FADE == 128


def test_decode_overlap_short_input_equals_decode(tiny):
    torch.manual_seed(1)
    latents = torch.randn(1, 8, 16, 8)  # 64 mel frames: one window for DCAE and vocoder
    _, plain = tiny.decode(latents)
    _, overlapped = tiny.decode_overlap(latents)
    assert torch.equal(plain[0], overlapped[0])


def _record_max_lengths(codec):
    seen = {"dcae": 0, "vocoder": 0}

    def record(name):
        def hook(module, args):
            seen[name] = max(seen[name], args[0].shape[-1])
        return hook

    handles = [
        codec.dcae.decoder.register_forward_pre_hook(record("dcae")),
        codec.vocoder.backbone.register_forward_pre_hook(record("vocoder")),
    ]
    return seen, handles


def test_decode_overlap_long_input_runs_in_bounded_windows(tiny):
    # Windows scaled down (16/8 latent frames, 64 mel frames) so a 40-frame input is "long": the
    # same code paths as 512/256/512 on minutes of audio, at a test's cost.
    torch.manual_seed(2)
    latents = torch.randn(1, 8, 16, 40)
    seen, handles = _record_max_lengths(tiny)
    try:
        sr, overlapped = tiny.decode_overlap(latents, dcae_window=16, dcae_hop=8, vocoder_window=64)
    finally:
        for handle in handles:
            handle.remove()
    assert sr == 44100 and overlapped[0].shape == (2, 40 * 4096)
    assert torch.isfinite(overlapped[0]).all()
    assert seen == {"dcae": 16, "vocoder": 64}  # never the whole input

    # DCAE windows change the result (its attention stage sees the whole window), but stay close.
    _, plain = tiny.decode(latents)
    diff = (plain[0] - overlapped[0]).abs()
    rel_mean = (diff.mean() / plain[0].abs().mean()).item()
    print(f"\nDCAE + vocoder windows vs plain decode: mean rel diff {rel_mean:.2e}")
    assert rel_mean < 0.1


def test_vocoder_windows_reproduce_whole_decode(tiny):
    # The vocoder is convolutional: with the default overlap its windows are seamless.
    torch.manual_seed(3)
    mel = torch.randn(2, 128, 200) * 2 - 5
    with torch.inference_mode():
        whole = tiny.mel_to_audio(mel)
        windowed = tiny._vocode_windows(mel, 64, codec_mod.VOCODER_OVERLAP)
        reference_style = tiny._vocode_windows(mel, 64, codec_mod.REFERENCE_VOCODER_OVERLAP)
    err = ((windowed - whole).abs().max() / whole.abs().max()).item()
    err_ref = ((reference_style - whole).abs().max() / whole.abs().max()).item()
    print(f"\nvocoder seams: max rel diff {err:.2e} (overlap 16384), {err_ref:.2e} (overlap 1024)")
    assert err < 1e-3


def test_bf16_compute_on_cpu(tiny_root, tiny):
    codec16 = MusicDCAE.from_checkpoint(tiny_root, dtype=torch.bfloat16)
    assert codec16.dcae.dtype == torch.bfloat16
    assert codec16.vocoder.head.conv_pre.weight_v.dtype == torch.bfloat16
    assert codec16.vocoder.mel_transform.mel_scale.fb.dtype == torch.float32  # front end stays fp32
    torch.manual_seed(3)
    audio = 0.1 * torch.randn(1, 2, 48000)
    lat16, _ = codec16.encode(audio)
    lat32, _ = tiny.encode(audio)
    assert lat16.dtype == torch.float32  # results come back in fp32 whatever the compute dtype
    assert (lat16 - lat32).abs().max() / lat32.abs().max() < 0.1
    _, wavs = codec16.decode(lat16)
    assert wavs[0].dtype == torch.float32 and torch.isfinite(wavs[0]).all()


def test_placement_cpu_defaults(tiny):
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32 and not tiny.offload
    assert not any(p.requires_grad for p in tiny.parameters())
    with tiny.placed():
        with tiny.placed():  # re-entrant
            pass


@pytest.mark.cuda
def test_cuda_offload(tiny_root):
    codec = MusicDCAE.from_checkpoint(tiny_root, device="cuda")
    assert codec.dtype == torch.bfloat16 and codec.offload
    assert next(codec.dcae.parameters()).device.type == "cpu"
    audio = 0.1 * torch.randn(1, 2, 48000)
    latents, _ = codec.encode(audio)
    assert latents.device.type == "cpu"  # back where the input came from
    assert next(codec.dcae.parameters()).device.type == "cpu"  # weights offloaded again
    _, wavs = codec.decode(latents.cuda())
    assert wavs[0].device.type == "cuda"
