"""Training-side checks on the tiny model: bf16 forward+backward with LoRA and gradient
checkpointing (CPU), and checkpointing that changes nothing but memory."""
from __future__ import annotations

import pytest
import torch

from pipeline.lora import LoraSettings, apply_lora, lora_parameters
from pipeline.models.transformer import ACEStepTransformer2DModel
from pipeline.tiny.transformer import save_tiny_transformer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_transformer(tmp_path_factory.mktemp("tiny") / "ace_step_transformer", seed=0)


def _batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 12
    return dict(
        hidden_states=torch.randn(b, 8, 16, t, generator=g).to(dtype),
        attention_mask=torch.ones(b, t, dtype=dtype),
        encoder_text_hidden_states=torch.randn(b, 5, 12, generator=g).to(dtype),
        text_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=dtype),
        speaker_embeds=torch.randn(b, 8, generator=g).to(dtype),  # non-zero: its LoRA must learn too
        lyric_token_idx=torch.randint(0, 40, (b, 7), generator=g),
        lyric_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
        timestep=torch.tensor([250.0, 900.0], dtype=dtype),
        ssl_hidden_states=[
            [torch.randn(40, 24, generator=g).to(dtype), torch.randn(33, 24, generator=g).to(dtype)],
            [torch.randn(26, 20, generator=g).to(dtype), torch.randn(22, 20, generator=g).to(dtype)],
        ],
    )


def _lora_model(folder, dtype, checkpointing):
    model = ACEStepTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
    if checkpointing:
        model.enable_gradient_checkpointing()
    apply_lora(model, LoraSettings(r=4, alpha=8.0))
    # B starts at zero; make it non-zero so gradients reach A as well.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    return model.train()


def _loss(model, batch):
    out = model(**batch)
    return out.sample.float().pow(2).mean() + sum(loss for _, loss in out.proj_losses)


def test_bf16_forward_backward_with_lora_and_checkpointing(tiny):
    model = _lora_model(tiny, torch.bfloat16, checkpointing=True)
    calls = []
    for module in (model, model.lyric_encoder):
        inner = module._gradient_checkpointing_func
        module._gradient_checkpointing_func = lambda m, *a, _inner=inner: (calls.append(type(m).__name__), _inner(m, *a))[1]
    loss = _loss(model, _batch(torch.bfloat16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert "LinearTransformerBlock" in calls and "ConformerEncoderLayer" in calls

    params = lora_parameters(model)
    assert params and all(p.dtype == torch.bfloat16 for p in params)  # STACK pitfall 5
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(params)
    for p in params:
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
    assert all(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for checkpointing in (False, True):
        model = _lora_model(tiny, torch.float32, checkpointing)
        torch.manual_seed(123)  # same dropout masks in the lyric encoder
        _loss(model, _batch(torch.float32)).backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
def test_cuda_bf16_matches_cpu_fp32(tiny):
    """No hard-coded device: the same model on CUDA in bf16 stays close to CPU fp32 and trains."""
    cpu = ACEStepTransformer2DModel.from_pretrained(tiny).eval()
    batch = _batch(torch.float32)
    with torch.no_grad():
        ref = cpu(**batch).sample
    gpu = _lora_model(tiny, torch.bfloat16, checkpointing=True).to("cuda")
    moved = {k: v.to("cuda") if torch.is_tensor(v) else [[t.to("cuda", torch.bfloat16) for t in s] for s in v]
             for k, v in batch.items()}
    moved = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in moved.items()}
    loss = _loss(gpu, moved)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in lora_parameters(gpu))
    gpu.disable_adapters()
    with torch.no_grad():
        out = gpu.eval()(**moved).sample.float().cpu()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 0.05
