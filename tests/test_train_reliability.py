"""Training runs under concurrency and faults (issue #12, run side): a second writer while a run
holds its lock, failed starts over a finished run, a full disk during torch.save / metrics / loss.png,
running out of memory, kills during a plot, a prune or a re-save, and the fsyncs that publish a
checkpoint. Each test first reproduces the failure the old code had.

The other process is real (a python holding the run lock, or a training killed with SIGKILL at a
chosen call); the full disk is the kernel's ENOSPC (/dev/full, or a small tmpfs where one can be
mounted) with the free space the trainer checks afterwards patched to match. (/dev/full is only ever
opened for writing: a writer that replaces its target by a rename, as safetensors does, would turn
the device into a plain file when run as root.)
"""
from __future__ import annotations

import collections
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.locks import held_run_locks, run_lock_path
from pipeline.metrics import read_metrics
from pipeline.train_state import LORA_FILE, STATE_FILE, clean_leftovers, list_checkpoints
from test_train import SyntheticSource, one_thread, project, tiny_config, tiny_transformer_dir  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextmanager
def lock_holder(run_dir: Path):
    """A real second process that holds the run lock of ``run_dir`` until the block ends."""
    code = ("import sys, time\nfrom pipeline.locks import run_lock\n"
            f"run_lock({str(run_dir)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _run(params, *args):
    """`aceturbo train --params P ARGS` in this process; its exit status."""
    from stages.cli import main

    try:
        main(["train", "--params", str(params), "--no-gradient-checkpointing", *args])
        return 0
    except SystemExit as exc:
        return exc.code


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------ item 2: one writer per run folder
def test_a_second_writer_is_refused_while_a_run_holds_the_folder(project, capsys):
    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert _run(params, "--max-steps", "2") == 0
    before = _tree(run)
    with lock_holder(run) as other:
        for extra in ([], ["--resume", "latest"], ["--resume", "auto"]):
            capsys.readouterr()
            assert _run(params, "--max-steps", "4", *extra) == 1
            line = _one_error_line(capsys.readouterr().err)
            assert "experiment 'cli'" in line and f"in use by pid {other.pid} on host " in line
        assert _tree(run) == before  # nothing moved aside, pruned or written
        assert not list(run.parent.glob("cli.*"))
    # the holder died (kill -9): its lock is taken over, with a note, and training continues
    assert _run(params, "--max-steps", "4", "--resume", "latest") == 0
    assert f"took over the lock of experiment 'cli' ({run}) from pid {other.pid} on host " in capsys.readouterr().err
    assert list_checkpoints(run)[-1].name.endswith("step=4_lora")
    assert not run_lock_path(run).exists()  # released at the end


def test_the_lock_is_held_for_the_whole_training(project, monkeypatch):
    from pipeline import train as train_module

    root, params = project
    exps = root / "workspace" / "exps" / "logs"
    real_step, seen = train_module.train_step, []

    def step(*args, **kwargs):
        seen.append({name: owner.pid for name, owner in held_run_locks(exps).items()})
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step)
    assert _run(params, "--max-steps", "3") == 0
    assert seen == [{"cli": os.getpid()}] * 3
    assert held_run_locks(exps) == {}


def test_a_dead_owner_on_this_host_is_taken_over_and_a_recycled_pid_is_not_alive(tmp_path):
    from pipeline.locks import Owner, holder, run_lock

    run = tmp_path / "exp"
    proc = subprocess.run([sys.executable, "-c", "import os\nfrom pipeline.locks import run_lock\n"
                           f"run_lock({str(run)!r}).acquire()\nos.kill(os.getpid(), 9)\n"], env=_env())
    assert proc.returncode == -signal.SIGKILL and run_lock_path(run).exists()
    assert holder(run_lock_path(run)) is None  # the kernel dropped the dead owner's flock
    with run_lock(run) as lock:
        assert lock.took_over is not None and lock.took_over.pid != os.getpid()
        assert holder(run_lock_path(run)).pid == os.getpid()
    me = Owner.me()
    assert me.alive() and not Owner(**{**me.__dict__, "ticks": (me.ticks or 0) + 1}).alive()
    assert Owner(**{**me.__dict__, "host": "elsewhere"}).alive()  # another host: never assumed dead


