"""`aceturbo ui`: the web UI (Gradio) on http://127.0.0.1:7870.

Thin: check the address is free, turn analytics off before gradio is imported, build the app
(pipeline.ui.app) and serve it. Never a share link; other machines reach it only with --host.
"""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import click

from pipeline.errors import AceTurboError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7870


def check_port(host: str, port: int) -> None:
    """AceTurboError naming the port (and how to pick another) when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AceTurboError(f"--host {host!r} is not an address of this machine ({exc.strerror}); "
                            f"use {DEFAULT_HOST} or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # The server sets SO_REUSEADDR too: a port in TIME_WAIT is free for it, so it is free here.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AceTurboError(
                    f"port {port} on {host} is already in use (another `aceturbo ui`?); stop that program "
                    f"or pick another port, e.g. `aceturbo ui --port {port + 1}`") from None
            raise AceTurboError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port "
                                "(ports below 1024 need root)") from None


@click.command("ui")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to listen on. Anything but 127.0.0.1 lets other machines in (no login!).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--params", "params_path", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Project settings (paths, models, train).")
def cli(host: str, port: int, params_path: str):
    """Web UI: edit the dataset, convert it, train with live loss graph, try and download checkpoints.

    Run it in the project folder (where params.yaml is). Training and conversion run as separate
    processes, so closing the UI does not stop them; reopening it finds them again.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio at import: set it first
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if host != DEFAULT_HOST:
        click.echo(f"Warning: listening on {host}: anyone who can reach this machine on port {port} can use "
                   "the UI (it has no login) and start processes; use the default 127.0.0.1 unless you "
                   "trust that network.", err=True)
    check_port(host, port)

    from pipeline.config import load_params
    from pipeline.ui.actions import clean_stale_uploads, max_upload_bytes, ui_dir, workspace_dir

    project = load_params(params_path)  # a broken params.yaml is reported before the server starts
    # Uploads land beside the data folder, not in /tmp (often small, or memory); gradio reads this at
    # import. Uploads are deleted once added to the dataset, unused ones after a few hours.
    uploads = str((ui_dir(project) / "uploads").resolve())
    if os.environ.setdefault("GRADIO_TEMP_DIR", uploads) == uploads:  # a folder of its own: ours to clean
        clean_stale_uploads(uploads)

    from pipeline.ui.app import build_app, launch

    allowed = [str(Path(p).resolve()) for p in (project.paths.data, project.paths.exps, workspace_dir(project))]
    click.echo(f"ACE-Step Turbo Trainer UI on http://{host}:{port} (Ctrl-C to quit; uploads up to "
               f"{project.ui.max_upload_mb:g} MB, params.yaml → ui → max_upload_mb)")
    launch(build_app(params_path), host, port, allowed=allowed, max_file_size=max_upload_bytes(project))
