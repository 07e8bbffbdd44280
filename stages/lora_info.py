"""`aceturbo lora-info PATH`: what a LoRA file holds and the strength that gives its trained change in
each loader (ACE-Step's pipeline, ComfyUI, diffusers, aceturbo)."""
from __future__ import annotations

from pathlib import Path

import click


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def strength_lines(info) -> list[str]:
    """One line per loader: the strength (weight) to use there for the trained change."""
    from pipeline.lora import CLIENTS

    lines = []
    for client, name in CLIENTS.items():
        strength = info.strength(client)
        lines.append(f"  {name}: {strength:g}" if strength is not None
                     else f"  {name}: differs per module; use `aceturbo export-lora` (baked) first")
    return lines


def describe(info) -> list[str]:
    ranks = sorted(set(info.ranks.values()))
    trained = info.trained
    config = info.config
    alphas = sorted(set(info.alphas.values()))
    lines = [
        str(info.file),
        f"  keys: {len(info.stored_keys) + len(info.alphas)} ({len(info.ranks)} modules: lora_A + lora_B"
        + (f", {len(info.alphas)} .alpha)" if info.alphas else ")"),
        f"  targets: {', '.join(sorted(trained.target_modules))}",
        f"  rank: {ranks[0]}" if len(ranks) == 1 else f"  rank: {ranks[0]}..{ranks[-1]} (per module)",
        f"  dtype: {_dtype(info.dtype)}" + (f" (trained in {_dtype(info.trained_dtype)})"
                                            if info.trained_dtype != info.dtype else ""),
        f"  trained: r={trained.r}, alpha={trained.alpha:g}, rsLoRA={trained.use_rslora} -> scale {trained.scale:g}",
        f"  baked: {'yes' if info.baked else 'no'}; scale source: {info.source}",
        "  lora_adapter_metadata: " + (f"r={config.get('r')}, lora_alpha={config.get('lora_alpha')}, "
                                       f"use_rslora={config.get('use_rslora', False)}" if config else "none"),
        "  .alpha tensors: " + (", ".join(f"{a:g}" for a in alphas[:4]) if alphas else "none"),
        "strength that gives the trained change:",
        *strength_lines(info),
    ]
    if info.dtype != info.trained_dtype:
        lines.append(f"note: scale {trained.scale:g} is not a power of two, so the baked file is float32; "
                     "diffusers (and so ACE-Step's pipeline) round it to bf16 on a bf16 model (~3e-3 per layer)")
    return lines


@click.command("lora-info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--alpha", type=float, default=None,
              help="The trained alpha, for files without metadata (those are otherwise read as alpha = r).")
@click.option("--rslora/--no-rslora", "use_rslora", default=None,
              help="Whether the file was trained with rsLoRA, for files without metadata.")
def cli(path: Path, alpha: float | None, use_rslora: bool | None):
    """Show a LoRA's keys, rank, alpha, trained scale, whether it is baked, its dtype, and the strength
    to use in each loader. PATH: a checkpoint folder or a .safetensors file."""
    from pipeline.lora import inspect_lora

    for line in describe(inspect_lora(path, alpha=alpha, use_rslora=use_rslora)):
        click.echo(line)