def test_a_lock_kept_by_the_workers_of_a_dead_owner_says_so(tmp_path):
    """kill -9 of a trainer: its forked DataLoader workers hold the flock a few seconds more. A
    restart then is told that, not that the dead pid uses the folder."""
    from pipeline.errors import LockHeldError
    from pipeline.locks import run_lock

    run = tmp_path / "exp"
    code = ("import os, sys, time\nfrom pipeline.locks import run_lock\n"
            f"run_lock({str(run)!r}).acquire()\nchild = os.fork()\n"
            "if child == 0:\n    time.sleep(30)\n    os._exit(0)\n"
            "print(child, flush=True)\nos.kill(os.getpid(), 9)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    assert proc.wait() == -signal.SIGKILL
    proc.stdout.close()
    try:
        with pytest.raises(LockHeldError, match=r"still locked by the exiting child processes \(such as "
                                                rf"DataLoader workers\) of the stopped pid {proc.pid} on host .*retry in a few"):
            run_lock(run).acquire()
    finally:
        os.kill(worker, signal.SIGKILL)
    deadline = time.time() + 10  # the worker is not our child: wait until the kernel drops its flock
    while True:
        try:
            with run_lock(run) as lock:
                assert lock.took_over.pid == proc.pid
            break
        except LockHeldError:
            assert time.time() < deadline
            time.sleep(0.1)


# ------------------------------------------------------------------ item 3: a failed start touches nothing
def _corrupt_transformer(root: Path) -> None:
    weights = root / "ckpt" / "ace_step_transformer" / "diffusion_pytorch_model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)


FAILED_STARTS = {
    "unknown target": (["--target-modules", "to_q,to_qq"], "'to_qq' names no layer"),
    "target is a block": (["--target-modules", "attn"], "a LinearSelfAttention block, not a layer"),
    "rank beyond memory": (["--rank", "100000000"], "'rank' 100000000, 'max_seconds' "),
    "window below one patch": (["--max-seconds", "0.05"], "shorter than one latent patch"),
    "cuda beyond the gpus": (["--device", "cuda:99"], "device 'cuda:99' asked for"),
    "alpha not finite": (["--alpha", "inf"], "'alpha' must be a finite number"),
    "shift not finite": (["--shift", "nan"], "'shift' must be a finite number"),
    "truncated transformer": ([], "diffusion_pytorch_model.safetensors' is truncated ("),
}


def test_a_failed_start_leaves_the_finished_run_untouched(project, capsys):
    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert _run(params, "--max-steps", "2") == 0
    before = _tree(run)
    for name, (args, message) in FAILED_STARTS.items():
        if name == "truncated transformer":
            shutil.copytree(root / "ckpt", root / "ckpt.good")
            _corrupt_transformer(root)
        capsys.readouterr()
        assert _run(params, "--max-steps", "4", *args) == 1, name
        assert message in _one_error_line(capsys.readouterr().err), name
        assert _tree(run) == before and not list(run.parent.glob("cli.*")), name
    shutil.rmtree(root / "ckpt")
    (root / "ckpt.good").rename(root / "ckpt")
    assert _run(params, "--max-steps", "3", "--resume", "latest") == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


def test_a_run_failing_before_its_first_checkpoint_puts_the_previous_run_back(project, monkeypatch, capsys):
    from pipeline import train as train_module

    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert _run(params, "--max-steps", "2") == 0
    before = _tree(run)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                     "capacity of 79.1 GiB of which 1.2 GiB is free.")

    monkeypatch.setattr(train_module, "train_step", out_of_memory)
    capsys.readouterr()
    assert _run(params, "--max-steps", "4", "--learning-rate", "5e-4") == 1  # other settings: a new run
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert line.startswith("Error: out of GPU memory while training (tried to allocate 20.00 GiB): lower "
                           "max_seconds (now 240), batch_size (now 1) or rank (now 4)")
    assert "previous run is back" in err
    assert _tree(run) == before  # the finished run is where it was
    (failed,) = run.parent.glob("cli.failed-*")  # the failed start's files are kept beside it
    assert (failed / "train_config.json").is_file() and not list_checkpoints(failed)
    monkeypatch.undo()
    assert _run(params, "--max-steps", "3", "--resume", "latest") == 0


