"""The frozen UMT5 text encoder that turns prompts into the transformer's text conditioning.

ACE-Step v1 conditions on ``last_hidden_state`` of the google/umt5-base encoder stored in the
checkpoint's ``umt5-base/`` folder (spec §1.4, §4.1): tokenizer padding to the longest prompt,
truncation at 256 tokens, attention mask from the tokenizer. Nothing is downloaded: the folder
must exist locally.

``erg_null_encode`` gives the "ERG" null text of the inference pipeline: the same encoding with
the query projections of encoder blocks 8 and 9 scaled by 0.01 (forward hooks), which weakens
the prompt without removing it.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from pipeline.checkpoints import require_model_dir

MAX_TEXT_TOKENS = 256  # tokenizer max_length (spec §4.1)
ERG_BLOCKS = (8, 9)  # encoder blocks whose SelfAttention.q output is scaled for the ERG null text
ERG_SCALE = 0.01
UMT5_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class UMT5TextEncoder:
    """UMT5 encoder + tokenizer, eval mode, no gradients. Keep it on the CPU between uses
    (``offload()``) and move it to the device only while encoding (``to(device)``)."""

    def __init__(self, model, tokenizer, max_length: int = MAX_TEXT_TOKENS):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> "UMT5TextEncoder":
        """Load ``<checkpoint>/umt5-base`` (or the folder itself) from local files only."""
        from transformers import AutoTokenizer, UMT5EncoderModel

        path = Path(path)
        if not (path / "config.json").exists() and (path / "umt5-base").is_dir():
            path = path / "umt5-base"  # the checkpoint root was given
        folder = require_model_dir(path, UMT5_FILES, "UMT5 text encoder (umt5-base)", "acestep")
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = UMT5EncoderModel.from_pretrained(str(folder), local_files_only=True,
                                                 dtype=dtype if dtype is not None else torch.float32)
        encoder = cls(model, tokenizer)
        if device is not None:
            encoder.to(device)
        return encoder

    # -- placement -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @property
    def num_blocks(self) -> int:
        return len(self.model.encoder.block)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "UMT5TextEncoder":
        self.model.to(device=device, dtype=dtype)
        return self

    def offload(self) -> "UMT5TextEncoder":
        """Back to the CPU and free the accelerator memory it held."""
        was_cuda = self.device.type == "cuda"
        self.model.to("cpu")
        if was_cuda:
            torch.cuda.empty_cache()
        return self

    # -- encoding ------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts → (states [B, L, D] in the model dtype, mask [B, L] long); L = longest prompt's
        token count (≤ 256, </s> included)."""
        batch = self.tokenize(prompts)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return states, mask.long()

    @contextmanager
    def _erg_hooks(self):
        # Blocks that do not exist (a model with ≤ 8 blocks, such as the tiny test encoder) get no
        # hook: the ERG null text then equals the plain encoding.
        handles = []
        for index in ERG_BLOCKS:
            if index < self.num_blocks:
                q = self.model.encoder.block[index].layer[0].SelfAttention.q
                handles.append(q.register_forward_hook(lambda _m, _i, out: out * ERG_SCALE))
        try:
            yield len(handles)
        finally:
            for handle in handles:
                handle.remove()

    def erg_null_encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The ERG null text (spec §4.1): `encode` with the SelfAttention.q outputs of encoder
        blocks 8 and 9 multiplied by 0.01 → (states, mask)."""
        with self._erg_hooks():
            return self.encode(prompts)
