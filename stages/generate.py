"""`aceturbo generate`: one song from a checkpoint (+ optional LoRA), a prompt and a lyrics file.

Thin: read the options, call pipeline.sampling.generate, print where the wav and its parameters
went.
"""
from __future__ import annotations

import click


@click.command("generate")
@click.option("--checkpoint", "checkpoint", default=None, type=click.Path(),
              help="ACE-Step-v1-3.5B folder (ace_step_transformer/, music_dcae_f8c8/, music_vocoder/, umt5-base/) "
                   "[default: params.yaml models.acestep].")
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
              help="Project settings, read only for the defaults of --checkpoint and --lyric-vocab.")
@click.option("--lora", default=None, type=click.Path(),
              help="LoRA checkpoint folder (…_lora/) or its pytorch_lora_weights.safetensors; official or ours.")
@click.option("--lora-weight", default=1.0, show_default=True, type=float,
              help="Multiplier on the LoRA's trained scale (alpha/sqrt(r) with rsLoRA, alpha/r otherwise).")
@click.option("--prompt", required=True, help='Tags / description, e.g. "synthwave, female vocals, 120 bpm".')
@click.option("--lyrics", "lyrics_file", default=None, type=click.Path(dir_okay=False),
              help="Lyrics text file ([verse], [chorus] … sections). Omit for an instrumental.")
@click.option("--duration", default=30.0, show_default=True, type=float, help="Length in seconds.")
@click.option("--steps", default=60, show_default=True, type=int, help="Sampling steps.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed (same seed, same song).")
@click.option("--out", "out", default="output.wav", show_default=True, type=click.Path(dir_okay=False),
              help="Output .wav (48 kHz); the parameters go beside it as .json.")
@click.option("--lyric-vocab", default=None, type=click.Path(dir_okay=False),
              help="VoiceBPE vocab.json [default: lyrics_vocab.json in or beside --checkpoint, "
                   "else params.yaml models.lyric_vocab].")
@click.option("--guidance", default=15.0, show_default=True, type=float, help="Guidance scale.")
@click.option("--cfg-type", default="apg", show_default=True, type=click.Choice(["apg", "cfg"]),
              help="apg: adaptive projected guidance (reference default); cfg: plain classifier-free guidance.")
@click.option("--omega", default=10.0, show_default=True, type=float, help="Step granularity (0: plain Euler).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Transformer/text-encoder dtype (auto: bfloat16 on CUDA, float32 on CPU).")
def cli(checkpoint, params_path, lora, lora_weight, prompt, lyrics_file, duration, steps, seed, out, lyric_vocab,
        guidance, cfg_type, omega, device, dtype):
    """Generate a song (48 kHz wav + .json of every parameter) with an optional LoRA."""
    from pipeline.sampling import SamplerSettings, generate, params_path as json_path
    from pipeline.sampling.generation import default_model_paths, read_lyrics_file

    if checkpoint is None or lyric_vocab is None:  # params.yaml is read only for what is not given
        from pipeline.config import load_params

        checkpoint, lyric_vocab = default_model_paths(load_params(params_path).models, checkpoint, lyric_vocab)

    settings = SamplerSettings(steps=steps, guidance_scale=guidance, cfg_type=cfg_type, omega=omega)
    wav = generate(
        checkpoint_root=checkpoint,
        prompt=prompt,
        lyrics=read_lyrics_file(lyrics_file),
        duration=duration,
        steps=steps,
        seed=seed,
        lora=lora,
        lora_weight=lora_weight,
        out=out,
        device=device,
        dtype=dtype,
        lyric_vocab=lyric_vocab,
        settings=settings,
    )
    if lora is not None:
        import json

        from pipeline.sampling.generation import lora_summary

        click.echo(lora_summary(json.loads(json_path(wav).read_text(encoding="utf-8"))["lora"]))
    click.echo(f"wrote {wav} (parameters: {json_path(wav)})")
