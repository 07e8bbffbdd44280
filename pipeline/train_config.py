"""Training settings: one dataclass, defaults in one place.

Resolution order (later wins): these defaults → the preset (configs/presets/<name>.yaml) →
params.yaml's ``train:`` section → command-line options. Presets only override; a setting that is
spelled out by the user (params.yaml or the CLI) always beats the preset.

This module imports neither torch nor peft, so the CLI and the web UI can read the help texts fast.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
DEFAULT_PRESET = "balanced"

# The official LoRA target list (spec §7). pipeline.lora.DEFAULT_TARGETS holds the same names; it is
# repeated here so that reading the settings does not import torch (a test checks they agree).
OFFICIAL_TARGETS = (
    "speaker_embedder", "linear_q", "linear_k", "linear_v", "to_q", "to_k", "to_v", "to_out.0",
)

PRECISIONS = ("bf16-true", "fp32")
_EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def _opt(default, help: str, **kwargs):
    """A dataclass field with its one-line help (shown by `aceturbo train --help` and the web UI)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # --- run ---
    experiment: str = _opt("", "Run folder name under workspace/exps/logs/ (empty: the preset name).")
    preset: str = _opt(DEFAULT_PRESET, "Named set of defaults from configs/presets/ (conservative, balanced, aggressive).")
    seed: int = _opt(42, "Seed for LoRA init, noise, timesteps and CFG dropout (runs are reproducible).")
    device: str = _opt("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N.")
    precision: str = _opt("bf16-true", "bf16-true (weights, LoRA and optimizer in bf16; least memory) or fp32 (official default).")
    # --- LoRA (spec §7) ---
    rank: int = _opt(64, "LoRA rank r (conservative 16, balanced 64, aggressive 256 = the official rap LoRA).")
    alpha: float = _opt(32.0, "LoRA alpha; the effective scale is alpha/sqrt(r) with rsLoRA, else alpha/r.")
    rslora: bool = _opt(True, "Rank-stabilised LoRA scaling alpha/sqrt(r) (official: on).")
    target_modules: list = _opt(list(OFFICIAL_TARGETS), "Module name suffixes that get a LoRA (comma-separated on the CLI).")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input (official: 0).")
    # --- optimiser and schedule (spec §6.2) ---
    learning_rate: float = _opt(1e-4, "AdamW peak learning rate.")
    weight_decay: float = _opt(0.01, "AdamW weight decay (on the LoRA weights only).")
    betas: tuple = _opt((0.8, 0.9), "AdamW betas (beta1 beta2).")
    warmup_steps: int = _opt(10, "Linear warm-up from 0 over this many optimizer steps, then linear decay to 0 at max_steps.")
    max_steps: int = _opt(2000, "Optimizer steps to train (each is grad_accumulation batches).")
    grad_accumulation: int = _opt(1, "Batches whose gradients are summed into one optimizer step.")
    grad_clip: float = _opt(0.5, "Clip the gradient L2 norm to this value (0: no clipping).")
    # --- objective (spec §6.3) ---
    shift: float = _opt(3.0, "Timestep shift of the flow-matching sigma table (official 3.0).")
    logit_mean: float = _opt(0.0, "Mean of the logit-normal timestep sampling.")
    logit_std: float = _opt(1.0, "Std of the logit-normal timestep sampling.")
    ssl_coeff: float = _opt(1.0, "Weight of the MERT/mHuBERT alignment loss (official 1.0).")
    text_dropout: float = _opt(0.15, "CFG dropout: probability a sample's text states are zeroed.")
    speaker_dropout: float = _opt(0.5, "CFG dropout: probability a sample's speaker embedding is zeroed.")
    lyric_dropout: float = _opt(0.15, "CFG dropout: probability a sample's lyrics (ids and mask) are zeroed.")
    # --- data ---
    batch_size: int = _opt(1, "Songs per batch (official 1; >1 batches songs of similar length, each cropped to the shortest).")
    max_seconds: float = _opt(240.0, "Longest audio window per sample in seconds (official crop: 240).")
    num_workers: int = _opt(-1, "Data-loader worker processes (cached mode); -1: 2 on CUDA (the next batches are read "
                                "and pinned while the GPU works), 0 on the CPU.")
    live: bool = _opt(False, "Encode songs on the fly instead of reading the feature cache (needs all encoders in memory).")
    gradient_checkpointing: str = _opt(
        "auto", "Which DiT blocks recompute their activations in backward: auto (the fewest that fit the "
        "device's free memory), all (least memory, ~30% slower), none (fastest), or k (every k-th block). "
        "true/false = all/none.", normalize="checkpointing", cli_off="none")
    compile: bool = _opt(False, "Compile the DiT block with torch.compile (CUDA; a compile per shape bucket at the "
                                "start, then faster steps): crops are cut to a few lengths, lyrics padded to a few.")
    # --- outputs ---
    save_every: int = _opt(500, "Write a LoRA checkpoint every N optimizer steps (a final one is always written).")
    keep_last: int = _opt(5, "Keep only the newest K checkpoint folders (0: keep all).")
    plot_every: int = _opt(0, "Generate a preview every N steps (0: off). Each preview is a full 60-step sampling.")
    log_plot_every: int = _opt(50, "Redraw loss.png every N steps.")
    # --- validation and early stop (docs/training.md "Validation") ---
    val_every: int = _opt(0, "Validation loss every N optimizer steps (0: at every checkpoint, i.e. each save_every, and at the end).")
    val_songs: list = _opt(["val/*"], "Held-out song ids or patterns (default: the data folder's val/ subfolder). None held out: the validation uses training songs and measures fit, not generalisation.")
    val_max_songs: int = _opt(4, "Songs in the validation set (the first N by id); 0 turns validation off.")
    val_sigmas: int = _opt(8, "Noise levels per validation song: a fixed grid over the logit-normal timestep distribution.")
    val_seed: int = _opt(0, "Seed of the validation noise, crops and prompt variants (fixed, so runs with other seeds compare).")
    early_stop_patience: int = _opt(0, "Stop after this many validations without a new best validation loss (0: off).")

    def __post_init__(self):
        self.gradient_checkpointing = normalize_checkpointing(self.gradient_checkpointing)

    # ---------------------------------------------------------------- helpers
    @property
    def run_name(self) -> str:
        return self.experiment or self.preset

    def loader_workers(self, device_type: str) -> int:
        """num_workers, with -1 resolved for a device of this type ("cuda" or "cpu")."""
        return self.num_workers if self.num_workers >= 0 else (2 if device_type == "cuda" else 0)

    @property
    def lora_scale(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad setting and how to fix it; return self."""
        if self.precision == "bf16-mixed":
            raise ConfigError(
                "precision 'bf16-mixed' is refused: with peft it keeps LoRA weights fp32 under bf16 "
                "autocast and is known to break LoRA gradients here; use precision: bf16-true (or fp32)."
            )
        for f in dataclasses.fields(self):  # inf/nan pass the range checks below (inf > 0)
            value = getattr(self, f.name)
            numbers = value if _kind(f) == "pair" else [value] if _kind(f) == "float" else []
            _check(all(math.isfinite(v) for v in numbers), f.name, f"must be a finite number, not {value!r}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        _check(bool(re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device)), "device", "must be auto, cpu, cuda or cuda:N")
        _check(self.experiment == "" or bool(_EXPERIMENT_NAME.match(self.experiment)), "experiment",
               "use letters, digits, '.', '_' or '-' (it becomes a folder name)")
        _check(self.rank >= 1, "rank", "must be ≥ 1 (try 16, 64 or 256)")
        _check(self.alpha > 0, "alpha", "must be > 0 (official 32)")
        _check(len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
               "target_modules", f"must name at least one module, e.g. {','.join(OFFICIAL_TARGETS)}")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)")
        _check(0 < self.learning_rate < 1, "learning_rate", "must be in (0, 1) (official 1e-4)")
        _check(self.weight_decay >= 0, "weight_decay", "must be ≥ 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1), e.g. 0.8 0.9")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be ≥ 0")
        _check(self.max_steps >= 1, "max_steps", "must be ≥ 1")
        _check(self.grad_accumulation >= 1, "grad_accumulation", "must be ≥ 1")
        _check(self.grad_clip >= 0, "grad_clip", "must be ≥ 0 (0 turns clipping off; official 0.5)")
        _check(self.shift > 0, "shift", "must be > 0 (official 3.0)")
        _check(self.logit_std > 0, "logit_std", "must be > 0")
        _check(self.ssl_coeff >= 0, "ssl_coeff", "must be ≥ 0")
        for name in ("text_dropout", "speaker_dropout", "lyric_dropout"):
            _check(0.0 <= getattr(self, name) <= 1.0, name, "must be a probability in [0, 1]")
        _check(self.batch_size >= 1, "batch_size", "must be ≥ 1")
        _check(self.max_seconds > 0, "max_seconds", "must be > 0 (official 240)")
        _check(self.num_workers >= -1, "num_workers", "must be ≥ 0, or -1 for 2 on CUDA and 0 on the CPU")
        for name in ("save_every", "keep_last", "plot_every", "log_plot_every", "val_every", "val_max_songs",
                     "early_stop_patience"):
            _check(getattr(self, name) >= 0, name, "must be ≥ 0")
        _check(self.val_sigmas >= 1, "val_sigmas", "must be ≥ 1 (8 covers the timestep distribution)")
        _check(all(isinstance(p, str) and p for p in self.val_songs), "val_songs", "must be song ids or patterns, e.g. val/*")
        _check(not self.early_stop_patience or self.val_max_songs > 0, "early_stop_patience",
               "needs the validation loss: set val_max_songs > 0 (or early_stop_patience: 0)")
        return self

    def advice(self) -> list[str]:
        """Valid but probably unintended settings (train() shows them as warnings)."""
        notes = []
        if self.warmup_steps >= self.max_steps > 1:
            notes.append(f"warmup_steps={self.warmup_steps} ≥ max_steps={self.max_steps}: the learning rate "
                         "never reaches learning_rate.")
        if self.plot_every:
            notes.append(f"plot_every={self.plot_every}: each preview is a full 60-step sampling of the clip "
                         "(minutes per preview on a large GPU); set plot_every: 0 to train without previews.")
        if self.early_stop_patience and not (self.val_every or self.save_every):
            notes.append(f"early_stop_patience={self.early_stop_patience} with val_every=0 and save_every=0: the "
                         "validation runs only at the end, so training never stops early; set val_every.")
        return notes

    @property
    def validation_interval(self) -> int:
        """Steps between validations (0: only at the end)."""
        return self.val_every or self.save_every

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        data["target_modules"] = list(self.target_modules)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def lora_config(self) -> dict[str, Any]:
        """The LoRA part in the official LoraConfig JSON spelling (spec §7)."""
        return {"r": self.rank, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "target_modules": list(self.target_modules), "lora_dropout": self.lora_dropout}

    def replace(self, **changes) -> "TrainConfig":
        return from_params(changes, base=self)


def _check(ok: bool, name: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"train setting '{name}' {fix}.")


# ------------------------------------------------------------------ field table and coercion
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def fields_help() -> list[dict[str, Any]]:
    """[{name, type, default, help}] in declaration order (for the CLI and the web UI)."""
    rows = []
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        rows.append({"name": f.name, "type": _kind(f), "default": getattr(defaults, f.name),
                     "help": f.metadata.get("help", ""), "cli_off": f.metadata.get("cli_off")})
    return rows


def _kind(f: dataclasses.Field) -> str:
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    return {int: "int", float: "float", bool: "bool", str: "str", list: "list", tuple: "pair"}.get(tp, str(tp))


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type; ConfigError naming the setting when it can't."""
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                return value.strip().lower() in ("true", "yes", "on", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            as_float = float(value)  # YAML reads 2e3 as a string; accept it when it is whole
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # PyYAML reads 1e-4 (no dot) as a string
        if kind == "str":
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if kind == "list":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [str(v) for v in value]
        if kind == "pair":
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError
            return (float(value[0]), float(value[1]))
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"train setting '{name}' has value {value!r}, which is not a valid {kind}.")


def from_params(params: dict[str, Any] | None, base: TrainConfig | None = None) -> TrainConfig:
    """A copy of ``base`` (default: TrainConfig()) with the given settings applied. Unknown names
    raise ConfigError listing the valid ones (typos must not silently fall back to a default)."""
    base = base if base is not None else TrainConfig()
    params = dict(params or {})
    kinds = {f.name: _kind(f) for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(params) - set(kinds))
    if unknown:
        raise ConfigError(
            f"unknown train setting(s) {', '.join(unknown)}; valid names: {', '.join(kinds)}."
        )
    changes = {name: _coerce(name, kinds[name], _normalize(name, value)) for name, value in params.items()
               if value is not None}
    return dataclasses.replace(base, **changes)


def _normalize(name: str, value: Any) -> Any:
    """Settings with more than one spelling (e.g. gradient_checkpointing: true = all) to the one stored."""
    if _FIELDS[name].metadata.get("normalize") == "checkpointing":
        return normalize_checkpointing(value)
    return value


def normalize_checkpointing(value: Any) -> str:
    """gradient_checkpointing as given → "auto" | "all" | "none" | "<k>" (k ≥ 2; the old booleans map to
    all/none); ConfigError for anything else. pipeline/checkpointing.py acts on the result."""
    if isinstance(value, bool):
        return "all" if value else "none"
    text = str(value).strip().lower()
    if text in ("true", "yes", "on"):
        return "all"
    if text in ("false", "no", "off", "0"):
        return "none"
    if text in ("auto", "all", "none"):
        return text
    if text.isdigit() and int(text) >= 1:
        return "all" if int(text) == 1 else str(int(text))
    raise ConfigError(f"train setting 'gradient_checkpointing' has value {value!r}: use auto, all, none, or an "
                      "integer k to recompute every k-th block.")


# ------------------------------------------------------------------ presets
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """The overrides of preset ``name`` (configs/presets/<name>.yaml), without its description."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not re.match(r"^[A-Za-z0-9_-]+$", name or "") or not path.is_file():
        raise ConfigError(
            f"unknown preset '{name}'; choose one of {', '.join(available_presets()) or '(none found)'} "
            f"(files in {PRESETS_DIR})."
        )
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"preset file {path} must be a mapping of train settings.")
    data.pop("description", None)
    data.pop("preset", None)
    from_params(data)  # validate the names and types now, so a broken preset names its file
    return data


def preset_description(name: str) -> str:
    data = _read_yaml(PRESETS_DIR / f"{name}.yaml") or {}
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def build_config(params: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 preset: str | None = None) -> TrainConfig:
    """Defaults → preset → params (params.yaml's train section) → overrides (CLI), validated.

    The preset is ``preset`` if given, else the one named in overrides or params, else the default.
    """
    params = {k: v for k, v in (params or {}).items() if v is not None}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    name = preset or overrides.get("preset") or params.get("preset") or DEFAULT_PRESET
    config = from_params(load_preset(name), base=TrainConfig(preset=name))
    config = from_params({k: v for k, v in params.items() if k != "preset"}, base=config)
    config = from_params({k: v for k, v in overrides.items() if k != "preset"}, base=config)
    return config.validate()


def read_params_train(path: str | Path) -> dict[str, Any]:
    """params.yaml's ``train:`` section ({} if the file or the section is absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = _read_yaml(path) or {}
    section = data.get("train") if isinstance(data, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: 'train' must be a mapping of settings (see docs/training.md).")
    return section


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


__all__ = [
    "TrainConfig", "OFFICIAL_TARGETS", "PRECISIONS", "DEFAULT_PRESET", "fields_help", "from_params",
    "load_preset", "available_presets", "preset_description", "build_config", "read_params_train",
]
