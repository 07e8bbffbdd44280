"""DDP: `torchrun --nproc_per_node 2` on CPU (gloo). Both ranks end with the same LoRA although they
see different batches (gradients are averaged), only rank 0 writes files, and a validation run on
rank 0 alone (a new best to save, an early stop) moves every rank the same way."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.train_state import checkpoint_lora_weights, list_checkpoints
from test_train import tiny_transformer_dir  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from pipeline import distributed
    from pipeline.train import load_transformer_for_training, train
    from pipeline.lora import lora_state_dict
    from test_train import SyntheticSource, tiny_config

    tiny_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    info = distributed.init("cpu")
    assert info.world_size == 2 and torch.distributed.get_backend() == "gloo"
    import pipeline.train as train_module
    from pipeline.validation import ValidationSet

    config = tiny_config(max_steps=5, save_every=2, keep_last=0, val_every=1, early_stop_patience=1)
    model = load_transformer_for_training(tiny_dir, config, "cpu")
    if info.rank == 1:  # a different init on rank 1: DDP must broadcast rank 0's
        with torch.no_grad():
            for p in lora_state_dict(model).values():
                p.add_(1.0)
    # validation on rank 0 only (the stage builds it there): a new best at steps 1 and 2, none at 3,
    # so every rank saves at step 1 and stops after step 3 (patience 1)
    curve = iter([1.0, 0.5, 0.9])
    train_module.validation_loss = lambda *a: {"val_loss": next(curve), "val_denoise_loss": 0.0}
    validation = ValidationSet(items=[], held_out=True) if info.rank == 0 else None
    # each rank gets its own data, like the cache loader's split by node
    summary = train(config, model, SyntheticSource(n=4, seed=10 + info.rank), out / f"run{info.rank}",
                    validation=validation)
    assert summary["step"] == 3 and summary["stopped"] == ("early stop" if info.rank == 0 else "stopped by another rank")
    weights = {k: p.contiguous() for k, p in lora_state_dict(model).items()}
    save_file(weights, str(out / f"final_rank{info.rank}.safetensors"))
    print("rank", info.rank, "summary", summary, flush=True)
    distributed.cleanup()
    """
)


def test_ddp_two_cpu_processes(tiny_transformer_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tiny_transformer_dir), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    r0 = load_file(str(tmp_path / "final_rank0.safetensors"))
    r1 = load_file(str(tmp_path / "final_rank1.safetensors"))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged: gradients not synchronised"

    # only rank 0 wrote: its run folder is complete, rank 1's does not exist
    run0 = tmp_path / "run0"
    assert [p.name for p in list_checkpoints(run0)] == ["epoch=0-step=1_lora", "epoch=0-step=2_lora",
                                                        "epoch=0-step=3_lora"]
    assert (run0 / "best.json").is_file()
    assert (run0 / "metrics.jsonl").is_file() and (run0 / "loss.png").is_file()
    assert not (tmp_path / "run1").exists()
    saved = checkpoint_lora_weights(run0 / "checkpoints" / "epoch=0-step=3_lora")  # unbaked, as trained
    assert saved.keys() == r0.keys() and all(torch.equal(saved[k], r0[k]) for k in saved)
