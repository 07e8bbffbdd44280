"""`aceturbo export-lora`: a LoRA as an official-layout folder (optionally with alpha baked in)."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import ConfigError


@click.command("export-lora")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder to write; it receives pytorch_lora_weights.safetensors.")
@click.option("--bake-alpha", is_flag=True, default=False,
              help="Fold the trained scale (alpha/sqrt(r) with rsLoRA, else alpha/r) into the weights, so "
                   "loaders that ignore alpha (ComfyUI, diffusers without metadata) are right at strength 1.0.")
@click.option("--alpha", type=float, default=None,
              help="The trained alpha, for files without metadata (those are otherwise read as alpha = r).")
@click.option("--rslora/--no-rslora", "use_rslora", default=None,
              help="Whether the file was trained with rsLoRA, for files without metadata.")
def cli(src: Path, out: Path, bake_alpha: bool, alpha: float | None, use_rslora: bool | None):
    """Copy the LoRA SRC (a checkpoint folder or its .safetensors file) to OUT in the official layout:
    OUT/pytorch_lora_weights.safetensors with PEFT keys, no prefix, and lora_adapter_metadata."""
    from pipeline.lora import bake_alpha as bake, baked_settings, read_lora_file, write_lora_file

    if (src if src.is_dir() else src.parent).resolve() == out.resolve():
        raise ConfigError(f"--out '{out}' is the source folder itself; choose another folder")
    state_dict, settings = read_lora_file(src, alpha=alpha, use_rslora=use_rslora)
    if bake_alpha:
        path = write_lora_file(bake(state_dict, settings), out, baked_settings(settings), baked_from=settings)
        click.echo(f"{path}: r={settings.r}, scale {settings.scale:g} baked in (use strength 1.0 anywhere)")
    else:
        path = write_lora_file(state_dict, out, settings)
        click.echo(f"{path}: r={settings.r}, alpha={settings.alpha:g}, rsLoRA={settings.use_rslora}, "
                   f"trained scale {settings.scale:g}")
