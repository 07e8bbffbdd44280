"""LoRA for the ACE-Step transformer: settings, apply for training, save/read/load files, alpha baking.

The file format is the official trainer's (spec §6.6): one ``pytorch_lora_weights.safetensors``
per folder, PEFT keys without prefix or adapter name
(``transformer_blocks.0.attn.to_q.lora_A.weight``), header metadata ``format = "pt"`` plus
``lora_adapter_metadata`` (the JSON of the LoraConfig, sorted keys, as diffusers ≥ 0.34 writes it).
We add ``aceturbo_lora`` (our own JSON: trained r/alpha/rsLoRA/scale and whether alpha was baked).

The scale trap (spec §6.7, golden README): the trained strength is alpha/sqrt(r) with rsLoRA and
alpha/r without; some loaders forget alpha (scale 1.0) or rsLoRA. ``load_lora`` always applies
trained scale × weight, whether it is given the folder or the file. Files without metadata (official
diffusers-0.33 files) carry no alpha: ``read_lora_file`` then infers r from the tensor shapes and
assumes alpha = r (scale 1.0, what diffusers and ComfyUI do) unless the caller passes ``alpha`` /
``use_rslora``. ``bake_alpha`` folds the trained scale into A and B so that strength 1.0 is right in
loaders that ignore alpha.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError
from pipeline.fileio import atomic_output

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ["speaker_embedder", "linear_q", "linear_k", "linear_v", "to_q", "to_k", "to_v", "to_out.0"]

# "<module>.lora_A.weight", tolerating an adapter name and the prefixes other tools write.
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_PREFIXES = ("base_model.model.", "transformer.")


@dataclass
class LoraSettings:
    r: int = 64
    alpha: float = 32.0
    use_rslora: bool = True
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0

    def __post_init__(self):
        if int(self.r) != self.r or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r} (e.g. lora.r: 64)")
        if not self.alpha > 0:
            raise ConfigError(f"LoRA alpha must be > 0, got {self.alpha!r} (e.g. lora.alpha: 32)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise ConfigError("LoRA target_modules is empty; use e.g. " + ", ".join(DEFAULT_TARGETS))
        self.r = int(self.r)
        self.target_modules = list(self.target_modules)

    @property
    def scale(self) -> float:
        """The trained strength: alpha/sqrt(r) with rsLoRA, alpha/r otherwise."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_lora_config(self, target_modules: list[str] | None = None, **extra):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            use_rslora=self.use_rslora,
            target_modules=list(target_modules if target_modules is not None else self.target_modules),
            lora_dropout=self.dropout,
            bias="none",
            init_lora_weights=True,
            **extra,
        )


# ---------------------------------------------------------------------------------------- training
def _lora_layers(model: nn.Module, adapter_name: str):
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def _has_adapter(model: nn.Module, adapter_name: str) -> bool:
    return adapter_name in (getattr(model, "peft_config", None) or {})


def lora_parameters(model: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The A and B matrices of one adapter (what the optimizer trains)."""
    params = []
    for _, module in _lora_layers(model, adapter_name):
        params += [module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight]
    return params


def _cast_adapter(model: nn.Module, adapter_name: str, dtype: torch.dtype | None) -> None:
    # peft may upcast adapters to fp32 (STACK pitfall 5); keep them in the requested dtype, by
    # default the base layer's, so bf16-true training really is bf16.
    for _, module in _lora_layers(model, adapter_name):
        target = dtype or module.get_base_layer().weight.dtype
        module.lora_A[adapter_name].to(target)
        module.lora_B[adapter_name].to(target)


def apply_lora(model: nn.Module, settings: LoraSettings, adapter_name: str = "default", dtype: torch.dtype | None = None):
    """Inject a fresh trainable adapter (A Kaiming-uniform, B zero) and freeze everything else.

    ``dtype``: the LoRA weights' dtype (default: the base layers' dtype). Returns the model.
    """
    if _has_adapter(model, adapter_name):
        raise ConfigError(f"the model already has a LoRA adapter named {adapter_name!r}; pick another name")
    try:
        model.add_adapter(settings.to_lora_config(), adapter_name=adapter_name)
    except ValueError as exc:
        raise ConfigError(
            f"LoRA target_modules {settings.target_modules} do not fit this model ({exc}); "
            f"use names like {', '.join(DEFAULT_TARGETS)}"
        ) from exc
    _cast_adapter(model, adapter_name, dtype)
    trainable = {id(p) for p in lora_parameters(model, adapter_name)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Official keys: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``, no prefix, no adapter name."""
    if not _has_adapter(model, adapter_name):
        raise ConfigError(f"the model has no LoRA adapter named {adapter_name!r}")
    out = {}
    for name, module in _lora_layers(model, adapter_name):
        out[f"{name}.lora_A.weight"] = module.lora_A[adapter_name].weight.detach()
        out[f"{name}.lora_B.weight"] = module.lora_B[adapter_name].weight.detach()
    return out


