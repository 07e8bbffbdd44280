"""LoRA for the ACE-Step transformer: settings, apply for training, write/inspect/read/load files.

The file is the official trainer's layout (spec §6.6): one ``pytorch_lora_weights.safetensors`` per
folder, PEFT keys without prefix or adapter name (``transformer_blocks.0.attn.to_q.lora_A.weight``),
header metadata ``format = "pt"`` and ``lora_adapter_metadata`` (the LoraConfig as JSON, sorted keys,
as diffusers ≥ 0.34 writes it). We add ``aceturbo_lora``: our JSON of the trained r/alpha/rsLoRA/scale/
dtype and whether the scale is baked in.

The scale (spec §6.7, STACK.md 14-15): training applies alpha/√r (rsLoRA) or alpha/r to B·A, but at
strength 1.0 the loaders users have apply other things. The official ACE-Step pipeline calls diffusers'
``load_lora_adapter`` on the file path, which ignores the metadata: scale 1. ComfyUI reads no metadata:
``<module>.alpha`` / r per module, 1 without it. diffusers given folder + ``weight_name`` reads
``lora_adapter_metadata``. So every file we write for other tools is **baked**: lora_B holds
scale × B (lora_A as trained), the metadata says lora_alpha = r without rsLoRA, and each module has a
scalar ``<module>.alpha`` = r: scale 1 by every rule, the trained change at strength 1.0 everywhere.
Multiplying by a power of two (8, 4 and 2: the presets' scales) is exact in bf16; for other scales
16-bit weights are stored as float32 (one rounding of scale × B, ~6e-8; diffusers on a bf16 model
rounds them to bf16 itself, ~3e-3, while ``load_lora`` keeps them float32). All of the scale goes into B
(not √scale into each): one rounding instead of two, none for powers of two. Training resumes from
the unbaked weights kept in training_state.pt (pipeline.train_state).

``inspect_lora`` reads what a file says (header and ``.alpha`` scalars, not the weights),
``read_lora_file`` its weights too, and ``load_lora`` applies exactly the trained change × weight
whatever the kind of file: ours (baked or not), kohya/ComfyUI-style ``.alpha`` files, diffusers and
official-trainer files (it is ``read_lora_file`` then ``attach_lora``; callers that also want the
file's account call those two and read the file once).
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
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


def _rank_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


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
        return _rank_scale(self.alpha, self.r, self.use_rslora)

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


def _cast_adapter(
    model: nn.Module, adapter_name: str, dtype: torch.dtype | None, at_least: torch.dtype | None = None
) -> None:
    # peft may upcast adapters to fp32 (STACK pitfall 5); keep them in the requested dtype, by
    # default the base layer's, so bf16-true training really is bf16 (``at_least``: no coarser than it).
    for _, module in _lora_layers(model, adapter_name):
        target = dtype or module.get_base_layer().weight.dtype
        if at_least is not None:
            target = torch.promote_types(target, at_least)
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
# The loaders we know and how each scales B·A at strength 1.0 (LoraInfo.client_scales).
CLIENTS = {
    "ace-step": "ACE-Step pipeline (load_lora_adapter on the file; lora_weight)",
    "comfyui": "ComfyUI (LoRA loader strength)",
    "diffusers": "diffusers load_lora_adapter(folder, weight_name=...)",
    "aceturbo": "aceturbo generate --lora-weight / pipeline.lora.load_lora",
}
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _pairs(weights: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module → {"A": lora_A, "B": lora_B} of a state dict with official keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        out.setdefault(match["module"], {})[match["ab"]] = tensor
    return out


def bake_alpha(weights: dict[str, torch.Tensor], scale: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """lora_B × scale (one number, or one per module), lora_A unchanged: B·A then carries the trained
    strength and a loader that applies scale 1 (alpha = r) gives the trained change.

    Exact in the weights' dtype when every scale is a power of two; 32-bit weights get one rounding
    of the product; 16-bit weights with other scales become float32 (A too: one dtype per file)."""
    pairs = _pairs(weights)
    scales = scale if isinstance(scale, dict) else dict.fromkeys(pairs, float(scale))
    dtype = next(iter(weights.values())).dtype
    if dtype.itemsize < 4 and not all(_is_power_of_two(scales[m]) for m in pairs):
        dtype = torch.float32
    out = {}
    for module, ab in pairs.items():
        out[f"{module}.lora_A.weight"] = ab["A"].to(dtype)
        out[f"{module}.lora_B.weight"] = (ab["B"].double() * scales[module]).to(dtype)  # one rounding
    return out


def _config_json(settings: LoraSettings, **extra) -> str:
    config = settings.to_lora_config(**extra).to_dict()

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


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d tensor in ``dtype`` when it holds ``value`` exactly (kohya writes alphas in the weights'
    dtype), else float32."""
    t = torch.tensor(float(value), dtype=dtype)
    return t if float(t) == float(value) else torch.tensor(float(value), dtype=torch.float32)


