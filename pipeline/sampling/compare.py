"""Compare checkpoints by ear: one clip per (LoRA checkpoint, LoRA weight) plus the base model, all from
the same prompt, seed and noise, into one folder with an HTML page of players and a JSON index.

The transformer, the text encoding and the decoders are loaded once; only the LoRA is swapped
(pipeline.lora.load_lora replaces the adapter; remove_lora before the base clip), so a grid of N
clips costs N samplings, not N model loads.

    <out>/base.wav, step500_w0.5.wav, step500_w1.wav, …, index.json, index.html
"""
from __future__ import annotations

import dataclasses
import html
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.fileio import write_json_atomic, write_text_atomic
from pipeline.lora import remove_lora
from pipeline.sampling.generation import (
    apply_lora,
    check_request,
    decode_latents,
    encode_prompt,
    find_lyric_vocab,
    load_transformer,
    release,
    require_checkpoint_root,
    require_lora_path,
    resolve_device,
    resolve_dtype,
    versions,
)
from pipeline.sampling.sampler import SamplerSettings, sample

INDEX_JSON = "index.json"
INDEX_HTML = "index.html"
BASE = "base"


@dataclass
class Column:
    """One column of the grid: a LoRA checkpoint (``lora``) or the base model (``lora`` None)."""

    label: str  # "step 500", "step 1000 (best)", "base model"
    lora: Path | None = None
    step: int | None = None


def clip_name(column: Column, weight: float | None) -> str:
    if column.lora is None:
        return f"{BASE}.wav"
    slug = re.sub(r"[^\w.-]+", "", column.label.split(" (")[0].replace(" ", "")) or "lora"
    return f"{slug}_w{weight:g}.wav"


def default_out_dir(exps: str | Path, run_name: str, seed: int) -> Path:
    """Where a comparison goes without --out: ``<paths.exps parent>/compare/<run>/<date-time>_seed<N>/``
    (workspace/exps/compare/, beside generate's samples/). Never inside the run folder: DVC caches
    that as the train stage's output, so a file added there would make `dvc repro` train again, and
    the next training start would delete a running comparison's temp files as leftovers."""
    return Path(exps).parent / "compare" / run_name / f"{time.strftime('%Y%m%d-%H%M%S')}_seed{seed}"


