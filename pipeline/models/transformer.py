"""ACE-Step v1 transformer (spec §2): conditioning encoder + linear-attention DiT + SSL heads.

Loads the released ``ace_step_transformer/`` folder with ``from_pretrained`` (diffusers ModelMixin);
every parameter name matches the checkpoint (``spec/keys/ace_step_transformer.tsv``) so real weights
and official LoRA files load both ways. ``forward`` = ``encode`` (speaker, text, lyrics → one
conditioning sequence) + ``decode`` (the denoiser); the sampler calls them separately so the
conditioning is computed once per generation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from pipeline.checkpoints import require_model_dir
from pipeline.models.attention import rope_tables
from pipeline.models.blocks import FinalLayer, LinearTransformerBlock, PatchEmbed
from pipeline.models.lyric_encoder import ConformerEncoder

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class ACEStepTransformerOutput(BaseOutput):
    """``sample``: predicted velocity [B, C, 16, T]; ``proj_losses``: [(ssl_name, loss), ...]."""

    sample: torch.Tensor
    proj_losses: list[tuple[str, torch.Tensor]] | None = None


def cross_norm(hidden_states: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Re-standardise a ControlNet residual to the mean/std of the hidden states (spec §2.4 step 4)."""
    mean_h, std_h = hidden_states.mean(dim=(1, 2), keepdim=True), hidden_states.std(dim=(1, 2), keepdim=True)
    mean_c, std_c = control.mean(dim=(1, 2), keepdim=True), control.std(dim=(1, 2), keepdim=True)
    return (control - mean_c) * (std_h / (std_c + 1e-12)) + mean_h


def _ssl_projector(dim: int, hidden: int, out: int) -> nn.Sequential:
    # Indices 0, 2, 4 carry the weights ("projectors.N.{0,2,4}").
    return nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))


class ACEStepTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    _supports_gradient_checkpointing = True
    # diffusers' compile_repeated_blocks() compiles these (regional compilation): one graph serves
    # all 24 DiT blocks, instead of one graph for the whole model.
    _repeated_blocks = ["LinearTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        num_layers: int = 28,
        inner_dim: int = 1536,  # ignored: the width is heads × head_dim (kept so the config round-trips)
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        mlp_ratio: float = 4.0,
        out_channels: int = 8,
        max_position: int = 32768,
        rope_theta: float = 1000000.0,
        speaker_embedding_dim: int = 512,
        text_embedding_dim: int = 768,
        ssl_encoder_depths: Sequence[int] = (9, 9),
        ssl_names: Sequence[str] = ("mert", "m-hubert"),
        ssl_latent_dims: Sequence[int] = (1024, 768),
        lyric_encoder_vocab_size: int = 6681,
        lyric_hidden_size: int = 1024,
        patch_size: Sequence[int] = (16, 1),
        max_height: int = 16,
        max_width: int = 4096,
        # Not in the released config (the sizes are fixed in the upstream code); the defaults are the
        # released values, so the real config.json loads unchanged.
        lyric_encoder_output_size: int = 1024,
        lyric_encoder_attention_heads: int = 16,
        lyric_encoder_linear_units: int = 4096,
        lyric_encoder_num_blocks: int = 6,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.dim = dim
        self.num_heads = num_attention_heads
        self.head_dim = attention_head_dim
        self.rope_theta = rope_theta
        self.ssl_encoder_depths = list(ssl_encoder_depths)
        self.ssl_names = list(ssl_names)

        # Registration order = the checkpoint's state-dict order.
        self.transformer_blocks = nn.ModuleList(
            LinearTransformerBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)
        )
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

        self.speaker_embedder = nn.Linear(speaker_embedding_dim, dim)
        self.genre_embedder = nn.Linear(text_embedding_dim, dim)
        self.lyric_embs = nn.Embedding(lyric_encoder_vocab_size, lyric_hidden_size)
        self.lyric_encoder = ConformerEncoder(
            input_size=lyric_hidden_size,
            output_size=lyric_encoder_output_size,
            attention_heads=lyric_encoder_attention_heads,
            linear_units=lyric_encoder_linear_units,
            num_blocks=lyric_encoder_num_blocks,
        )
        self.lyric_proj = nn.Linear(lyric_encoder_output_size, dim)

        self.projectors = nn.ModuleList(_ssl_projector(dim, 2 * dim, d) for d in ssl_latent_dims)
        self.cosine_loss = nn.CosineEmbeddingLoss(margin=0.0, reduction="mean")

        self.proj_in = PatchEmbed(in_channels, dim, tuple(patch_size))
        self.final_layer = FinalLayer(dim, tuple(patch_size), out_channels)
        self.gradient_checkpointing = False
        self._checkpointed_blocks: frozenset[int] | None = None  # None: every block (diffusers' switch)

    # ------------------------------------------------------------------ gradient checkpointing
    def set_checkpointed_blocks(self, blocks: Iterable[int], lyric_encoder: bool | None = None) -> None:
        """Recompute the activations of these DiT blocks in backward (gradient checkpointing) and keep
        the others'. ``lyric_encoder`` (default: when any block recomputes) does the same for it."""
        blocks = frozenset(blocks)
        lyric_encoder = bool(blocks) if lyric_encoder is None else lyric_encoder
        if blocks or lyric_encoder:
            self.enable_gradient_checkpointing()
        else:
            self.disable_gradient_checkpointing()
        self.lyric_encoder.gradient_checkpointing = lyric_encoder
        self.gradient_checkpointing = bool(blocks)
        self._checkpointed_blocks = None if len(blocks) == len(self.transformer_blocks) else blocks

    @property
    def checkpointed_blocks(self) -> list[int]:
        """The DiT blocks that recompute their activations in backward."""
        if not self.gradient_checkpointing:
            return []
        return sorted(range(len(self.transformer_blocks)) if self._checkpointed_blocks is None
                      else self._checkpointed_blocks)

    def _recomputes(self, index: int) -> bool:
        return self.gradient_checkpointing and (self._checkpointed_blocks is None or index in self._checkpointed_blocks)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs):
        """Load ``<root>/ace_step_transformer`` (a local folder; nothing is ever downloaded)."""
        folder = Path(pretrained_model_name_or_path)
        subfolder = kwargs.get("subfolder")
        where = folder / subfolder if subfolder else folder
        sharded = (where / (WEIGHTS_NAME + ".index.json")).exists()
        require_model_dir(
            where,
            ("config.json",) if sharded else ("config.json", WEIGHTS_NAME),
            "ACE-Step transformer",
            "acestep",
        )
        kwargs.setdefault("local_files_only", True)
        return super().from_pretrained(str(folder), **kwargs)

    # ------------------------------------------------------------------ conditioning
    def forward_lyric_encoder(self, lyric_token_idx: torch.Tensor, lyric_mask: torch.Tensor | None) -> torch.Tensor:
        """Lyric ids [B, L] → Conformer → lyric_proj → [B, L, dim] (lyric_mask None: nothing padded)."""
        embeds = self.lyric_embs(lyric_token_idx)
        encoded, _ = self.lyric_encoder(embeds, lyric_mask)
        return self.lyric_proj(encoded)

    def encode(
        self,
        encoder_text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        speaker_embeds: torch.Tensor,
        lyric_token_idx: torch.Tensor,
        lyric_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditioning sequence [speaker | text | lyrics] and its float mask (1 valid / 0 pad).

        Both masks None (the trainer's signal that no prompt or lyric token is padded): the mask is
        None too, and the cross-attention runs unmasked (flash kernels)."""
        batch = encoder_text_hidden_states.shape[0]
        speaker = self.speaker_embedder(speaker_embeds).unsqueeze(1)
        text = self.genre_embedder(encoder_text_hidden_states)
        lyrics = self.forward_lyric_encoder(lyric_token_idx, lyric_mask)
        hidden = torch.cat([speaker, text, lyrics], dim=1)
        if text_attention_mask is None and lyric_mask is None:
            return hidden, None
        parts = ((None, 1), (text_attention_mask, text.shape[1]), (lyric_mask, lyrics.shape[1]))  # speaker: valid
        mask = torch.cat([torch.ones(batch, n, device=hidden.device) if m is None else m.to(hidden.device, torch.float32)
                          for m, n in parts], dim=1)
        return hidden, mask

    # ------------------------------------------------------------------ denoiser
    def decode(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        ssl_hidden_states: Sequence[Sequence[torch.Tensor] | torch.Tensor | None] | None = None,
        output_length: int | None = None,
        block_controlnet_hidden_states: torch.Tensor | None = None,
        controlnet_scale: float | torch.Tensor = 1.0,
        return_dict: bool = True,
    ):
        """Velocity prediction for latents ``hidden_states`` [B, C, 16, T] at ``timestep`` (= 1000σ)."""
        if output_length is None:
            output_length = hidden_states.shape[-1]
        dtype = hidden_states.dtype
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        embedded_timestep = self.timestep_embedder(self.time_proj(timestep).to(dtype=dtype))
        temb = self.t_block(embedded_timestep)

        hidden_states = self.proj_in(hidden_states)
        if block_controlnet_hidden_states is not None:
            hidden_states = hidden_states + cross_norm(hidden_states, block_controlnet_hidden_states) * controlnet_scale

        device = hidden_states.device
        rope = rope_tables(hidden_states.shape[1], self.head_dim, self.rope_theta, device, dtype)
        rope_cross = rope_tables(encoder_hidden_states.shape[1], self.head_dim, self.rope_theta, device, dtype)

        taps: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.transformer_blocks):
            args = (hidden_states, attention_mask, encoder_hidden_states, encoder_hidden_mask, rope, rope_cross, temb)
            if torch.is_grad_enabled() and self._recomputes(index):
                hidden_states = self._gradient_checkpointing_func(block, *args)
            else:
                hidden_states = block(*args)
            if index in self.ssl_encoder_depths:
                taps[index] = hidden_states

        proj_losses = self._ssl_losses(taps, ssl_hidden_states)
        sample = self.final_layer(hidden_states, embedded_timestep, output_length)
        if not return_dict:
            return sample, proj_losses
        return ACEStepTransformerOutput(sample=sample, proj_losses=proj_losses)

    def _ssl_losses(self, taps, ssl_hidden_states) -> list[tuple[str, torch.Tensor]]:
        """REPA-style alignment (spec §2.9): per sample, project the tapped hidden state, resample it
        linearly to the SSL length, and take mean(1 - cos) per frame; sum over samples / B."""
        losses: list[tuple[str, torch.Tensor]] = []
        if not ssl_hidden_states:
            return losses
        for head, (depth, projector, name, targets) in enumerate(
            zip(self.ssl_encoder_depths, self.projectors, self.ssl_names, ssl_hidden_states)
        ):
            if targets is None or len(targets) == 0 or depth not in taps:
                continue
            predicted = projector(taps[depth])  # [B, T, D]
            batch = predicted.shape[0]
            total = 0.0
            # ``targets`` is a per-sample list of [T_ssl, D] (or a [B, T_ssl, D] tensor, read row by row).
            for z, z_hat in zip(targets, predicted):
                z = z.to(device=z_hat.device)
                z_hat = F.interpolate(
                    z_hat.T.unsqueeze(0), size=z.shape[0], mode="linear", align_corners=False
                ).squeeze(0).T
                # The loss itself in fp32: a bf16 model must not lose the small 1 - cos differences.
                z_hat = F.normalize(z_hat.float(), dim=-1)
                z = F.normalize(z.float(), dim=-1)
                ones = torch.ones(z.shape[0], device=z.device)
                total = total + self.cosine_loss(z, z_hat, ones)
            losses.append((name, total / batch))
        return losses

    # ------------------------------------------------------------------ whole step
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        encoder_text_hidden_states: torch.Tensor,
        text_attention_mask: torch.Tensor | None,
        speaker_embeds: torch.Tensor,
        lyric_token_idx: torch.Tensor,
        lyric_mask: torch.Tensor | None,
        timestep: torch.Tensor,
        ssl_hidden_states=None,
        block_controlnet_hidden_states: torch.Tensor | None = None,
        controlnet_scale: float | torch.Tensor = 1.0,
        return_dict: bool = True,
    ):
        encoder_hidden_states, encoder_hidden_mask = self.encode(
            encoder_text_hidden_states, text_attention_mask, speaker_embeds, lyric_token_idx, lyric_mask
        )
        return self.decode(
            hidden_states,
            attention_mask,
            encoder_hidden_states,
            encoder_hidden_mask,
            timestep,
            ssl_hidden_states=ssl_hidden_states,
            output_length=hidden_states.shape[-1],
            block_controlnet_hidden_states=block_controlnet_hidden_states,
            controlnet_scale=controlnet_scale,
            return_dict=return_dict,
        )