def write_lora_file(
    weights: dict[str, torch.Tensor],
    folder: str | Path,
    trained: LoraSettings,
    *,
    baked: bool,
    trained_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` atomically (mode from the umask: 0644).

    ``weights``: official keys, lora_A/lora_B only. ``baked``: they carry the trained scale
    (``bake_alpha``) and the file says scale 1 to every loader (metadata alpha = r, no rsLoRA,
    ``<module>.alpha`` = r). Otherwise (the official trainer's form) the metadata holds the trained
    alpha/rsLoRA, which only loaders reading it apply. ``trained_dtype``: the dtype training used
    (default: the weights')."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {m: ab["A"].shape[0] for m, ab in _pairs(weights).items()}
    dtype = next(iter(weights.values())).dtype
    r = Counter(ranks.values()).most_common(1)[0][0]
    other_ranks = {re.escape(m): k for m, k in ranks.items() if k != r}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    if baked:
        declared = LoraSettings(r=r, alpha=float(r), use_rslora=False, target_modules=list(trained.target_modules),
                                dropout=trained.dropout)
        config = _config_json(declared, rank_pattern=other_ranks, alpha_pattern=other_ranks)
        tensors.update({f"{m}.alpha": _scalar(k, dtype) for m, k in ranks.items()})
    else:
        config = _config_json(LoraSettings(r=r, alpha=trained.alpha, use_rslora=trained.use_rslora,
                                           target_modules=list(trained.target_modules), dropout=trained.dropout),
                              rank_pattern=other_ranks)
    ours = {
        "r": trained.r,
        "alpha": trained.alpha,
        "use_rslora": trained.use_rslora,
        "scale": trained.scale,
        "baked": baked,
        "dtype": str(trained_dtype or dtype).removeprefix("torch."),
        "target_modules": list(trained.target_modules),
    }
    metadata = {"format": "pt", "lora_adapter_metadata": config, "aceturbo_lora": json.dumps(ours, sort_keys=True)}
    path = folder / LORA_WEIGHTS_NAME
    with atomic_output(path) as tmp:  # 0644 under umask 022 (save_file alone makes 0600 files)
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def save_lora(
    model: nn.Module,
    folder: str | Path,
    settings: LoraSettings,
    adapter_name: str = "default",
    baked: bool = True,
) -> Path:
    """Save one adapter in the official layout, by default with the trained scale baked in (right
    at strength 1.0 in every loader); returns the file path."""
    state_dict = lora_state_dict(model, adapter_name)
    ranks = {t.shape[0] for k, t in state_dict.items() if ".lora_A." in k}
    if ranks and ranks != {settings.r}:
        raise ConfigError(f"LoRA settings say r={settings.r} but adapter {adapter_name!r} has rank {sorted(ranks)}")
    dtype = next(iter(state_dict.values())).dtype
    if baked:
        state_dict = bake_alpha(state_dict, settings.scale)
    return write_lora_file(state_dict, folder, settings, baked=baked, trained_dtype=dtype)


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


def _official_key(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@dataclass
class LoraInfo:
    """What a LoRA file says about itself: its header and ``.alpha`` scalars (weights not loaded)."""

    file: Path
    stored_keys: dict[str, str]  # official key ("<module>.lora_A.weight") → key as stored
    ranks: dict[str, int]  # module → rank
    dtype: torch.dtype  # of the lora_A/lora_B weights
    alphas: dict[str, float]  # module → its ``.alpha`` tensor (kohya/ComfyUI style)
    config: dict | None  # lora_adapter_metadata
    trained: LoraSettings  # the settings it was trained with, as far as the file tells
    trained_dtype: torch.dtype
    baked: bool  # the trained scale is in lora_B (our checkpoints and exports)
    scales: dict[str, float]  # module → the factor on the stored B·A that gives the trained change
    source: str  # where ``scales`` comes from, in words

    def client_scales(self, client: str) -> dict[str, float]:
        """Module → the factor ``client`` (a key of CLIENTS) applies to the stored B·A at strength 1.0."""
        if client == "ace-step":  # file path: metadata unread, .alpha ignored → alpha = r (STACK 14)
            return dict.fromkeys(self.ranks, 1.0)
        if client == "comfyui":  # metadata unread; .alpha / r, or 1 (STACK 15)
            return {m: self.alphas[m] / r if m in self.alphas else 1.0 for m, r in self.ranks.items()}
        if client == "diffusers":  # folder + weight_name: lora_adapter_metadata, else alpha = r
            return _metadata_scales(self.config, self.ranks) if self.config else dict.fromkeys(self.ranks, 1.0)
        if client == "aceturbo":
            return dict(self.scales)
        raise ValueError(f"unknown LoRA client {client!r}; one of {', '.join(CLIENTS)}")

    def strength(self, client: str) -> float | None:
        """The strength that gives the trained change in ``client``; None when it differs per module."""
        applied = self.client_scales(client)
        values = {round(self.scales[m] / applied[m], 9) for m in self.ranks}
        return values.pop() if len(values) == 1 else None


def _metadata_scales(config: dict, ranks: dict[str, int]) -> dict[str, float]:
    """What a LoraConfig (lora_adapter_metadata) applies per module: alpha/√r or alpha/r, patterns included."""
    from peft.utils.other import get_pattern_key

    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    out = {}
    for module, stored_rank in ranks.items():
        r = rank_pattern.get(get_pattern_key(rank_pattern, module), stored_rank)
        a = alpha_pattern.get(get_pattern_key(alpha_pattern, module), alpha)
        out[module] = a / math.sqrt(r) if rslora else a / r
    return out


def _json_field(metadata: dict, name: str, file: Path) -> dict | None:
    if name not in metadata:
        return None
    try:
        value = json.loads(metadata[name])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"LoRA file '{file}' has unreadable {name} metadata ({exc}); re-export it") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"LoRA file '{file}' has {name} metadata that is not a JSON object; re-export it")
    return value


def _read_header(file: Path):
    """(metadata, official key → stored key, shapes, dtypes, module → .alpha value) of a safetensors file."""
    from safetensors import safe_open

    stored, shapes, dtypes, alphas = {}, {}, {}, {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                name = _official_key(key)
                if match := _KEY.match(name):
                    official = f"{match['module']}.lora_{match['ab']}.weight"
                    tensor_slice = handle.get_slice(key)
                    stored[official] = key
                    shapes[official], dtypes[official] = tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()
                elif match := _ALPHA_KEY.match(name):
                    value = handle.get_tensor(key)
                    if value.numel() != 1:
                        raise CheckpointError(f"LoRA file '{file}': '{key}' holds {value.numel()} numbers, "
                                              "an alpha is one; re-export it")
                    alphas[match["module"]] = float(value.reshape(()))
                else:
                    raise CheckpointError(
                        f"LoRA file '{file}' has a key '{key}' that is not a PEFT LoRA weight "
                        f"(expected '<module>.lora_A.weight' / '.lora_B.weight' / '.alpha'); convert it to the "
                        f"official layout"
                    )
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"LoRA file '{file}' is not a readable safetensors file ({reason}); "
                              "re-export it") from None
    return metadata, stored, shapes, dtypes, alphas


def _check_weights(file: Path, shapes: dict, dtypes: dict, alphas: dict) -> tuple[dict[str, int], torch.dtype]:
    """Module → rank and the one dtype of a file's lora_A/lora_B; CheckpointError naming what is wrong."""
    if not shapes:
        raise CheckpointError(f"LoRA file '{file}' holds no LoRA weights (no '<module>.lora_A.weight' keys)")
    pairs: dict[str, dict[str, tuple]] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key)
        pairs.setdefault(match["module"], {})[match["ab"]] = shape
    ranks = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"LoRA file '{file}' has no {missing} for '{module}'; re-export it")
        # Linear: A [r, in], B [out, r]; Conv1d (a ConvLayer.conv target): A [r, in, k], B [out, r, 1]
        if len(ab["A"]) not in (2, 3) or len(ab["B"]) != len(ab["A"]) or tuple(ab["B"][2:]) not in ((), (1,)):
            raise CheckpointError(f"LoRA file '{file}': '{module}' is not a Linear or Conv1d LoRA "
                                  f"(lora_A {list(ab['A'])}, lora_B {list(ab['B'])}); only those load here")
        if ab["A"][0] != ab["B"][1]:
            raise CheckpointError(f"LoRA file '{file}': '{module}' has rank {ab['A'][0]} in lora_A but {ab['B'][1]} "
                                  f"in lora_B (shapes {list(ab['A'])} and {list(ab['B'])}); the file is damaged")
        ranks[module] = ab["A"][0]
    kinds = sorted(set(dtypes.values()))
    if len(kinds) > 1:
        example = {kind: next(k for k, d in dtypes.items() if d == kind) for kind in kinds}
        found = ", ".join(f"{d} in {k}" for d, k in example.items())
        raise CheckpointError(f"LoRA file '{file}' mixes dtypes ({found}); re-export it with one dtype "
                              "(`aceturbo export-lora`)")
    if kinds[0] not in _DTYPES:
        raise CheckpointError(f"LoRA file '{file}' stores its weights as {kinds[0]}; expected F32, BF16 or F16")
    bad_alphas = sorted(m for m, a in alphas.items() if m not in ranks or not a > 0)
    if bad_alphas:
        raise CheckpointError(f"LoRA file '{file}' has .alpha tensors that are not positive or name no LoRA module "
                              f"({bad_alphas[:3]}); re-export it")
    return ranks, _DTYPES[kinds[0]]


def _trained_settings(file: Path, ours: dict | None, config: dict | None, ranks: dict, alphas: dict) -> LoraSettings:
    """The settings a file was trained with: our aceturbo_lora, else lora_adapter_metadata, else .alpha,
    else alpha = r."""
    common_rank = Counter(ranks.values()).most_common(1)[0][0]
    try:
        if ours:
            return LoraSettings(r=int(ours["r"]), alpha=float(ours["alpha"]), use_rslora=bool(ours["use_rslora"]),
                                target_modules=list(ours["target_modules"]))
        if config:
            targets = config.get("target_modules") or sorted({_short_target(m) for m in ranks})
            return LoraSettings(
                r=int(config.get("r", common_rank)),
                alpha=float(config.get("lora_alpha", config.get("r", 8))),
                use_rslora=bool(config.get("use_rslora", False)),
                target_modules=[targets] if isinstance(targets, str) else sorted(targets),
                dropout=float(config.get("lora_dropout", 0.0) or 0.0),
            )
        alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(common_rank)
        return LoraSettings(r=common_rank, alpha=alpha, use_rslora=False,
                            target_modules=sorted({_short_target(m) for m in ranks}))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"LoRA file '{file}' has metadata that does not describe a LoRA ({exc}); "
                              "re-export it") from None


def inspect_lora(path: str | Path, alpha: float | None = None, use_rslora: bool | None = None) -> LoraInfo:
    """Read what a LoRA (folder or file) says about itself, checking it is a well-formed LoRA.

    The scale ``load_lora`` applies, first match wins: ``alpha``/``use_rslora`` when given (the
    trained values of a file that lacks them; a ConfigError for a file that records its own); our
    baked file (1); ``.alpha`` tensors (alpha/r per module, the kohya/ComfyUI rule); ``lora_adapter_metadata`` (alpha/√r with rsLoRA, else alpha/r);
    nothing (1: alpha = r, what every loader assumes then)."""
    file = _resolve_file(path)
    metadata, stored, shapes, dtypes, alphas = _read_header(file)
    ranks, dtype = _check_weights(file, shapes, dtypes, alphas)
    config = _json_field(metadata, "lora_adapter_metadata", file)
    ours = _json_field(metadata, "aceturbo_lora", file)
    trained = _trained_settings(file, ours, config, ranks, alphas)

    baked = bool(ours and ours.get("baked"))
    if alpha is not None or use_rslora is not None:
        if ours or config or alphas:  # the file's own account wins: re-scaling a baked file would bake it twice
            raise ConfigError(f"LoRA file '{file}' records its own scale (metadata or .alpha tensors); "
                              "alpha/rsLoRA overrides (--alpha/--rslora) are only for files without metadata: drop them")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"--alpha must be a finite number > 0, got {alpha!r} (for LoRA file '{file}')")
        trained = replace(trained, alpha=float(alpha) if alpha is not None else trained.alpha,
                          use_rslora=bool(use_rslora) if use_rslora is not None else trained.use_rslora)
        scales = {m: _rank_scale(trained.alpha, r, trained.use_rslora) for m, r in ranks.items()}
        source = f"given alpha {trained.alpha:g}" + (", rsLoRA" if trained.use_rslora else "")
    elif baked:
        scales, source = dict.fromkeys(ranks, 1.0), "the trained scale is baked into lora_B"
    elif alphas:
        scales = {m: alphas[m] / r if m in alphas else 1.0 for m, r in ranks.items()}
        source = ".alpha tensors (alpha / r)"
    elif config:
        scales = _metadata_scales(config, ranks)
        source = "lora_adapter_metadata (" + ("alpha / sqrt(r), rsLoRA)" if config.get("use_rslora") else "alpha / r)")
    else:
        scales, source = dict.fromkeys(ranks, 1.0), "no alpha in the file: alpha = r assumed"
    trained_dtype = getattr(torch, str((ours or {}).get("dtype")), None)  # ours record it; else as stored
    if not isinstance(trained_dtype, torch.dtype):
        trained_dtype = dtype
    return LoraInfo(file=file, stored_keys=stored, ranks=ranks, dtype=dtype, alphas=alphas, config=config,
                    trained=trained, trained_dtype=trained_dtype, baked=baked, scales=scales, source=source)


def read_lora_file(
    path: str | Path, alpha: float | None = None, use_rslora: bool | None = None
) -> tuple[dict[str, torch.Tensor], LoraInfo]:
    """A LoRA (folder or file) → (its lora_A/lora_B weights under official keys, ``inspect_lora``'s
    account of it). ``alpha``/``use_rslora``: the trained values, for files that lack them."""
    from safetensors import safe_open

    info = inspect_lora(path, alpha=alpha, use_rslora=use_rslora)
    with safe_open(str(info.file), framework="pt") as handle:
        weights = {official: handle.get_tensor(key) for official, key in info.stored_keys.items()}
    return weights, info


def convert_weights(weights: dict[str, torch.Tensor], info: LoraInfo, *, baked: bool) -> dict[str, torch.Tensor]:
    """A file's weights (``read_lora_file``) in the form to write with ``write_lora_file(..., baked=baked)``:
    baked (``info.scales`` moved into lora_B) or as trained (the official trainer's form). Unbaking
    divides lora_B by the trained scale: exact for power-of-two scales and for 16-bit training baked
    into float32, else within one rounding (resume and a checkpoint's official export use
    training_state.pt, never this)."""
    if baked:
        return weights if info.baked else bake_alpha(weights, info.scales)
    trained = info.trained
    if info.baked:
        out = {}
        for module, ab in _pairs(weights).items():
            out[f"{module}.lora_A.weight"] = ab["A"].to(info.trained_dtype)
            out[f"{module}.lora_B.weight"] = (ab["B"].double() / trained.scale).to(info.trained_dtype)
        return out
    uneven = [m for m, r in info.ranks.items()
              if not math.isclose(info.scales[m], _rank_scale(trained.alpha, r, trained.use_rslora), rel_tol=1e-6)]
    if uneven:
        raise CheckpointError(f"LoRA file '{info.file}' scales '{uneven[0]}' differently from alpha "
                              f"{trained.alpha:g} ({info.source}); one alpha cannot describe it: export it baked")
    return weights


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
    """Load a LoRA (folder or file) as a frozen adapter that applies ``weight`` × the trained change.

    Any kind of file (``inspect_lora``): ours baked or not, ``.alpha`` (kohya/ComfyUI) files,
    diffusers and official-trainer files; ``alpha``/``use_rslora`` give the trained values of a file
    that lacks them. Replaces a previous adapter of the same name. Returns the trained settings (their
    ``scale`` × ``weight`` is the strength applied to the trained factors)."""
    weights, info = read_lora_file(path, alpha=alpha, use_rslora=use_rslora)
    attach_lora(model, weights, info, weight=weight, adapter_name=adapter_name)
    return info.trained


def attach_lora(model: nn.Module, weights: dict[str, torch.Tensor], info: LoraInfo, weight: float = 1.0,
                adapter_name: str = "ace_step_lora") -> None:
    """``load_lora`` for a file already read with ``read_lora_file`` (its weights and its account)."""
    file, modules = info.file, _pairs(weights)
    remove_lora(model, adapter_name)
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise CheckpointError(
            f"LoRA file '{file}' does not fit this model: no module {missing[0]!r} "
            f"({len(missing)} of {len(modules)} unknown); was it trained for another model?"
        )
    # Wrap exactly the modules the file names (full paths), with per-module ranks from the shapes.
    rank_pattern = {re.escape(m): r for m, r in info.ranks.items() if r != info.trained.r}
    try:
        model.add_adapter(
            info.trained.to_lora_config(target_modules=sorted(modules), rank_pattern=rank_pattern),
            adapter_name=adapter_name,
        )
    except ValueError as exc:
        raise CheckpointError(f"LoRA file '{file}' does not fit this model ({exc})") from exc
    # The file's precision or the model's, whichever is finer: a float32 (baked, odd-scale) file
    # keeps its float32 on a bf16 model; peft casts activations to the adapter's dtype and back.
    _cast_adapter(model, adapter_name, None, at_least=info.dtype)

    with torch.no_grad():
        for name, module in _lora_layers(model, adapter_name):
            for ab, holder in (("A", module.lora_A[adapter_name]), ("B", module.lora_B[adapter_name])):
                source = modules[name][ab]
                if tuple(source.shape) != tuple(holder.weight.shape):
                    remove_lora(model, adapter_name)
                    raise CheckpointError(
                        f"LoRA file '{file}': {name}.lora_{ab}.weight has shape {tuple(source.shape)}, "
                        f"the model needs {tuple(holder.weight.shape)}; was it trained for another model?"
                    )
                holder.weight.copy_(source.to(holder.weight.dtype))
            # Set the scale explicitly (not via peft's set_scale, whose rsLoRA handling changed
            # across versions): weight × the factor this file's B·A needs (1 when baked).
            module.scaling[adapter_name] = weight * info.scales[name]
    model.set_adapter(adapter_name)
    # peft's set_adapter marks the active adapter trainable; a loaded LoRA is for inference.
    for p in lora_parameters(model, adapter_name):
        p.requires_grad_(False)