def test_a_hard_stop_before_the_first_checkpoint_puts_the_previous_run_back(project, monkeypatch, capsys):
    """A second Ctrl-C makes train() return (no exception) without saving: with no checkpoint yet,
    the run it had set aside gets its name back, as after a failure."""
    from pipeline import train as train_module

    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert _run(params, "--max-steps", "2") == 0
    before = _tree(run)

    def hard_stop(config, transformer, batches, run_dir, **kwargs):
        (Path(run_dir) / "train_config.json").write_text(config.to_json())
        return {"run_dir": str(run_dir), "step": 0, "stopped": "interrupted (Ctrl-C)", "checkpoint": None}

    monkeypatch.setattr(train_module, "train", hard_stop)
    capsys.readouterr()
    assert _run(params, "--max-steps", "4", "--learning-rate", "5e-4") == 130  # other settings: a new run
    assert "previous run is back" in capsys.readouterr().err
    assert _tree(run) == before
    (failed,) = run.parent.glob("cli.failed-*")
    assert (failed / "train_config.json").is_file() and not list_checkpoints(failed)


def test_out_of_cpu_memory_while_applying_the_lora_is_one_line(project, monkeypatch, capsys):
    from pipeline import train as train_module

    root, params = project

    def no_memory(*args, **kwargs):  # what torch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 17592186044416 bytes. Error code 12")

    monkeypatch.setattr(train_module, "load_transformer_for_training", no_memory)
    assert _run(params, "--max-steps", "2") == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "Error: out of CPU memory while loading the transformer with its LoRA (tried to allocate "
        "17592186044416 bytes): lower rank (now 4), or use precision bf16-true; no checkpoint of this run was "
        "saved yet.")