def compare(
    checkpoint_root: str | Path,
    columns: list[Column],
    weights: list[float],
    prompt: str,
    lyrics: str,
    duration: float,
    out_dir: str | Path,
    seed: int = 0,
    settings: SamplerSettings | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    lyric_vocab: str | Path | None = None,
    extra: dict | None = None,
    progress: bool = True,
) -> Path:
    """Generate the grid into ``out_dir`` and return its index.json. ``columns`` with ``lora`` None is
    the base model (one clip); every other column gets one clip per weight. ``extra`` is copied into
    the index (e.g. the run's name)."""
    t_start = time.perf_counter()
    if not columns:
        raise ConfigError("nothing to compare: name at least one checkpoint (e.g. --steps 500,best)")
    if not weights or any(not w > 0 for w in weights):
        raise ConfigError(f"LoRA weights must be > 0 (got {weights}); pass e.g. --weights 0.5,1.0")
    weights = list(dict.fromkeys(weights))  # a weight given twice would sample one clip twice into one file
    settings, n_frames = check_request(duration, settings, None)
    root = require_checkpoint_root(checkpoint_root)
    for column in columns:
        if column.lora is not None:
            require_lora_path(column.lora)  # fail before minutes of model loading
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    vocab = find_lyric_vocab(root, lyric_vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    transformer = load_transformer(root, dev, dt)
    cond, n_lyric_tokens = encode_prompt(root, vocab, transformer, prompt, lyrics, settings, dev, dt)
    timings = {"load_and_encode_s": time.perf_counter() - t0}

    t0 = time.perf_counter()
    clips, latents = [], []
    for column in columns:
        for weight in ([None] if column.lora is None else weights):
            info = None
            if column.lora is None:
                remove_lora(transformer)  # the adapter apply_lora loads (one at a time, replaced each time)
            else:
                info = apply_lora(transformer, column.lora, weight)
            # same seed → same initial noise for every clip (sampler.make_noise)
            latents.append(sample(transformer, cond.as_dict(), settings, seeds=[seed], n_frames=n_frames,
                                  progress=progress).cpu())
            clips.append({"file": clip_name(column, weight), "column": column.label, "step": column.step,
                          "weight": weight, "lora": info})
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    timings["sampling_s"] = time.perf_counter() - t0
    del transformer
    release()

    t0 = time.perf_counter()
    sr, wavs = decode_latents(root, dev, latents)
    from pipeline.audio import save_wav

    for clip, wav in zip(clips, wavs):
        save_wav(out_dir / clip["file"], wav, sr)
    timings["decode_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    index = {
        **(extra or {}),
        "checkpoint": str(root.resolve()),
        "prompt": prompt,
        "lyrics": lyrics,
        "lyric_tokens": n_lyric_tokens,
        "seed": int(seed),
        "duration_s": float(duration),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "sampler": dataclasses.asdict(settings),
        "weights": [float(w) for w in weights],
        "columns": [{"label": c.label, "step": c.step, "lora": None if c.lora is None else str(Path(c.lora).resolve())}
                    for c in columns],
        "clips": clips,
        "sample_rate": sr,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(out_dir / INDEX_HTML, index_html(index))
    return write_json_atomic(out_dir / INDEX_JSON, index)


def grid(index: dict) -> tuple[list[str], list[tuple[float | None, list[str | None]]]]:
    """(column labels, rows): one row per weight with the clip file of each column (the base
    model's clip only in the first row, None in the others). The HTML page and the UI both draw this."""
    labels = [c["label"] for c in index["columns"]]
    files = {(c["column"], c["weight"]): c["file"] for c in index["clips"]}
    base = {c["column"]: c["file"] for c in index["clips"] if c["weight"] is None}
    rows = []
    for i, weight in enumerate(index["weights"]):
        rows.append((weight, [base[label] if label in base and i == 0 else files.get((label, weight))
                              for label in labels]))
    return labels, rows


def index_html(index: dict) -> str:
    """A self-contained page: the grid of <audio> players (relative links) and the settings used."""
    e = html.escape
    labels, rows = grid(index)
    head = "".join(f"<th>{e(label)}</th>" for label in labels)
    body = []
    for weight, files in rows:
        cells = "".join(f"<td><audio controls preload='none' src='{e(f)}'></audio><br><small>{e(f)}</small></td>"
                        if f else "<td></td>" for f in files)
        body.append(f"<tr><th>weight {weight:g}</th>{cells}</tr>")
    lyrics = e(index["lyrics"]) or "(instrumental)"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Checkpoint comparison</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.5em;text-align:center;vertical-align:top}} pre{{background:#f6f6f6;padding:.5em}}</style>
</head><body>
<h1>Checkpoint comparison{(' — ' + e(str(index['run']))) if index.get('run') else ''}</h1>
<p>Same prompt, seed {index['seed']} and initial noise for every clip; {index['duration_s']:g} s,
{index['steps']} sampling steps, guidance {index['guidance_scale']:g}. Rows: LoRA weight (× the trained scale);
the base model has no LoRA.</p>
<table><tr><th></th>{head}</tr>
{chr(10).join(body)}
</table>
<h2>Prompt</h2><pre>{e(index['prompt'])}</pre>
<h2>Lyrics</h2><pre>{lyrics}</pre>
<p><small>{e(index['created'])} · {e(index['device'])} {e(index['dtype'])} · index.json has every setting</small></p>
</body></html>
"""


__all__ = ["Column", "compare", "default_out_dir", "grid", "index_html", "clip_name", "INDEX_JSON", "INDEX_HTML"]
