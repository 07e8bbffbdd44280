"""The `aceturbo` command line.

Subcommands live in the stage modules (one module per DVC stage or tool) and are imported only
when used, so `aceturbo --help` stays fast and a command never pays for torch it does not need.
A user error (``AceTurboError``) prints one line and exits with status 1, with no traceback.
"""
from __future__ import annotations

import importlib
import sys

import click

from pipeline.errors import AceTurboError

# name -> ("module:click object", one-line help). Keep in the order a user meets them. The help is
# here (not read from the module) so that `aceturbo --help` imports no stage and stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stages.demo:cli", "Run the whole pipeline on demo songs with a tiny random-weight checkpoint."),
    "import-zip": ("stages.ingest:import_zip_cli", "Unpack a ZIP of song triplets into the data folder (safely)."),
    "ingest": ("stages.ingest:cli", "Check the song triplets and write the manifest."),
    "export-hf": ("stages.export_hf:cli", "Export the dataset in the official trainer's Hugging Face format."),
    "decode": ("stages.decode:cli", "Decode new or changed songs to 48 kHz stereo PCM."),
    "encode": ("stages.encode:cli", "Encode one feature stream (latents|mert|mhubert|text) into the cache."),
    "cache": ("stages.cache_info:cli", "Inspect the feature cache (`aceturbo cache info`)."),
    "train": ("stages.train:cli", "Train a LoRA from the cache (or --live); checkpoints, metrics, loss.png."),
    "generate": ("stages.generate:cli", "Generate a song with the base model and an optional LoRA."),
    "compare": ("stages.compare:cli", "Listen to checkpoints side by side: one clip per (checkpoint, weight) + base, one seed."),
    "export-lora": ("stages.export_lora:cli", "Copy a LoRA for other tools: scale baked in (default) or official unbaked."),
    "lora-info": ("stages.lora_info:cli", "Show a LoRA's rank, alpha, trained scale, dtype and the strength per loader."),
    "bench": ("stages.bench:cli", "Measure cached vs live training speed, memory and cache size."),
    "ui": ("stages.ui:cli", "Start the web UI (default http://127.0.0.1:7870)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        return self._load(name)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])

    @staticmethod
    def _load(name):
        entry = COMMANDS.get(name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def group():
    """ACE-Step Turbo Trainer: LoRA fine-tuning of ACE-Step v1 from a precomputed feature cache.

    Typical flow: put triplets (NAME.mp3 + NAME_prompt.txt + NAME_lyrics.txt) in workspace/data/,
    then `dvc repro` (or the commands below one by one).
    """


def main(argv=None):
    try:
        group.main(args=argv, standalone_mode=False)
    except AceTurboError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