# ---------------------------------------------------------------------------------------- files
def _bake(state_dict: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    factor = math.sqrt(settings.scale)
    out = {}
    for key, tensor in state_dict.items():
        if _KEY.match(key):
            tensor = (tensor.float() * factor).to(tensor.dtype)
        out[key] = tensor
    return out


def bake_alpha(state_dict: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Multiply every lora_A and lora_B by sqrt(trained scale): B·A then carries the scale, so a
    loader that uses alpha = r (strength 1.0) reproduces the trained strength. Store the result with
    alpha = r and use_rslora = false (``baked_settings``)."""
    return _bake(state_dict, settings)


def baked_settings(settings: LoraSettings) -> LoraSettings:
    """The settings a baked file declares: scale 1.0."""
    return LoraSettings(
        r=settings.r, alpha=float(settings.r), use_rslora=False,
        target_modules=list(settings.target_modules), dropout=settings.dropout,
    )


def _config_json(settings: LoraSettings) -> str:
    config = settings.to_lora_config().to_dict()

    def plain(value):
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if hasattr(value, "value") and not isinstance(value, (int, float, str, bool)):  # enums
            return value.value
        return value

    return json.dumps(plain(config), indent=2, sort_keys=True)


def write_lora_file(
    state_dict: dict[str, torch.Tensor],
    folder: str | Path,
    settings: LoraSettings,
    *,
    baked_from: LoraSettings | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically with the metadata of ``settings``
    (``baked_from``: the trained settings when the scale has been baked into the weights)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained = baked_from or settings
    ours = {
        "r": trained.r,
        "alpha": trained.alpha,
        "use_rslora": trained.use_rslora,
        "scale": trained.scale,
        "baked": baked_from is not None,
        "target_modules": list(trained.target_modules),
    }
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": _config_json(settings),
        "aceturbo_lora": json.dumps(ours, sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path = folder / LORA_WEIGHTS_NAME
    with atomic_output(path) as tmp:  # 0644 under umask 022 (save_file alone makes 0600 files)
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_lora(
    model: nn.Module,
    folder: str | Path,
    settings: LoraSettings,
    adapter_name: str = "default",
    bake_alpha: bool = False,
) -> Path:
    """Save one adapter in the official layout; returns the file path."""
    state_dict = lora_state_dict(model, adapter_name)
    ranks = {t.shape[0] for k, t in state_dict.items() if ".lora_A." in k}
    if ranks and ranks != {settings.r}:
        raise ConfigError(f"LoRA settings say r={settings.r} but adapter {adapter_name!r} has rank {sorted(ranks)}")
    if bake_alpha:
        return write_lora_file(_bake(state_dict, settings), folder, baked_settings(settings), baked_from=settings)
    return write_lora_file(state_dict, folder, settings)


def _resolve_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        file = path / LORA_WEIGHTS_NAME
        if not file.is_file():
            raise CheckpointError(
                f"LoRA folder '{path}' has no {LORA_WEIGHTS_NAME}; point at a folder written by the trainer "
                f"(…/checkpoints/epoch=E-step=S_lora) or at the .safetensors file itself"
            )
        return file
    if not path.is_file():
        raise CheckpointError(f"LoRA '{path}' not found; give a folder holding {LORA_WEIGHTS_NAME} or the file")
    return path


def _short_target(module_path: str) -> str:
    parts = module_path.split(".")
    # "attn.to_out.0" is targeted as "to_out.0": keep the numbered child with its parent's name.
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def read_lora_file(
    path: str | Path, alpha: float | None = None, use_rslora: bool | None = None
) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """Read a LoRA (folder or file) → (state dict with official keys, its settings).

    Settings come from ``lora_adapter_metadata``. Without it (diffusers 0.33 files), r is inferred
    from the lora_A shapes and alpha = r / no rsLoRA are assumed (scale 1.0). ``alpha`` and
    ``use_rslora``, when given, override whatever the file says.
    """
    from safetensors import safe_open

    file = _resolve_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            raw = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"LoRA file '{file}' is not a readable safetensors file ({exc}); re-export it") from exc

    state_dict: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        match = _KEY.match(key)
        if not match:
            raise CheckpointError(
                f"LoRA file '{file}' has a key '{key}' that is not a PEFT LoRA weight "
                f"(expected '<module>.lora_A.weight' / '.lora_B.weight'); convert it to the official layout"
            )
        state_dict[f"{match['module']}.lora_{match['ab']}.weight"] = tensor
    if not state_dict:
        raise CheckpointError(f"LoRA file '{file}' holds no LoRA weights")

    a_ranks = [t.shape[0] for k, t in state_dict.items() if k.endswith(".lora_A.weight")]
    modules = sorted({_KEY.match(k)["module"] for k in state_dict})
    config = None
    if "lora_adapter_metadata" in metadata:
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"LoRA file '{file}' has unreadable lora_adapter_metadata ({exc})") from exc
    if config:
        targets = config.get("target_modules") or sorted({_short_target(m) for m in modules})
        settings = LoraSettings(
            r=int(config.get("r", Counter(a_ranks).most_common(1)[0][0])),
            alpha=float(config.get("lora_alpha", config.get("r", 8))),
            use_rslora=bool(config.get("use_rslora", False)),
            target_modules=[targets] if isinstance(targets, str) else sorted(targets),
            dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        )
    else:
        r = Counter(a_ranks).most_common(1)[0][0] if a_ranks else 1
        settings = LoraSettings(
            r=r, alpha=float(r), use_rslora=False, target_modules=sorted({_short_target(m) for m in modules})
        )
    if alpha is not None:
        settings.alpha = float(alpha)
    if use_rslora is not None:
        settings.use_rslora = bool(use_rslora)
    return state_dict, settings


# ---------------------------------------------------------------------------------------- inference
def remove_lora(model: nn.Module, adapter_name: str = "ace_step_lora") -> None:
    """Remove an adapter (no-op when absent)."""
    if _has_adapter(model, adapter_name):
        model.delete_adapters(adapter_name)


def load_lora(
    model: nn.Module,
    path: str | Path,
    weight: float = 1.0,
    adapter_name: str = "ace_step_lora",
    alpha: float | None = None,
    use_rslora: bool | None = None,
) -> LoraSettings:
    """Load a LoRA (folder or file) as a frozen adapter at strength trained-scale × ``weight``.

    Replaces a previous adapter of the same name. Returns the file's settings.
    """
    file = _resolve_file(path)
    state_dict, settings = read_lora_file(file, alpha=alpha, use_rslora=use_rslora)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        match = _KEY.match(key)
        modules.setdefault(match["module"], {})[match["ab"]] = tensor
    broken = [m for m, ab in modules.items() if set(ab) != {"A", "B"}]
    if broken:
        raise CheckpointError(f"LoRA file '{file}' lacks lora_A or lora_B for {broken[:3]}; re-export it")

    # Wrap exactly the modules the file names (full paths), with per-module ranks from the shapes.
    ranks = {m: ab["A"].shape[0] for m, ab in modules.items()}
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != settings.r}
    remove_lora(model, adapter_name)
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise CheckpointError(
            f"LoRA file '{file}' does not fit this model: no module {missing[0]!r} "
            f"({len(missing)} unknown); was it trained for another model?"
        )
    try:
        model.add_adapter(
            settings.to_lora_config(target_modules=sorted(modules), rank_pattern=rank_pattern), adapter_name=adapter_name
        )
    except ValueError as exc:
        raise CheckpointError(f"LoRA file '{file}' does not fit this model ({exc})") from exc
    _cast_adapter(model, adapter_name, None)

    with torch.no_grad():
        for name, module in _lora_layers(model, adapter_name):
            for ab, holder in (("A", module.lora_A[adapter_name]), ("B", module.lora_B[adapter_name])):
                source = modules[name][ab]
                if tuple(source.shape) != tuple(holder.weight.shape):
                    raise CheckpointError(
                        f"LoRA file '{file}': {name}.lora_{ab}.weight has shape {tuple(source.shape)}, "
                        f"the model needs {tuple(holder.weight.shape)}; was it trained for another model?"
                    )
                holder.weight.copy_(source.to(holder.weight.dtype))
            # Set the trained scale explicitly (not via peft's set_scale, whose rsLoRA handling
            # changed across versions): weight × alpha/sqrt(r) or weight × alpha/r.
            r = module.r[adapter_name]
            module.scaling[adapter_name] = weight * settings.alpha / (math.sqrt(r) if settings.use_rslora else r)
    model.set_adapter(adapter_name)
    # peft's set_adapter marks the active adapter trainable; a loaded LoRA is for inference.
    for p in lora_parameters(model, adapter_name):
        p.requires_grad_(False)
    return settings
