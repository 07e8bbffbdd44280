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

# name -> "module:click object". Keep in the order a user meets them.
COMMANDS: dict[str, str] = {
    "demo": "stages.demo:cli",
    "import-zip": "stages.ingest:import_zip_cli",
    "ingest": "stages.ingest:cli",
    "export-hf": "stages.export_hf:cli",
    "decode": "stages.decode:cli",
    "encode": "stages.encode:cli",
    "cache": "stages.cache_info:cli",
    "train": "stages.train:cli",
    "generate": "stages.generate:cli",
    "export-lora": "stages.export_lora:cli",
    "bench": "stages.bench:cli",
    "ui": "stages.ui:cli",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx, name):
        return self._load(name)

    @staticmethod
    def _load(name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that stage is not written yet
                return None
            raise
        return getattr(module, attr)


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
