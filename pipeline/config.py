"""Project settings: typed dataclasses with their defaults in one place.

``params.yaml`` (read by DVC and by every stage) only overrides these defaults; an unknown key is an
error so a typo never silently falls back to a default. The training settings have their own
dataclass (``pipeline.train_config.TrainConfig``); here they are kept as the raw mapping and handed
to it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.checkpoints import CheckpointPaths
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a dtype is resolved: reading params.yaml needs none
    import torch

DEFAULT_PARAMS = Path("params.yaml")
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class PathsConfig:
    data: str = "workspace/data"  # the user's triplets (NAME.mp3 + NAME_prompt.txt + NAME_lyrics.txt)
    cache: str = "workspace/cache"  # manifest, decoded PCM and feature shards
    exps: str = "workspace/exps/logs"  # one folder per experiment (checkpoints, metrics, previews)
    # Where the feature shards live: empty = <cache>/features (a DVC output, shared with dvc push/
    # pull), or an fsspec URL such as s3://bucket/aceturbo/features to keep them on object storage
    # (then run `aceturbo encode` / `aceturbo train` directly: DVC tracks local outputs only).
    feature_store: str = ""

    @property
    def manifest(self) -> Path:
        return Path(self.cache) / "manifest.jsonl"

    @property
    def audio_list(self) -> Path:
        # The audio-only view of the manifest: changes only when audio changes, so editing a
        # prompt does not make DVC rerun the audio stages.
        return Path(self.cache) / "audio_list.jsonl"

    @property
    def text_list(self) -> Path:
        return Path(self.cache) / "text_list.jsonl"

    @property
    def pcm(self) -> Path:
        return Path(self.cache) / "pcm"

    def fingerprint_file(self, stream: str) -> Path:
        """Where the `fingerprints` DVC stage writes a stream's encoder fingerprint (an encode
        stage's dependency: weights edited in place change it, so `dvc repro` re-encodes)."""
        return Path(self.cache) / "fingerprints" / f"{stream}.txt"

    @property
    def features(self) -> str:
        """The feature cache: a local folder or an fsspec URL (kept a string: Path would mangle s3://)."""
        return self.feature_store or str(Path(self.cache) / "features")


@dataclass
class ModelsConfig:
    # Local folders only: nothing is downloaded. See README "Real checkpoints".
    acestep: str = "workspace/checkpoints/ACE-Step-v1-3.5B"
    mert: str = "workspace/checkpoints/MERT-v1-330M"
    mhubert: str = "workspace/checkpoints/mHuBERT-147"
    lyric_vocab: str = "workspace/checkpoints/lyrics_vocab.json"

    def paths(self) -> CheckpointPaths:
        return CheckpointPaths(Path(self.acestep), Path(self.mert), Path(self.mhubert))

    def found_in(self, root: str | Path) -> "ModelsConfig":
        """A relative path that does not exist here but does under ``root`` is read from there.

        For `dvc exp run --queue`: DVC runs a queued experiment in a temporary copy of the
        repository (.dvc/tmp/exps/...) holding only what git and the DVC cache hold, and sets
        DVC_ROOT to the original repository. Model folders are machine-local, read-only inputs of
        many GB (their identity is checked by the encoder fingerprints), so they are read from the
        original repository rather than copied into every queued run."""
        changes = {}
        for item in dataclasses.fields(self):
            path = Path(getattr(self, item.name))
            if not path.is_absolute() and not path.exists() and (Path(root) / path).exists():
                changes[item.name] = str(Path(root) / path)
        return dataclasses.replace(self, **changes)


@dataclass
class IngestConfig:
    min_seconds: float = 3.0  # shorter clips are padded with silence to this length
    max_silence: float = 0.95  # reject a clip whose samples are more than this fraction exact zeros

    def __post_init__(self):
        for name in ("min_seconds", "max_silence"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"ingest.{name} must be a number, not {value!r}")
        if not 0 <= self.max_silence <= 1:
            raise ConfigError(f"ingest.max_silence must be between 0 and 1, not {self.max_silence!r}")


@dataclass
class EncodeConfig:
    device: str = "auto"  # auto = cuda if available, else cpu
    # The encoders' compute dtype. float32 as the official trainer (they run once per song, so it is
    # cheap); "bfloat16" halves their time and memory; "auto" = bfloat16 on cuda, float32 on cpu.
    dtype: str = "float32"
    text_variants: int = 8  # prompt variants (tag shuffles / recaption picks) cached per song
    text_seed: int = 0
    storage_dtype: str = "bfloat16"  # float16 or bfloat16 in the Zarr shards

    def __post_init__(self):
        # Checked here, not when the first shard is written after minutes of encoding.
        if self.storage_dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"encode.storage_dtype must be bfloat16 or float16, not {self.storage_dtype!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"encode.dtype must be one of {', '.join(DTYPE_NAMES)}, not {self.dtype!r}")
        if not isinstance(self.text_variants, int) or self.text_variants < 1:
            raise ConfigError(f"encode.text_variants must be a whole number ≥ 1, not {self.text_variants!r}")


@dataclass
class UIConfig:
    # Largest file the web UI accepts in one upload (audio, text or ZIP), in MB: bigger ones are
    # refused with a message instead of landing in the data folder. Copy big datasets in directly.
    max_upload_mb: float = 500.0

    def __post_init__(self):
        if isinstance(self.max_upload_mb, bool) or not isinstance(self.max_upload_mb, (int, float)) \
                or not self.max_upload_mb > 0:
            raise ConfigError(f"ui.max_upload_mb must be a number of MB > 0, not {self.max_upload_mb!r}")


@dataclass
class ProjectConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    train: dict[str, Any] = field(default_factory=dict)  # -> TrainConfig.from_params
    source: str = str(DEFAULT_PARAMS)  # the params file these settings were read from


def _fill(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def load_params(path: str | Path = DEFAULT_PARAMS) -> ProjectConfig:
    """Read params.yaml (missing file = all defaults)."""
    path = Path(path)
    if not path.exists():
        return ProjectConfig(source=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (paths, models, ingest, encode, ui, train)")
    sections = {"paths": PathsConfig, "models": ModelsConfig, "ingest": IngestConfig, "encode": EncodeConfig,
                "ui": UIConfig}
    unknown = sorted(set(raw) - set(sections) - {"train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}")
    for name in list(sections) + ["train"]:
        if not isinstance(raw.get(name) or {}, dict):
            raise ConfigError(f"{path} → {name} must be a mapping of settings, not {raw[name]!r}")
    built = {name: _fill(cls, raw.get(name) or {}, f"{path} → {name}") for name, cls in sections.items()}
    if os.environ.get("DVC_ROOT"):  # set by DVC for every stage it runs; see ModelsConfig.found_in
        built["models"] = built["models"].found_in(os.environ["DVC_ROOT"])
    return ProjectConfig(**built, train=dict(raw.get("train") or {}), source=str(path))


def resolve_device(name: str = "auto"):
    """auto → this process's GPU (cuda:LOCAL_RANK under torchrun) if CUDA is present, else the CPU."""
    from pipeline.distributed import resolve_device as for_this_process

    try:
        return for_this_process(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_dtype(name: str, device) -> "torch.dtype":
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: use auto, float32 or bfloat16") from None