@pytest.mark.parametrize("setting, advice", [
    ("auto", ", or set gradient_checkpointing all (now auto), "),
    ("none", ", or set gradient_checkpointing all or auto (now none), "),
    ("2", ", or set gradient_checkpointing all or auto (now 2), "),
    ("all", None),
])
def test_out_of_memory_advice_names_gradient_checkpointing_unless_it_is_all(setting, advice, tmp_path):
    from pipeline.errors import MemoryLimitError
    from pipeline.train_guard import explain_failures

    with pytest.raises(MemoryLimitError) as caught, \
            explain_failures(tiny_config(gradient_checkpointing=setting), tmp_path, "training"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    message = str(caught.value)
    assert message.startswith("out of GPU memory while training (tried to allocate 2.00 GiB): lower max_seconds")
    if advice is None:
        assert "gradient_checkpointing" not in message
    else:
        assert advice in message


def test_out_of_gpu_memory_in_a_step_is_one_line_and_the_process_exits(project, tmp_path):
    """With two DataLoader worker processes alive: the trainer must still exit (status 1)."""
    root, params = project
    script = tmp_path / "oom.py"
    script.write_text(textwrap.dedent(f"""
        import torch
        from pipeline import train as train_module
        from stages.cli import main
        def fail(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        train_module.train_step = fail
        main(["train", "--params", {str(params)!r}, "--max-steps", "2", "--num-workers", "2"])
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=root)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "out of GPU memory while training (tried to allocate 2.00 GiB)" in _one_error_line(done.stderr)


# ------------------------------------------------------------------ item 5: a full disk
Usage = collections.namedtuple("Usage", "total used free")


def _disk_nearly_full(monkeypatch):
    """What shutil.disk_usage says after a write filled the disk (the write itself fails for real)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))


def test_disk_full_during_torch_save_keeps_the_last_checkpoint(project, monkeypatch, capsys):
    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: torch's own writer meets the kernel's ENOSPC
            _disk_nearly_full(monkeypatch)
            return real_save(obj, "/dev/full", *args, **kwargs)  # "inline_container.cc … unexpected pos"
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    capsys.readouterr()
    assert _run(params, "--max-steps", "6") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "disk full while writing" in line and re.search(r"checkpoints/epoch=1-step=4_lora/training_state\.pt \(about [\d.]+ KB needed", line)
    assert "1.0 KB free" in line and "the last good checkpoint epoch=0-step=2_lora is intact" in line
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2_lora"]  # no temp left
    monkeypatch.undo()
    assert _run(params, "--max-steps", "6", "--resume", "latest") == 0


def test_disk_full_while_appending_metrics(project, monkeypatch, capsys):
    from pipeline.metrics import MetricsLogger

    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    real_log = MetricsLogger.log

    def log(self, record):
        if record["step"] == 3:  # the kernel's ENOSPC on the append (the real file object, on /dev/full)
            self._file = open("/dev/full", "ab", buffering=0)
        return real_log(self, record)

    monkeypatch.setattr(MetricsLogger, "log", log)
    capsys.readouterr()
    assert _run(params, "--max-steps", "6") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"disk full while writing {run / 'metrics.jsonl'} (about " in line
    assert line.endswith("the last good checkpoint epoch=0-step=2_lora is intact (continue with --resume latest)")
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora"]


def test_disk_full_while_drawing_the_loss_plot(project, monkeypatch, capsys):
    from matplotlib.figure import Figure

    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"

    def savefig(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    capsys.readouterr()
    assert _run(params, "--max-steps", "6", "--log-plot-every", "3") == 1
    line = _one_error_line(capsys.readouterr().err)
    # loss.png is drawn off the training thread: its error surfaces at the next drawing, after the
    # checkpoint that follows it, and names the last checkpoint then
    assert f"disk full while writing {run / 'loss.png'}" in line
    assert re.search(r"the last good checkpoint epoch=\d+-step=\d+_lora is intact", line), line
    assert not [p for p in run.iterdir() if p.name.startswith(".loss")]


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    import tempfile

    with tempfile.TemporaryDirectory() as where:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                               capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -rm` to mount a small tmpfs (user namespaces)")
def test_a_real_full_tmpfs_during_the_state_file(project, tmp_path):
    """The run folder on a 2 MB tmpfs; after the first checkpoint the disk is filled up to a little more
    than a LoRA file, so the next checkpoint's torch.save meets the kernel's ENOSPC."""
    root, params = project
    runs = tmp_path / "runs"
    runs.mkdir()
    text = params.read_text().replace(str(root / "workspace" / "exps" / "logs"), str(runs))
    params.write_text(text)
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(f"""
        import os, shutil
        from pathlib import Path
        from pipeline import train as train_module
        from stages.cli import main
        real_step, runs = train_module.train_step, Path({str(runs)!r})
        def step(*a, **k):
            lora = sorted(runs.glob("cli/checkpoints/*/pytorch_lora_weights.safetensors"))
            if lora and not (runs / "filler").exists():
                room = lora[0].stat().st_size + 16384
                with open(runs / "filler", "wb") as f:
                    f.write(b"\\0" * max(0, shutil.disk_usage(runs).free - room))
            return real_step(*a, **k)
        train_module.train_step = step
        main(["train", "--params", {str(params)!r}, "--max-steps", "6", "--log-plot-every", "0",
              "--no-gradient-checkpointing"])
    """))
    done = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=2m tmpfs {runs} && "
                           f"{sys.executable} {script}"], capture_output=True, text=True, timeout=120, env=_env(),
                          cwd=root)
    assert done.returncode == 1, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert "disk full while writing" in line and "epoch=1-step=4_lora/training_state.pt (about " in line, line
    assert line.endswith("the last good checkpoint epoch=0-step=2_lora is intact (continue with --resume latest)")


# ------------------------------------------------------------------ item 6: memory and device errors
def test_rank_against_the_layers_and_the_free_memory(tiny_transformer_dir):
    from pipeline.errors import MemoryLimitError
    from pipeline.train_guard import check_lora_targets, check_memory, lora_target_layers, meta_transformer, \
        transformer_config

    model_config = transformer_config(Path(tiny_transformer_dir))
    model = meta_transformer(model_config)
    config = tiny_config(rank=16)
    layers = lora_target_layers(model, config.target_modules)
    with pytest.warns(UserWarning, match=r"rank 16 is more than 1 of the 23 target layers can use \(e\.g\. "
                                         r"speaker_embedder: 8→32, at most 8\)"):
        check_lora_targets(config, layers)  # allowed: the demo trains the presets' ranks on the tiny model
    gpu = torch.device("cuda", 0)
    check_memory(config, model_config, gpu, free=10**9)
    # the memory model's estimate (LoRA, its gradients and AdamW state, activations), and a rank that fits
    with pytest.raises(MemoryLimitError, match=r"'rank' 1000000, 'max_seconds' 240 and 'batch_size' 1 need about "
                                               r"82\.\d\d GiB \(weights 0\.00, LoRA \+ gradients \+ AdamW 21\.\d\d, "
                                               r"activations 60\.\d\d, .* but cuda:0 has 7\.45 GiB free; .*"
                                               r"lower rank to 90\d\d\d or less \(now 1000000\)\.$"):
        check_memory(tiny_config(rank=1_000_000), model_config, gpu, free=8 * 10**9)
    with pytest.raises(MemoryLimitError, match="the transformer alone does not fit"):
        check_memory(config, model_config, gpu, free=10**6)  # its fp32 weights are 1.7 MB


@pytest.mark.parametrize("targets", [["to_q", "add_k_proj"], ["cross_attn.add_q_proj"], ["to_add_out"]])
def test_preflight_refuses_lora_targets_the_training_step_never_uses(tiny_transformer_dir, targets):
    """The cross-attention's add_* projections are not loaded for training: beside other targets
    peft would skip them silently, alone the load would fail after the folder was set aside."""
    from pipeline.train_guard import preflight

    preflight(tiny_config(target_modules=["to_q"]), Path(tiny_transformer_dir), torch.device("cpu"))
    with pytest.raises(ConfigError, match=rf"'{targets[-1]}' names a cross-attention projection the training step "
                                          r"never uses .*drop it"):
        preflight(tiny_config(target_modules=targets), Path(tiny_transformer_dir), torch.device("cpu"))


@pytest.mark.parametrize("target, kind", [("lyric_embs", "Embedding"), ("depth_conv.conv", "grouped \\(depthwise\\) Conv1d"),
                                          ("early_conv_layers.0", "Conv2d")])
def test_preflight_refuses_layers_whose_lora_is_not_trained_or_loaded(tiny_transformer_dir, target, kind):
    """peft wraps Embedding, grouped Conv1d and Conv2d layers too, but an Embedding's LoRA is neither
    trained nor saved here, a grouped conv needs a rank its groups divide, and such files load
    nowhere: refused before anything is touched. An ungrouped Conv1d is fine."""
    from pipeline.train_guard import preflight

    preflight(tiny_config(target_modules=["inverted_conv.conv"]), Path(tiny_transformer_dir), torch.device("cpu"))
    with pytest.raises(ConfigError, match=rf"'{target}' names .*, a {kind} layer; LoRA here adapts Linear layers and "
                                          r"ungrouped Conv1d layers only: drop it\.$"):
        preflight(tiny_config(target_modules=["to_q", target]), Path(tiny_transformer_dir), torch.device("cpu"))


def test_cuda_without_a_gpu_or_beyond_the_count(monkeypatch):
    from pipeline.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device 'cuda' asked for, but CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:2' asked for, but this machine has 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


# ------------------------------------------------------------------ item 7: what a kill leaves behind
def _killed(code: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]


def test_a_kill_while_drawing_loss_png_leaves_a_temp_that_the_next_start_removes(project, capsys):
    root, params = project
    run = root / "workspace" / "exps" / "logs" / "cli"
    assert _run(params, "--max-steps", "2") == 0
    _killed(f"""
        import os
        from matplotlib.figure import Figure
        from pipeline.metrics import plot_loss
        def killed(self, path, **kw):
            open(path, "wb").write(b"half a png")
            os.kill(os.getpid(), 9)
        Figure.savefig = killed
        plot_loss([{{"step": 1, "loss": 1.0, "lr": 0.1}}], {str(run / 'loss.png')!r})
    """, root)
    (temp,) = run.glob(".loss.png.*.tmp")
    capsys.readouterr()
    assert _run(params, "--max-steps", "3", "--resume", "latest") == 0
    assert f"removed {temp.name} (temp file of an interrupted write)" in capsys.readouterr().err
    assert not list(run.glob(".*.tmp"))


PRUNE_KILL = """
    import os, shutil
    from pathlib import Path
    from pipeline.train import load_transformer_for_training, train
    from test_train import SyntheticSource, tiny_config
    real_rmtree = shutil.rmtree
    def killed(path, *a, **k):
        Path(path, "pytorch_lora_weights.safetensors").unlink()  # half deleted...
        os.kill(os.getpid(), 9)                                  # ...when the kill comes
    shutil.rmtree = killed
    config = tiny_config(max_steps=4, save_every=1, keep_last=1, log_plot_every=0)
    train(config, load_transformer_for_training({tiny!r}, config, "cpu"), SyntheticSource(), {run!r})
"""


def test_a_kill_during_pruning_never_leaves_half_a_checkpoint_under_its_name(tiny_transformer_dir, tmp_path):
    run = tmp_path / "run"
    _killed(PRUNE_KILL.format(tiny=str(tiny_transformer_dir), run=str(run)), tmp_path)
    folders = sorted(p.name for p in (run / "checkpoints").iterdir())
    # killed inside the delete of step 1: the old code left epoch=0-step=1_lora holding only its state
    assert [n for n in folders if not n.startswith(".")] == ["epoch=0-step=2_lora"]
    assert (run / "checkpoints" / "epoch=0-step=2_lora" / LORA_FILE).is_file()
    (trash,) = [n for n in folders if n.startswith(".")]
    assert trash.startswith(".trash-epoch=0-step=1_lora")
    assert "removed " + trash + " (left by an interrupted save or prune)" in clean_leftovers(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch=0-step=2_lora"]


def test_leftovers_of_killed_saves_and_prunes_are_cleared_at_start(tmp_path):
    """What older versions or a kill leave in checkpoints/: a half folder under an official name,
    hidden temp/trash folders, an .old copy whose re-save was cut short (put back, not deleted)."""
    ckpts = tmp_path / "run" / "checkpoints"

    def folder(name, files=(LORA_FILE, STATE_FILE)):
        (ckpts / name).mkdir(parents=True)
        for f in files:
            (ckpts / name / f).write_bytes(b"x")

    folder("epoch=0-step=2_lora")
    folder("epoch=0-step=3_lora", files=(STATE_FILE,))  # a kill inside an old-style rmtree
    folder("epoch=0-step=4_lora", files=(LORA_FILE,))  # a LoRA whose state the user deleted: kept
    folder(".tmp-epoch=0-step=5_lora-abc", files=(LORA_FILE,))
    folder(".trash-epoch=0-step=1_lora-xyz", files=(STATE_FILE,))
    folder(".old-epoch=0-step=6_lora-1234")  # re-save of step 6 killed between its two renames
    (tmp_path / "run" / ".metrics.jsonl.q1w2.tmp").write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["epoch=0-step=2_lora"]
    notes = clean_leftovers(tmp_path / "run")
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=2_lora", "epoch=0-step=4_lora",
                                                       "epoch=0-step=6_lora"]
    assert "put back epoch=0-step=6_lora (a re-save of it was interrupted)" in notes
    assert not (tmp_path / "run" / ".metrics.jsonl.q1w2.tmp").exists()


RESAVE_KILL = """
    import os
    from pipeline import train_state
    from pipeline.train import load_transformer_for_training, train
    from test_train import SyntheticSource, tiny_config
    config = tiny_config(max_steps=2, save_every=0, log_plot_every=0, warmup_steps=0)
    train(config, load_transformer_for_training({tiny!r}, config, "cpu"), SyntheticSource(), {run!r})
    config = tiny_config(max_steps=3, save_every=0, log_plot_every=0, warmup_steps=0)
    def killed(tmp, final):  # the new copy is complete, the old one is set aside: kill
        os.kill(os.getpid(), 9)
    train_state.publish_dir = killed
    # resume and stop at once: the same step is saved again
    def stop(i, batch):
        raise KeyboardInterrupt
    train(config, load_transformer_for_training({tiny!r}, config, "cpu"), SyntheticSource(on_batch=stop), {run!r},
          resume="latest")
"""


def test_a_kill_while_saving_a_step_again_loses_neither_copy(tiny_transformer_dir, tmp_path):
    run = tmp_path / "run"
    _killed(RESAVE_KILL.format(tiny=str(tiny_transformer_dir), run=str(run)), tmp_path)
    assert list_checkpoints(run) == []  # the window: the official name is absent for a moment...
    hidden = sorted(p.name.split("-")[0] for p in (run / "checkpoints").iterdir())
    assert hidden == [".old", ".tmp"]
    clean_leftovers(run)  # ...and the next start puts the old copy back (old code: pruned both)
    assert [p.name for p in list_checkpoints(run)] == ["epoch=0-step=2_lora"]
    config = tiny_config(max_steps=3, save_every=0, log_plot_every=0, warmup_steps=0)
    from pipeline.train import load_transformer_for_training, train

    summary = train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(),
                    run, resume="latest")
    assert summary["step"] == 3


# ------------------------------------------------------------------ item 10: durability
def test_checkpoint_files_and_folders_are_fsynced_before_the_rename(tiny_transformer_dir, tmp_path, monkeypatch):
    from pipeline import fileio
    from pipeline.train import load_transformer_for_training, train

    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "rename", rename)
    config = tiny_config(max_steps=2, save_every=0, log_plot_every=0, warmup_steps=0)
    run = tmp_path / "run"
    train(config, load_transformer_for_training(tiny_transformer_dir, config, "cpu"), SyntheticSource(), run)
    final = run / "checkpoints" / "epoch=0-step=2_lora"
    (publish,) = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    tmp = Path(events[publish][1])
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {str(tmp / LORA_FILE), str(tmp / STATE_FILE), str(tmp)} <= synced_before
    assert str(run / "metrics.jsonl") in synced_before  # metrics on disk up to the checkpoint's step
    assert ("fsync", str(run / "checkpoints")) in events[publish:]  # the rename itself is flushed
