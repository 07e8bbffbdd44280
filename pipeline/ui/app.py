"""The Gradio layout of `aceturbo ui`: three tabs wired to pipeline.ui.actions.

Only layout and wiring live here; every action is a plain function in ``actions`` (tested without
a browser). GRADIO_ANALYTICS_ENABLED must be "False" before this module is imported (stages/ui.py
sets it): gradio reads it at import time.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from pipeline.dataset import RULES  # noqa: E402
from pipeline.errors import AceTurboError  # noqa: E402
from pipeline.ui import actions as A  # noqa: E402

PRESETS = ("conservative", "balanced", "aggressive")
SONG_HEADERS = ["song", "seconds", "status", "files", "problems / warnings"]
CKPT_HEADERS = ["checkpoint", "step", "epoch", "loss at step", "val loss", "best"]
# Field groups of the training form, by the first field of each group (TrainConfig's order).
GROUPS = (("Run", "experiment"), ("LoRA", "rank"), ("Optimiser and schedule", "learning_rate"),
          ("Objective", "shift"), ("Data", "batch_size"), ("Outputs", "save_every"),
          ("Validation and early stop", "val_every"))
# Fixed series colours: the plot must know every series before the first metrics arrive.
LOSS_COLORS = {"loss": "#aec7e8", A.SMOOTHED_LOSS: "#1f77b4", "denoise_loss": "#ff7f0e", "mert_loss": "#2ca02c",
               "mhubert_loss": "#d62728", "val_loss": "#000000"}
# The per-step quality signals (docs/training.md "Quality signals"): each in its own small plot.
SIGNAL_PLOTS = (("lora_norm", "LoRA weight norm", "#9467bd"), ("update_ratio", "update / weight ratio", "#7f7f7f"))
CSS = """
.aceturbo-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
.aceturbo-progress progress { width: 100%; height: 18px; }
"""


def _ok(text: str) -> str:
    return f"**Done:** {text}"


def _err(exc: Exception) -> str:
    return "**Error:** " + str(exc).replace("\n", "  \n")


def _progress_html(fraction: float, label: str) -> str:
    return (f"<div class='aceturbo-progress'><progress value='{fraction:.3f}' max='1'></progress>"
            f"<div>{html.escape(label)}</div></div>")


def _to_form(kind: str, value: Any) -> Any:
    if kind == "list":
        return ", ".join(value)
    if kind == "pair":
        return f"{value[0]:g}, {value[1]:g}"
    return value


def build_app(params: str = A.PARAMS, poll_seconds: float = 1.0) -> gr.Blocks:
    """The whole app (not launched)."""
    proj = lambda: A.project(params)  # noqa: E731  (re-read each time: params.yaml may change)
    fields = A.train_fields()
    limit = f"up to {proj().ui.max_upload_mb:g} MB each"  # params.yaml → ui → max_upload_mb

    # delete_cache: uploads never added to the dataset (and other temp files) go after UPLOAD_MAX_AGE_S
    with gr.Blocks(title="ACE-Step Turbo Trainer", analytics_enabled=False,
                   delete_cache=(3600, A.UPLOAD_MAX_AGE_S)) as app:
        gr.Markdown("# ACE-Step Turbo Trainer\nLoRA fine-tuning of ACE-Step v1. Every button runs the "
                    "same `aceturbo` / `dvc` command you could type; the command is shown with its output.")
        with gr.Tabs():
            # ======================================================== dataset
            with gr.Tab("Dataset", id="dataset"):
                with gr.Accordion("Dataset rules", open=False):
                    gr.Markdown(f"```\n{RULES}\n```")
                with gr.Row():
                    with gr.Column(scale=1):
                        with gr.Tab("Add a song"):
                            new_audio = gr.File(label=f"Audio (.mp3, .wav, .flac, .ogg; {limit})", file_count="single",
                                                file_types=[".mp3", ".wav", ".flac", ".ogg"], elem_id="new-audio")
                            new_name = gr.Textbox(label="Name (empty: the audio file's name)", elem_id="new-name")
                            new_prompt = gr.Textbox(label="Prompt (comma-separated tags)", elem_id="new-prompt",
                                                    placeholder="synthwave, female vocals, 120 bpm")
                            new_lyrics = gr.Textbox(label="Lyrics (empty: instrumental)", lines=4, elem_id="new-lyrics")
                            add_song_btn = gr.Button("Add song", elem_id="add-song")
                        with gr.Tab("Triplet files"):
                            trip_files = gr.File(label=f"NAME.mp3 + NAME_prompt.txt + NAME_lyrics.txt (several songs at once; {limit})",
                                                 file_count="multiple", elem_id="triplet-files")
                            add_files_btn = gr.Button("Add files", elem_id="add-files")
                        with gr.Tab("ZIP"):
                            zip_file = gr.File(label=f"ZIP of triplets ({limit})", file_types=[".zip"], elem_id="zip-file")
                            add_zip_btn = gr.Button("Import ZIP", elem_id="import-zip")
                        overwrite = gr.Checkbox(label="Overwrite files that already exist", value=False)
                        upload_msg = gr.Markdown(elem_id="upload-msg")
                    with gr.Column(scale=2):
                        songs_table = gr.Dataframe(headers=SONG_HEADERS, datatype=["str", "number", "str", "str", "str"],
                                                   interactive=False, wrap=True, label="Songs in the data folder",
                                                   elem_id="songs-table", max_height=360,
                                                   column_widths=["24%", "9%", "13%", "27%", "27%"])
                        general_msg = gr.Markdown(elem_id="dataset-general")
                        refresh_songs = gr.Button("Refresh list", size="sm")
                with gr.Row():
                    with gr.Column(scale=1):
                        song_pick = gr.Dropdown(label="Song", choices=[], elem_id="song-pick")
                        song_audio = gr.Audio(label="Listen", type="filepath", interactive=False)
                        song_msgs = gr.Markdown()
                        with gr.Row():
                            delete_ok = gr.Checkbox(label="Yes, delete this song's files", value=False)
                            delete_btn = gr.Button("Delete song", variant="stop", size="sm")
                    with gr.Column(scale=2):
                        edit_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="edit-prompt")
                        edit_lyrics = gr.Textbox(label="Lyrics", lines=8, elem_id="edit-lyrics")
                        save_btn = gr.Button("Save prompt and lyrics", variant="primary")
                        edit_msg = gr.Markdown()
                gr.Markdown("### Convert\nChecks the dataset (`aceturbo ingest`), then `dvc repro` of the encode "
                            "stages: decodes the audio and caches latents, MERT, mHuBERT and text features. "
                            "Only what changed is recomputed.")
                with gr.Row():
                    convert_btn = gr.Button("Convert", variant="primary", elem_id="convert")
                    convert_stop = gr.Button("Stop convert", variant="stop")
                    export_btn = gr.Button("Export to HF dataset", elem_id="export-hf")
                convert_status = gr.Markdown(elem_id="convert-status")
                convert_bar = gr.HTML(_progress_html(0, ""), elem_id="convert-progress")
                convert_log = gr.Textbox(label="Convert log", lines=10, max_lines=10, autoscroll=True,
                                         elem_classes=["aceturbo-log"], elem_id="convert-log")
                export_out = gr.Textbox(label="Export log", lines=3, elem_classes=["aceturbo-log"], visible=True)

            # ======================================================== train
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    preset = gr.Radio(list(PRESETS), value=PRESETS[1], label="Preset (fills every field below)",
                                      elem_id="preset")
                    preset_info = gr.Markdown()
                with gr.Row():
                    start_btn = gr.Button("Start training", variant="primary", elem_id="train-start")
                    resume_btn = gr.Button("Resume (latest checkpoint)", elem_id="train-resume")
                    stop_btn = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="train-stop")
                train_msg = gr.Markdown(elem_id="train-msg")
                train_status = gr.Markdown(elem_id="train-status")
                with gr.Row():
                    with gr.Column(scale=3):
                        loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Training loss (raw, smoothed) and validation loss", color_map=LOSS_COLORS,
                                                x_title="step", y_title="loss", height=300, elem_id="loss-plot")
                        speed_md = gr.Markdown(elem_id="train-speed")
                        with gr.Row():
                            signal_plots = [gr.LinePlot(x="step", y="value", color="series", title=title,
                                                        color_map={name: color}, x_title="step", y_title=name,
                                                        height=200, elem_id=f"plot-{name}")
                                            for name, title, color in SIGNAL_PLOTS]
                    with gr.Column(scale=2):
                        train_log = gr.Textbox(label="Training log (workspace/ui/logs/<experiment>.log)", lines=14,
                                               max_lines=14, autoscroll=True, elem_classes=["aceturbo-log"],
                                               elem_id="train-log")
                field_inputs: list[gr.components.Component] = []
                starts = {first: title for title, first in GROUPS}
                group_rows: list[tuple[str, list[dict]]] = []
                for row in fields:
                    if row["name"] in starts or not group_rows:
                        group_rows.append((starts.get(row["name"], "Settings"), []))
                    group_rows[-1][1].append(row)
                for title, rows in group_rows:
                    with gr.Accordion(f"Settings: {title}", open=title in ("Run", "LoRA")):
                        with gr.Row():
                            for row in rows:
                                field_inputs.append(_field_widget(row))

            # ======================================================== checkpoints
            with gr.Tab("Checkpoints", id="checkpoints"):
                with gr.Row():
                    run_pick = gr.Dropdown(label="Run", choices=[], elem_id="run-pick")
                    refresh_runs = gr.Button("Refresh", size="sm", elem_id="refresh-runs")
                ckpt_table = gr.Dataframe(headers=CKPT_HEADERS, datatype=["str", "number", "number", "number", "number", "str"],
                                          interactive=False, label="Checkpoints", elem_id="ckpt-table")
                gr.Markdown("★ best: the lowest validation loss (named in the run's best.json); it is kept whatever "
                            "keep_last says.")
                with gr.Row():
                    with gr.Column():
                        ckpt_pick = gr.Dropdown(label="Checkpoint", choices=[], elem_id="ckpt-pick")
                        preview_pick = gr.Dropdown(label="Training previews (eval_results)", choices=[])
                        preview_audio = gr.Audio(label="Preview", type="filepath", interactive=False)
                        dl_kind = gr.Radio(list(A.DOWNLOAD_KINDS), value=A.DOWNLOAD_KINDS[0], label="Download LoRA as", elem_id="dl-kind")
                        dl_btn = gr.Button("Prepare download", elem_id="prepare-download")
                        dl_file = gr.File(label="LoRA", interactive=False, elem_id="dl-file")
                        dl_msg = gr.Markdown(elem_id="dl-msg")
                    with gr.Column():
                        gen_prompt = gr.Textbox(label="Prompt", value="synthwave, female vocals, 120 bpm")
                        gen_lyrics = gr.Textbox(label="Lyrics", lines=4, value="[verse]\nhello from the ui")
                        with gr.Row():
                            gen_duration = gr.Number(label="Seconds", value=10.0, minimum=1, elem_id="gen-seconds")
                            gen_steps = gr.Number(label="Steps", value=27, precision=0, minimum=1, elem_id="gen-steps")
                            gen_seed = gr.Number(label="Seed", value=0, precision=0)
                        gen_btn = gr.Button("Generate a sample with this checkpoint", variant="primary", elem_id="generate")
                        gen_audio = gr.Audio(label="Sample", type="filepath", interactive=False, elem_id="gen-audio")
                        gen_log = gr.Textbox(label="generate output", lines=4, elem_classes=["aceturbo-log"], elem_id="gen-log")
                with gr.Accordion("Compare checkpoints by ear (`aceturbo compare`)", open=True):
                    gr.Markdown("One clip per checkpoint and LoRA weight, plus the base model without LoRA, all "
                                "with the prompt, lyrics, seconds, steps and seed above (same seed, same noise).")
                    with gr.Row():
                        cmp_pick = gr.Dropdown(label="Checkpoints", choices=[], multiselect=True, elem_id="cmp-pick")
                        cmp_weights = gr.Textbox(label="LoRA weights", value="0.5, 1.0", elem_id="cmp-weights")
                        cmp_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                    cmp_log = gr.Textbox(label="compare output", lines=3, elem_classes=["aceturbo-log"], elem_id="cmp-log")
                    cmp_grid = gr.State(None)  # (folder, index) of the last comparison

                    @gr.render(inputs=cmp_grid)
                    def show_grid(shown):
                        if not shown:
                            return
                        folder, index = shown
                        labels, rows = A.compare_cells(index, folder)
                        for weight, files in rows:
                            with gr.Row():
                                with gr.Column(scale=0, min_width=110):
                                    gr.Markdown(f"**weight {weight:g}**")
                                for label, path in zip(labels, files):
                                    if path:
                                        gr.Audio(value=path, label=label, type="filepath", interactive=False)
                                    else:
                                        gr.Markdown("")

        timer = gr.Timer(poll_seconds)
        seen = gr.State({})

        # ------------------------------------------------------------ dataset wiring
        def refresh(selected=None):
            view = A.scan_songs(proj())
            ids = [s.id for s in view.songs]
            pick = selected if selected in ids else (ids[0] if ids else None)
            general = "\n".join(f"- {A._short(m, view.data_dir)}" for m in view.general)
            return (A.song_rows(view), general, gr.update(choices=ids, value=pick))

        refresh_outputs = [songs_table, general_msg, song_pick]

        def show_song(song_id):
            if not song_id:
                return None, "", "", ""
            try:
                p = proj()
                view = A.scan_songs(p)
                song = view.get(song_id)
                prompt, lyrics = A.read_song_text(p, song_id)
            except AceTurboError as exc:
                return None, "", "", _err(exc)
            audio = str((view.data_dir / song.audio).resolve()) if song.audio else None
            msgs = [f"- **problem:** {A._short(m, view.data_dir)}" for m in song.problems]
            msgs += [f"- **warning:** {A._short(m, view.data_dir)}" for m in song.warnings]
            msgs += [f"- note: {A._short(m, view.data_dir)}" for m in song.notes]
            dur = f"{song.duration:.1f} s" if song.duration is not None else "unknown length"
            return audio, prompt, lyrics, f"**{song.id}** — {dur}, {song.status}\n" + "\n".join(msgs)

        def pick_row(evt: gr.SelectData):
            row = getattr(evt, "row_value", None)
            return gr.update(value=row[0]) if row else gr.skip()

        def do_add_song(audio, name, prompt, lyrics, over):
            try:
                if not audio:
                    raise A.UIError("choose an audio file first")
                sid = A.add_song(proj(), audio, prompt or "", lyrics or "", name or "", overwrite=over)
                return (_ok(f"added {sid}"), None, *refresh(sid))  # its upload is deleted: clear the box
            except AceTurboError as exc:
                return (_err(exc), gr.skip(), *refresh())

        def do_add_files(files, over):
            try:
                written = A.add_files(proj(), files or [], overwrite=over)
                return (_ok(f"added {len(written)} file(s): {', '.join(p.name for p in written)}"), None, *refresh())
            except AceTurboError as exc:
                return (_err(exc), gr.skip(), *refresh())

        def do_zip(path, over):
            try:
                if not path:
                    raise A.UIError("choose a .zip file first")
                result = A.import_zip_file(proj(), path, overwrite=over)
                skipped = f", skipped {len(result.skipped)} (__MACOSX/dotfiles)" if result.skipped else ""
                return (_ok(f"imported {len(result.files)} file(s){skipped}"), None, *refresh())
            except AceTurboError as exc:
                return (_err(exc), gr.skip(), *refresh())

        def do_save(song_id, prompt, lyrics):
            try:
                if not song_id:
                    raise A.UIError("pick a song first")
                written = A.save_song_text(proj(), song_id, prompt or "", lyrics or "")
                return (_ok(f"saved {', '.join(p.name for p in written)} — press Convert to update the cache"),
                        *refresh(song_id))
            except AceTurboError as exc:
                return (_err(exc), *refresh(song_id))

        def do_delete(song_id, confirmed):
            try:
                if not song_id:
                    raise A.UIError("pick a song first")
                if not confirmed:
                    raise A.UIError("tick 'Yes, delete this song's files' first")
                removed = A.delete_song(proj(), song_id)
                return (_ok(f"deleted {', '.join(p.name for p in removed)}"), gr.update(value=False), *refresh())
            except AceTurboError as exc:
                return (_err(exc), gr.update(), *refresh(song_id))

        def do_convert():
            try:
                job = A.start_convert(proj())
                return _ok(f"started: `{A.shown_command(job.argv)}`")
            except AceTurboError as exc:
                return _err(exc)

        def do_convert_stop():
            return A.stop_job(proj(), "convert", whole_group=True)

        def do_export():
            code, text = A.export_hf(proj())
            return text + ("" if code == 0 else f"\n(failed, exit {code})")

        app.load(refresh, outputs=refresh_outputs)
        refresh_songs.click(refresh, inputs=song_pick, outputs=refresh_outputs)
        song_pick.change(show_song, inputs=song_pick, outputs=[song_audio, edit_prompt, edit_lyrics, song_msgs])
        songs_table.select(pick_row, outputs=song_pick)
        add_song_btn.click(do_add_song, [new_audio, new_name, new_prompt, new_lyrics, overwrite],
                           [upload_msg, new_audio, *refresh_outputs])
        add_files_btn.click(do_add_files, [trip_files, overwrite], [upload_msg, trip_files, *refresh_outputs])
        add_zip_btn.click(do_zip, [zip_file, overwrite], [upload_msg, zip_file, *refresh_outputs])
        save_btn.click(do_save, [song_pick, edit_prompt, edit_lyrics], [edit_msg, *refresh_outputs])
        delete_btn.click(do_delete, [song_pick, delete_ok], [edit_msg, delete_ok, *refresh_outputs])
        convert_btn.click(do_convert, outputs=convert_status)
        convert_stop.click(do_convert_stop, outputs=convert_status)
        export_btn.click(do_export, outputs=export_out)

        # ------------------------------------------------------------ train wiring
        def fill_preset(name):
            try:
                values = A.preset_values(proj(), name)
            except AceTurboError as exc:
                return [_err(exc)] + [gr.skip()] * len(fields)
            from pipeline.train_config import preset_description

            return [preset_description(name)] + [_to_form(r["type"], values[r["name"]]) for r in fields]

        def form_values(values) -> dict[str, Any]:
            return {row["name"]: v for row, v in zip(fields, values)}

        def do_start(name, *values, resume=False):
            try:
                job = A.start_training(proj(), name, form_values(values), resume=resume)
                note = f"  \nNote: {job.info['note']}" if job.info.get("note") else ""
                return _ok(f"started `{job.info['command']}` → {job.info['run_dir']}") + note
            except AceTurboError as exc:
                return _err(exc)

        def do_resume(name, *values):
            return do_start(name, *values, resume=True)

        def do_stop():
            return A.stop_training(proj())

        app.load(fill_preset, inputs=preset, outputs=[preset_info, *field_inputs])
        preset.change(fill_preset, inputs=preset, outputs=[preset_info, *field_inputs])
        start_btn.click(do_start, [preset, *field_inputs], train_msg)
        resume_btn.click(do_resume, [preset, *field_inputs], train_msg)
        stop_btn.click(do_stop, outputs=train_msg)

        # ------------------------------------------------------------ checkpoints wiring
        def runs_update(selected=None):
            runs = A.list_runs(proj())
            pick = selected if selected in runs else (runs[0] if runs else None)
            return gr.update(choices=runs, value=pick)

        def show_run(run):
            empty = gr.update(choices=[], value=None)
            if not run:
                return [], empty, empty, empty
            try:
                folder = A.run_dir(proj(), run)
            except AceTurboError:
                return [], empty, empty, empty
            rows = A.checkpoint_rows(folder)
            names = [r[0] for r in rows]
            previews = A.preview_files(folder)
            choices = A.compare_choices(folder)
            return (rows, gr.update(choices=names, value=names[-1] if names else None),
                    gr.update(choices=previews, value=previews[-1][1] if previews else None),
                    gr.update(choices=choices, value=[c for c in choices if c == A.BEST] or names[-1:]))

        def do_compare(run, picks, weights, prompt, lyrics, duration, steps, seed):
            try:
                if not run:
                    raise A.UIError("pick a run first")
                index, folder, log = A.compare_checkpoints(proj(), run, picks or [], weights, prompt, lyrics,
                                                           duration or 10, steps or 27, seed or 0)
                return (str(folder), index), log
            except AceTurboError as exc:
                return None, _err(exc)

        def do_generate(run, ckpt, prompt, lyrics, duration, steps, seed):
            try:
                if not (run and ckpt):
                    raise A.UIError("pick a run and a checkpoint first")
                wav, log = A.generate_sample(proj(), run, ckpt, prompt, lyrics, duration or 10, steps or 27, seed or 0)
                return str(wav.resolve()), log
            except AceTurboError as exc:
                return None, _err(exc)

        def do_download(run, ckpt, kind):
            try:
                if not (run and ckpt):
                    raise A.UIError("pick a run and a checkpoint first")
                path = A.lora_download(proj(), run, ckpt, kind)
                return str(path.resolve()), _ok(f"ready: {path.name}")
            except AceTurboError as exc:
                return None, _err(exc)

        app.load(runs_update, outputs=run_pick)
        refresh_runs.click(runs_update, inputs=run_pick, outputs=run_pick).then(
            show_run, inputs=run_pick, outputs=[ckpt_table, ckpt_pick, preview_pick, cmp_pick])
        run_pick.change(show_run, inputs=run_pick, outputs=[ckpt_table, ckpt_pick, preview_pick, cmp_pick])
        cmp_btn.click(do_compare, [run_pick, cmp_pick, cmp_weights, gen_prompt, gen_lyrics, gen_duration, gen_steps,
                                   gen_seed], [cmp_grid, cmp_log])
        preview_pick.change(lambda p: p or None, inputs=preview_pick, outputs=preview_audio)
        gen_btn.click(do_generate, [run_pick, ckpt_pick, gen_prompt, gen_lyrics, gen_duration, gen_steps, gen_seed],
                      [gen_audio, gen_log])
        dl_btn.click(do_download, [run_pick, ckpt_pick, dl_kind], [dl_file, dl_msg])

        # ------------------------------------------------------------ live updates
        experiment_box = field_inputs[[r["name"] for r in fields].index("experiment")]

        def poll(state, preset_name, experiment):
            p = proj()
            state = dict(state or {})
            out: list[Any] = []
            # convert
            cjob = A.read_job(p, "convert")
            ctext = A.tail(cjob.log, 200) if cjob else ""
            frac, current = A.convert_progress(ctext)
            if cjob and not cjob.running and cjob.returncode == 0:
                frac, current = 1.0, "done"
            cstatus = A.job_status(cjob, "convert")
            key = ("convert", cstatus, len(ctext), ctext[-200:])
            if state.get("convert") != key:
                state["convert"] = key
                out += [cstatus, _progress_html(frac, f"{frac:.0%} — {current}" if cjob else ""), "\n".join(ctext.split("\n")[-40:])]
            else:
                out += [gr.skip()] * 3
            # training
            tjob = A.read_job(p, "train")
            outside = A.outside_trainings(p)  # a terminal's or `dvc repro`'s training: watch it too
            if outside and not (tjob and tjob.running):
                name, owner = next(iter(outside.items()))
                folder = Path(p.paths.exps) / name
                max_steps = A.run_max_steps(folder)
                status = f"Training running outside this UI — run **{name}**, {owner.describe()}"
            elif tjob is not None:
                folder = Path(tjob.info.get("run_dir", ""))
                max_steps = tjob.info.get("max_steps")
                status = A.job_status(tjob, "training") + f" — run **{tjob.info.get('experiment')}**"
            else:
                name = experiment or preset_name
                folder = Path(p.paths.exps) / name if name else Path(p.paths.exps)
                max_steps = A.run_max_steps(folder)
                status = A.job_status(tjob, "training")
            mfile = folder / "metrics.jsonl"
            mkey = (str(folder), mfile.stat().st_mtime_ns if mfile.is_file() else 0,
                    mfile.stat().st_size if mfile.is_file() else 0)
            if state.get("metrics") != mkey:
                state["metrics"] = mkey
                records = A.run_metrics(folder)
                # No empty frame: the plot's first data fixes its series (an empty one draws no lines).
                out += [A.loss_table(records) if records else gr.skip(), A.format_speed(A.speed(records, max_steps))]
                out += [A.series_table(records, (name,)) if records else gr.skip() for name, _, _ in SIGNAL_PLOTS]
            else:
                out += [gr.skip()] * (2 + len(SIGNAL_PLOTS))
            log_path = Path(tjob.log) if tjob else A.train_log_path(p, folder.name)
            ltext = A.tail(log_path, 80)
            lkey = (str(log_path), len(ltext), ltext[-200:])
            if state.get("log") != lkey:
                state["log"] = lkey
                out.append(ltext)
            else:
                out.append(gr.skip())
            if state.get("status") != status:
                state["status"] = status
                out.append(status)
            else:
                out.append(gr.skip())
            return [state, *out]

        timer.tick(poll, inputs=[seen, preset, experiment_box],
                   outputs=[seen, convert_status, convert_bar, convert_log, loss_plot, speed_md, *signal_plots,
                            train_log, train_status])
    return app


def _field_widget(row: dict) -> gr.components.Component:
    name, kind, help_text = row["name"], row["type"], row["help"]
    common = dict(label=name, info=help_text, elem_id=f"field-{name}", min_width=220)
    if kind == "bool":
        return gr.Checkbox(**common)
    if kind == "int":
        return gr.Number(precision=0, **common)
    if kind == "float":
        return gr.Number(**common)
    if name == "precision":
        from pipeline.train_config import PRECISIONS

        return gr.Dropdown(list(PRECISIONS), **common)
    return gr.Textbox(**common)


def theme():
    """System fonts only: the default theme would fetch Google Fonts, and the app must work offline."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(app: gr.Blocks, host: str, port: int, allowed: list[str] | None = None, block: bool = True,
           max_file_size: int | None = None):
    """Serve the app (never a share link); uploads over ``max_file_size`` bytes are refused."""
    return app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
        max_file_size=max_file_size,
        prevent_thread_lock=not block, allowed_paths=allowed or [], theme=theme(), css=CSS,
        footer_links=[], quiet=False, ssr_mode=False)
