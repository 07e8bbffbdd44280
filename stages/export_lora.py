"""`aceturbo export-lora`: a LoRA as an official-layout folder for other tools, scale baked in or not."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import ConfigError
from stages.lora_info import strength_lines

FORMATS = {
    "baked": "the trained scale in lora_B, metadata and .alpha tensors saying scale 1: strength 1.0 in every "
             "loader (the checkpoints' own form)",
    "official": "the trained A and B with alpha/rsLoRA in lora_adapter_metadata, as the official trainer writes "
                "them: right at 1.0 only where the metadata is read (aceturbo, diffusers folder + weight_name)",
}


@click.command("export-lora")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write; it receives pytorch_lora_weights.safetensors.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="baked", show_default=True,
              help="; ".join(f"{name}: {text}" for name, text in FORMATS.items()) + ".")
@click.option("--bake-alpha", is_flag=True, default=False, hidden=True, help="Same as --format baked.")
@click.option("--alpha", type=float, default=None,
              help="The trained alpha, for files without metadata (those are otherwise read as alpha = r).")
@click.option("--rslora/--no-rslora", "use_rslora", default=None,
              help="Whether the file was trained with rsLoRA, for files without metadata.")
def cli(src: Path, out: Path, fmt: str, bake_alpha: bool, alpha: float | None, use_rslora: bool | None):
    """Copy the LoRA SRC (a checkpoint folder, or any LoRA .safetensors: ours, official, kohya/ComfyUI
    .alpha style) to OUT/pytorch_lora_weights.safetensors with official keys (no prefix)."""
    from pipeline.lora import convert_weights, inspect_lora, read_lora_file, write_lora_file
    from pipeline.train_state import LORA_FILE, STATE_FILE, checkpoint_lora_weights

    if (src if src.is_dir() else src.parent).resolve() == out.resolve():
        raise ConfigError(f"--out '{out}' is the source folder itself; choose another folder")
    fmt = "baked" if bake_alpha else fmt
    weights, info = read_lora_file(src, alpha=alpha, use_rslora=use_rslora)
    baked = fmt == "baked"
    checkpoint = info.file.parent  # SRC the checkpoint folder or its LoRA file: training_state.pt is beside it
    if not baked and info.file.name == LORA_FILE and (checkpoint / STATE_FILE).is_file():
        weights = checkpoint_lora_weights(checkpoint)  # a checkpoint keeps the trained weights: exact, no unbaking
    else:
        weights = convert_weights(weights, info, baked=baked)
    path = write_lora_file(weights, out, info.trained, baked=baked, trained_dtype=info.trained_dtype)
    trained = info.trained
    written = inspect_lora(path)
    click.echo(f"wrote {path} ({fmt}, {str(written.dtype).removeprefix('torch.')}): r={trained.r}, "
               f"alpha={trained.alpha:g}, rsLoRA={trained.use_rslora}, trained scale {trained.scale:g}")
    click.echo("strength that gives the trained change:")
    for line in strength_lines(written):
        click.echo(line)

