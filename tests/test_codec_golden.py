"""The codec (mel front end, vocoder, DCAE wrapper) against the reference outputs in
golden/acestep_tiny (made by the official ACE-Step code on tiny random weights).

Tolerance: max|ours - ref| / max|ref| ≤ 1e-4 (golden/README.md: resampling and long convolutions
accumulate rounding). Each test prints the measured error (`pytest -s` shows them).
"""
from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.codec import MusicDCAE
from pipeline.models.vocoder import ADaMoSHiFiGANV1

TOL = 1e-4


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@functools.lru_cache(maxsize=1)
def _codec(root: str) -> MusicDCAE:
    return MusicDCAE.from_checkpoint(root, dtype=torch.float32, device="cpu")


@pytest.fixture
def codec(golden):
    return _codec(str(golden))


@pytest.fixture
def io(golden):
    return load_file(golden / "dcae_inputs.safetensors"), load_file(golden / "dcae_outputs.safetensors")


def test_vocoder_checkpoint_keys_match_exactly(golden, tmp_path):
    folder = golden / "music_vocoder"
    vocoder, info = ADaMoSHiFiGANV1.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    on_disk = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert set(vocoder.state_dict()) == set(on_disk)
    # The mel buffers are taken from the checkpoint, not recomputed.
    assert torch.equal(vocoder.mel_transform.mel_scale.fb, on_disk["mel_transform.mel_scale.fb"])
    # Saving writes the released layout back (weight_g / weight_v, no parametrization names).
    vocoder.save_pretrained(tmp_path / "voc")
    saved = load_file(tmp_path / "voc" / "diffusion_pytorch_model.safetensors")
    assert set(saved) == set(on_disk)
    assert all(torch.equal(saved[k], on_disk[k]) for k in on_disk)


def test_mel_front_end(codec, io):
    inputs, outputs = io
    ref = outputs["mel_of_first_44k1_input"]
    with torch.inference_mode():
        mel = codec.vocoder.mel_transform(inputs["audios_48k"][0])
    err = rel_err(mel, ref)
    print(f"\nmel_of_first_44k1_input rel err {err:.3e}")
    assert mel.shape == ref.shape and err <= TOL


def test_vocoder_decode(codec, io):
    _, outputs = io
    ref = outputs["vocoder_decode_of_mel_channel0"]
    with torch.inference_mode():
        wav = codec.vocoder.decode(outputs["mel_of_first_44k1_input"][:1])
    err = rel_err(wav, ref)
    print(f"\nvocoder_decode_of_mel_channel0 rel err {err:.3e}")
    assert wav.shape == ref.shape and err <= TOL


def test_encode(codec, io):
    inputs, outputs = io
    latents, lengths = codec.encode(inputs["audios_48k"], inputs["audio_lengths"])
    err = rel_err(latents, outputs["latents"])
    print(f"\nlatents rel err {err:.3e}; latent_lengths {lengths.tolist()}")
    assert latents.shape == outputs["latents"].shape and err <= TOL
    assert torch.equal(lengths, outputs["latent_lengths"])


def test_decode(codec, io):
    _, outputs = io
    sr, wavs = codec.decode(outputs["latents"])
    assert sr == 44100
    for i, wav in enumerate(wavs):
        ref = outputs[f"decoded_wav_{i}"]
        err = rel_err(wav, ref)
        print(f"\ndecoded_wav_{i} rel err {err:.3e}")
        assert wav.shape == ref.shape and err <= TOL

