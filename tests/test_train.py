"""train.py and sample.py end to end on CPU: learning, exact resume, DDP, compile, and bad input."""

import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import configurator

from conftest import REPO, SAMPLE, TINY, interrupt, one_error_line, run


def train(cwd, *args):
    result = run("train.py", *TINY, *args, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def log(cwd, out_dir):
    return [json.loads(line) for line in open(os.path.join(cwd, out_dir, "log.jsonl"))]


def weights(cwd, out_dir):
    return torch.load(os.path.join(cwd, out_dir, "ckpt.pt"), weights_only=True)["model"]


def unigram_entropy(path):
    counts = np.bincount(np.fromfile(path, dtype="<u2"))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_training_lowers_the_loss(workdir):
    train(workdir, "--max_iters=120", "--eval_interval=60", "--learning_rate=6e-3", "--out_dir=out/learn")
    records = log(workdir, "out/learn")
    evals = [r for r in records if "val_loss" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in evals] == [0, 60, 120]
    assert evals[0]["val_loss"] == pytest.approx(math.log(4096), abs=0.3)  # untrained: uniform over the vocab
    entropy = unigram_entropy(workdir / "data" / "sample" / "train.bin")
    assert json.load(open(workdir / "data" / "sample" / "meta.json"))["unigram_entropy"] == pytest.approx(entropy)
    assert evals[-1]["val_loss"] < entropy - 0.2
    assert evals[-1]["val_bpb"] < evals[0]["val_bpb"] - 0.5
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "ms_per_step", "tokens_per_s", "mfu", "eta_s"} <= set(r)
    ckpt = torch.load(workdir / "out" / "learn" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 120 and ckpt["best_val_loss"] == evals[-1]["val_loss"]
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert ckpt["train_config"]["max_iters"] == 120 and ckpt["model_config"]["d_model"] == 64


def test_resume_gives_identical_weights(workdir):
    train(workdir, "--max_iters=20", "--eval_interval=10", "--out_dir=out/straight")
    train(workdir, "--max_iters=10", "--lr_decay_iters=20", "--eval_interval=10", "--out_dir=out/stopped")
    with open(workdir / "out" / "stopped" / "log.jsonl", "a") as f:  # as if killed after logging past the checkpoint
        f.write(json.dumps({"step": 11, "loss": 9.0}) + "\n" + '{"step": 12, "lo')
    # the saved settings come back: only what changes is given
    result = run("train.py", "--init_from=resume", "--out_dir=out/stopped", "--max_iters=20", cwd=workdir)
    assert result.returncode == 0, result.stderr
    a, b = weights(workdir, "out/straight"), weights(workdir, "out/stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = log(workdir, "out/straight"), log(workdir, "out/stopped")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # nothing logged twice
    assert [r.get("loss") for r in straight] == [r.get("loss") for r in resumed]  # the same batches, in order


def test_resume_refuses_settings_that_change_the_batches(workdir):
    train(workdir, "--max_iters=2", "--eval_interval=2", "--out_dir=out/refusing")
    line = one_error_line(run("train.py", *TINY, "--init_from=resume", "--out_dir=out/refusing", "--max_iters=30", "--seed=7", cwd=workdir))
    assert "seed (1337 -> 7)" in line
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/refusing", "--max_iters=30", "--n_layers=3", cwd=workdir))
    assert "n_layers (2 -> 3)" in line
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/refusing", "--max_iters=30", "--synthetic_data=True",
                              cwd=workdir))
    assert "synthetic_data (False -> True)" in line  # random tokens instead of the bins
    line = one_error_line(run("train.py", *TINY, "--out_dir=out/refusing", cwd=workdir))
    assert "--init_from=resume" in line and "--overwrite=True" in line


@pytest.mark.parametrize("windows", ["random", "story"])
def test_torchrun_two_processes_match_one(workdir, windows):
    # one micro-step of 8 against two ranks of two micro-steps of 2 (only the last one all-reduces), and 3 val windows:
    # one rank gets fewer; story windows: the micro-batches hold different numbers of scored targets
    # float32: bf16 autocast (dtype 'auto' on a CPU with bf16 instructions) rounds the two ways apart by more than the tolerances
    args = ["--max_iters=10", "--eval_interval=10", "--eval_seqs=3", "--dtype=float32", f"--windows={windows}"]
    train(workdir, *args, f"--out_dir=out/single_{windows}")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "train.py"), *TINY, *args, "--batch_size=2", f"--out_dir=out/ddp_{windows}"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr  # torch 2.13 deprecated broadcast_buffers
    single, ddp = log(workdir, f"out/single_{windows}"), log(workdir, f"out/ddp_{windows}")
    assert len(single) == len(ddp)
    for a, b in zip(single, ddp):
        for key in ("loss", "val_loss", "val_bpb", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), key
    a, b = weights(workdir, f"out/single_{windows}"), weights(workdir, f"out/ddp_{windows}")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # Adam magnifies rounding on rare tokens


@pytest.mark.parametrize("windows", ["random", "story"])
def test_gradient_accumulation_matches_one_big_batch(workdir, windows):
    # story windows hold different numbers of scored targets: the step's loss is the mean over all of them, not a
    # mean of the micro-batches' means (which moved the weights by up to 6e-3 here)
    args = ["--max_iters=5", "--eval_interval=5", "--dtype=float32", f"--windows={windows}"]
    train(workdir, *args, f"--out_dir=out/big_{windows}")
    train(workdir, *args, "--batch_size=2", f"--out_dir=out/accum_{windows}")
    a, b = weights(workdir, f"out/big_{windows}"), weights(workdir, f"out/accum_{windows}")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # Adam magnifies rounding on rare tokens
    losses = [[r["loss"] for r in log(workdir, f"out/{run}_{windows}") if "loss" in r] for run in ("big", "accum")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(workdir):
    result = run("train.py", *TINY, "--out_dir=out/diverged", "--max_iters=30", "--eval_interval=10", "--learning_rate=1e6",
                 "--warmup_iters=0", "--grad_clip=0", cwd=workdir)
    line = one_error_line(result)
    assert "training diverged (out/diverged/ckpt.pt keeps step 0); lower --learning_rate=1e+06 or set --grad_clip=1.0" in line
    ckpt = torch.load(workdir / "out" / "diverged" / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 0 and all(torch.isfinite(w).all() for w in ckpt["model"].values())
    result = run("sample.py", "--out_dir=out/diverged", "--max_new_tokens=8", "--num_samples=1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    # with torchrun every rank stops, and each names the checkpoint rank 0 wrote
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "train.py"), *TINY, "--out_dir=out/diverged_ddp", "--max_iters=30",
                             "--eval_interval=10", "--learning_rate=1e6", "--warmup_iters=0", "--grad_clip=0", "--batch_size=4"],
                            cwd=workdir, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "training diverged (out/diverged_ddp/ckpt.pt keeps step 0)" in result.stderr
    assert "no checkpoint was written" not in result.stderr  # torchrun may stop one rank before it prints
    from safetensors.torch import load_file

    # snapshots of the model over training stop with it: none of weights that are not numbers, though the loss is
    # checked at log lines only (every 10 steps here) and snapshots come at steps 0, 1, 2, 4, 8
    result = run("train.py", *TINY, "--out_dir=out/diverged_kept", "--max_iters=30", "--eval_interval=10",
                 "--log_interval=10", "--learning_rate=1e4", "--warmup_iters=0", "--grad_clip=0", "--keep_checkpoints=log",
                 cwd=workdir)
    assert "training diverged" in one_error_line(result)
    snapshots = sorted(os.listdir(workdir / "out" / "diverged_kept" / "checkpoints"))
    assert snapshots and all(torch.isfinite(w).all() for name in snapshots for w in
                             load_file(workdir / "out" / "diverged_kept" / "checkpoints" / name).values())


def test_the_schedule_follows_its_formula_and_stays_at_the_floor_past_lr_decay_iters(workdir):
    def lrs(*args):
        train(workdir, "--max_iters=12", "--eval_interval=12", "--log_interval=1", "--out_dir=out/schedule",
               "--overwrite=True", *args)
        return [json.loads(line)["lr"] for line in open(workdir / "out" / "schedule" / "log.jsonl") if '"lr"' in line]

    cosine = [(s + 1) / 5 if s < 5 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1, (s - 5) / 4))) for s in range(12)]
    assert lrs("--lr_decay_iters=9") == pytest.approx([3e-3 * f for f in cosine])
    # a warmup that ends past lr_decay_iters goes to the floor, not back up to the peak
    assert lrs("--lr_decay_iters=3") == pytest.approx([3e-3 * f for f in [0.2, 0.4, 0.6, 0.8, 1.0] + [0.1] * 7])


def test_an_overwrite_replaces_the_old_run_as_a_whole(workdir, tmp_path):
    old = ["--max_iters=4", "--eval_interval=2", "--keep_checkpoints=log", "--out_dir=out/replaced"]
    train(workdir, *old)
    lines, files = log(workdir, "out/replaced"), sorted(os.listdir(workdir / "out" / "replaced" / "checkpoints"))
    # a run that cannot start (here: wandb cannot log in) leaves the old run as it was
    no_login = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path), "WANDB_DIR": str(tmp_path)}
    result = run("train.py", *TINY, "--out_dir=out/replaced", "--overwrite=True", "--wandb_log=True", cwd=workdir, env=no_login)
    assert "wandb.init failed" in one_error_line(result)
    assert log(workdir, "out/replaced") == lines and sorted(os.listdir(workdir / "out" / "replaced" / "checkpoints")) == files
    # one killed as soon as it has started: what is left is not the old checkpoint without its log and snapshots
    replacing = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *TINY, "--out_dir=out/replaced",
                                  "--overwrite=True", "--seed=7", "--max_iters=1000"], cwd=workdir, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    said = []
    for line in replacing.stdout:
        said.append(line)
        if " parameters | " in line:
            replacing.kill()
            break
    replacing.wait()
    assert "overwrite=True: replacing the run in out/replaced\n" in said
    ckpt_path = workdir / "out" / "replaced" / "ckpt.pt"
    assert not ckpt_path.exists() or torch.load(ckpt_path, weights_only=True)["train_config"]["seed"] == 7


def test_ctrl_c_ends_in_one_line_and_the_run_resumes(workdir):
    args = ["--max_iters=100000", "--eval_interval=1000", "--log_interval=1"]
    # at any moment from torch's import on: one line, and a run stopped before its loop has written nothing
    line = one_error_line(interrupt("train.py", *TINY, *args, "--out_dir=out/ctrl_c_early", cwd=workdir, after=1.0))
    assert line.startswith("error: interrupted ")
    if "before training started" in line:
        assert not (workdir / "out" / "ctrl_c_early").exists()
    line = one_error_line(interrupt("train.py", *TINY, *args, "--out_dir=out/ctrl_c", cwd=workdir,
                                    when=lambda line: line.startswith("step 3: loss")))
    assert line.startswith("error: interrupted at step ") and "ckpt.pt keeps step 0: go on with --init_from=resume" in line
    train(workdir, "--init_from=resume", "--out_dir=out/ctrl_c", "--max_iters=5", "--eval_interval=5")
    assert [r["step"] for r in log(workdir, "out/ctrl_c")][-1] == 5


def test_compile_path_runs(workdir):
    args = ["--max_iters=4", "--eval_interval=4", "--log_interval=2", "--eval_seqs=12"]  # val batches of 8 and 4
    compiled = run("train.py", *TINY, *args, "--compile=True", "--out_dir=out/compiled", cwd=workdir, env={"TORCH_LOGS": "dynamic"})
    assert compiled.returncode == 0, compiled.stderr
    # the val batch of 4 gets a graph of its own: the training step is not recompiled over a symbolic batch size
    assert "as dynamic" not in compiled.stderr and "create_symbol" not in compiled.stderr, compiled.stderr
    train(workdir, *args, "--out_dir=out/eager")
    for a, b in zip(log(workdir, "out/compiled"), log(workdir, "out/eager")):
        for key in ("loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-3)


def test_sample_prints_stories(workdir):
    train(workdir, "--max_iters=40", "--eval_interval=40", "--out_dir=out/sampled", "--sample_tokens=30")
    result = run("sample.py", "--out_dir=out/sampled", "--num_samples=2", "--max_new_tokens=40", "--prompt=Once", cwd=workdir)
    assert result.returncode == 0, result.stderr
    stories = [s.strip() for s in result.stdout.split("-" * 40) if s.strip()]
    assert len(stories) == 2 and all(s.startswith("Once") and len(s) > 10 for s in stories)
    prompts = workdir / "prompts.txt"
    prompts.write_text("The dog\nA girl\n")
    result = run("sample.py", "--out_dir=out/sampled", "--num_samples=1", "--max_new_tokens=10", f"--prompt_file={prompts}", cwd=workdir)
    assert result.returncode == 0 and result.stdout.count("-" * 40) == 2
    prompts.write_text("Once\n" * 500)
    result = interrupt("sample.py", "--out_dir=out/sampled", "--num_samples=1", "--max_new_tokens=40", f"--prompt_file={prompts}",
                       cwd=workdir, when=lambda line: line.startswith("-" * 40))
    assert one_error_line(result) == "error: interrupted" and result.stdout.count("-" * 40) < 500


@pytest.mark.parametrize("args, message", [
    (["--nonsense=3"], "unknown setting 'nonsense'"),
    (["--eval_interval=0"], "eval_interval=0 must be at least 1"),
    (["--batch_size=0"], "batch_size=0 must be at least 1"),
    (["--learning_rate=-1"], "learning_rate=-1.0 must be 0 or more"),
    (["--n_ctx=0"], "n_ctx=0 must be at least 1"),
    (["--seed=-1"], "seed=-1 must be between 0 and 2**63 - 1"),
    (["--beta1=2"], "beta1=2.0 must be at least 0 and below 1"),
    (["--min_lr_ratio=-5"], "min_lr_ratio=-5.0 must be between 0 and 1"),
    (["--learning_rate=1e999"], "learning_rate=inf must be a finite number"),
    (["--norm_eps=0"], "norm_eps=0.0 must be positive"),
    (["--dtype=float16"], "must be 'auto', 'float32' or 'bfloat16'"),
    (["--device=foo"], "device='foo' is not a device here"),
    (["--device=cuda"], "torch sees no GPU"),
    (["--init_from=pretrained"], "must be 'scratch' or 'resume'"),
    (["--x={[1]: 2}"], "unknown setting 'x'"),
    (["--max_iters=ten"], "max_iters must be a int"),
    (["--compile=1"], "compile must be a bool"),
    (["--n_heads=5"], "does not divide d_model"),
    (["--dataset=missing"], "run prepare.py"),
    (["--d_vocab=2048"], "vocab_size 4096 but the model has d_vocab=2048"),
    (["--init_from=resume", "--out_dir=out/never"], "does not exist"),
    (["--tokens_per_step=1000"], "not a multiple of n_ctx"),
    (["--max_iters"], "has no value"),
    (["--keep_checkpoints=linear:0"], "must be '' (none), 'log' or 'linear:N'"),
    (["--keep_checkpoints=every"], "must be '' (none), 'log' or 'linear:N'"),
    (["--optimizer=sgd"], "optimizer='sgd' must be 'adamw' or 'muon'"),
    (["--lr_schedule=linear"], "lr_schedule='linear' must be 'cosine' or 'wsd'"),
    (["--decay_fraction=1.5"], "decay_fraction=1.5 must be between 0 and 1"),
    (["--muon_momentum=1.0"], "muon_momentum=1.0 must be at least 0 and below 1"),
    (["--d_mlp_multiple=0"], "d_mlp_multiple=0 must be at least 1"),
    (["--compile_mode=fast"], "compile_mode='fast' must be 'auto', 'default', 'reduce-overhead', 'max-autotune-no-cudagraphs' or 'max-autotune'"),
])
def test_bad_settings(tmp_workdir, args, message):
    result = run("train.py", *TINY, *args, cwd=tmp_workdir)
    assert message in one_error_line(result)
    assert not (tmp_workdir / "out").exists()  # nothing written


def test_tokenizer_must_match_the_bins(tmp_workdir):
    assert run("tokenizer.py", "--input=data/sample/stories.jsonl", "--vocab_size=1024", cwd=tmp_workdir).returncode == 0
    line = one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    assert "is not the tokenizer" in line and "prepare.py" in line


def test_bad_config_files(workdir, tmp_path):
    config = tmp_path / "bad.py"
    for text, message in [("import os\n", "only `name = value` lines"), ("n_layers = 2 * 3\n", "must be a literal"),
                          ("typo_key = 1\n", "unknown setting 'typo_key'"), ("n_layers = \n", "not valid Python"),
                          ("dataset = 'caf\xe9'\n", "not UTF-8")]:
        config.write_bytes(text.encode("latin-1"))
        assert message in one_error_line(run("train.py", str(config), *TINY, cwd=workdir))
    assert "cannot read config" in one_error_line(run("train.py", str(tmp_path / "none.py"), cwd=workdir))


def test_broken_data(tmp_workdir):
    data = tmp_workdir / "data" / "sample"
    (data / "val.bin").write_bytes(b"")
    assert "does not match" in one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    (data / "val.bin").unlink()
    assert "missing" in one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    assert "bins hold uint32, not uint16" in one_error_line(run("train.py", *TINY, cwd=tmp_workdir))
    (data / "meta.json").write_text("{")
    assert "not valid JSON" in one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    (data / "meta.json").write_bytes(bytes(range(128, 256)))
    assert "not valid JSON" in one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    (data / "meta.json").write_text(json.dumps({**meta, "train": 5}))
    assert "lacks keys that prepare.py writes" in one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    assert not (tmp_workdir / "out").exists()
    # bins of the right size holding ids the tokenizer does not have
    (data / "meta.json").write_text(json.dumps(meta))
    np.full(meta["val"]["tokens"], 65535, dtype="<u2").tofile(data / "val.bin")
    line = one_error_line(run("train.py", *TINY, "--max_iters=1", cwd=tmp_workdir))
    assert "val.bin holds token id 65535, not below vocab_size 4096: it is damaged" in line
    assert not (tmp_workdir / "out").exists()


def test_corrupt_checkpoint(workdir, tmp_path):
    out = tmp_path / "run"
    train(workdir, "--max_iters=2", "--eval_interval=2", f"--out_dir={out}")
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    line = one_error_line(run("train.py", *TINY, "--init_from=resume", f"--out_dir={out}", "--max_iters=20", cwd=workdir))
    assert "corrupt" in line and "init_from=scratch" in line
    assert "corrupt" in one_error_line(run("sample.py", f"--out_dir={out}", cwd=workdir))
    assert (out / "ckpt.pt").read_bytes() == data[: len(data) // 2]  # left as it was
    # weights that are not numbers (a damaged file, or a run that diverged before train.py stopped them)
    checkpoint = torch.load(io.BytesIO(data), weights_only=True)
    checkpoint["model"]["blocks.1.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(checkpoint, out / "ckpt.pt")
    for script in ("sample.py", "evaluate.py"):
        line = one_error_line(run(script, f"--out_dir={out}", cwd=workdir))
        assert "holds weights that are not finite numbers (blocks.1.mlp.up_proj.weight)" in line


@pytest.mark.parametrize("args, message", [
    (["--num_samples=0"], "--num_samples=0 must be at least 1"), (["--temperature=-1"], "--temperature=-1.0 must be a finite number, 0 or more"),
    (["--temperature=nan"], "finite number"), (["--device=cuda"], "torch sees no GPU"), (["--device=tpu"], "not a device"),
    (["--top_p=0"], "--top_p=0.0 must be in (0, 1]"), (["--top_k=-3"], "--top_k=-3 must not be negative"),
    (["--prompt_file=nope.txt"], "No such file"), (["--prompt=" + "word " * 600], "leaving no room"),
    (["--out_dir=out/none"], "train a model with train.py"), (["--seed=18446744073709551616"], "--seed=1844"),
    (["--prompt=Once", "--prompt_file=prompts.txt"], "give --prompt or --prompt_file, not both"),
])
def test_sample_bad_arguments(workdir, args, message):
    out = workdir / "out" / "tiny_sampler"
    if not out.exists():
        train(workdir, "--max_iters=1", "--eval_interval=1", f"--out_dir={out}")
    assert message in one_error_line(run("sample.py", f"--out_dir={out}", *args, cwd=workdir))


@pytest.mark.parametrize("name, bf16", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 3090", 0.0)])
def test_mfu_peak_is_the_gpus_bf16_entry_and_half_of_it_in_tf32(monkeypatch, name, bf16):
    # the more specific names come first in the table: an H100 PCIe is not taken for an H100 SXM
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert configurator.gpu_peak_flops(0) == bf16 and configurator.gpu_peak_flops(0, "float32") == bf16 / 2


def fake_gpu(cwd, script, *args, env=None):
    """Run a script as on a machine with one CUDA GPU (tests/fake_cuda.py: a CPU posing as an H100)."""
    return subprocess.run([sys.executable, os.path.join(REPO, "tests", "fake_cuda.py"), os.path.join(REPO, script), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_readme_gpu_command_starts_on_one_gpu(workdir, tmp_path):
    # `python train.py configs/5m.py` with only what makes it small enough for a CPU (one window a step: in bf16, on a CPU
    # without bf16 units, the 5M takes ~5 s a window)
    result = fake_gpu(workdir, "train.py", os.path.join(REPO, "configs", "5m.py"), "--dataset=sample", "--out_dir=out/gpu", "--max_iters=2",
                      "--tokens_per_step=512", "--eval_interval=2", "--eval_seqs=1", "--log_interval=1", "--warmup_iters=1",
                      "--sample_tokens=8", "--compile=False", env={"FAKE_CUDA_COUNTS": str(tmp_path / "counts.json")})
    assert result.returncode == 0, result.stderr
    assert "5,374,208 parameters | 1 x cuda:0 bfloat16" in result.stdout and "Warning" not in result.stderr
    steps = [r for r in log(workdir, "out/gpu") if "loss" in r]
    assert len(steps) == 2 and all(0 < r["mfu"] < 1 for r in steps)  # the H100's peak came from the table
    assert all(r["peak_memory_gb"] == 1.5 for r in steps) and "| 1.50 GB |" in result.stdout
    ckpt = torch.load(workdir / "out" / "gpu" / "ckpt.pt", weights_only=True)
    assert all(group["fused"] for group in ckpt["optimizer"]["param_groups"]) and len(ckpt["rng"]["cuda"]) > 0
    # one pinned copy per batch: the two training batches, by the background reader, and the val batch of each evaluation
    assert json.load(open(tmp_path / "counts.json")) == {"pinned main": 2, "pinned other": 2, "cuda graph steps": 0}


def test_synthetic_data_never_reads_the_bins(tmp_workdir, tmp_path):
    # bench.py's baseline for what the data path costs: a train.bin of token 0 only is learnt in a few steps when read,
    # while the synthetic run's one micro-batch of random tokens, made on the device (no pinned copy), is not
    train_bin = tmp_workdir / "data" / "sample" / "train.bin"
    np.zeros(os.path.getsize(train_bin) // 2, dtype=np.uint16).tofile(train_bin)
    short = ["--max_iters=20", "--eval_interval=20", "--learning_rate=1e-2", "--warmup_iters=2"]
    train(tmp_workdir, *short, "--out_dir=out/zeros")
    result = fake_gpu(tmp_workdir, "train.py", *TINY, *short, "--out_dir=out/synthetic", "--synthetic_data=True", "--device=cuda",
                      env={"FAKE_CUDA_COUNTS": str(tmp_path / "counts.json")})
    assert result.returncode == 0, result.stderr
    assert [r["loss"] for r in log(tmp_workdir, "out/zeros") if "loss" in r][-1] < 0.5  # it always says 0 by now
    assert [r["loss"] for r in log(tmp_workdir, "out/synthetic") if "loss" in r][-1] > 2  # 1,024 random tokens, partly learnt
    assert json.load(open(tmp_path / "counts.json"))["pinned other"] == 0  # no batch read in the background


@pytest.mark.slow
@pytest.mark.parametrize("mode,used,graph_steps", [("auto", "reduce-overhead", 4 + 3), ("reduce-overhead", "reduce-overhead", 4 + 3),
                                                    ("max-autotune", "max-autotune", 4 + 3),
                                                    ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", 0)])
def test_cuda_graphs_mode_marks_each_replay_on_a_gpu(workdir, tmp_path, mode, used, graph_steps):
    # with CUDA graphs (reduce-overhead, max-autotune, and auto on one GPU with one micro-step a step) each forward,
    # training step or val batch, starts a new replay: 4 steps of one micro-step, and 3 evaluations (steps 0, 2, 4) of one val batch
    tiny = [a for a in TINY if a not in ("--device=cpu", "--compile=False")]
    result = fake_gpu(workdir, "train.py", *tiny, f"--out_dir=out/{mode}", "--max_iters=4", "--tokens_per_step=256", "--batch_size=2",
                      "--eval_seqs=2", "--eval_interval=2", *([] if mode == "auto" else [f"--compile_mode={mode}"]),
                      env={"FAKE_CUDA_COUNTS": str(tmp_path / "counts.json")})
    assert result.returncode == 0, result.stderr
    assert f"1 x cuda:0 bfloat16 | compile=True {used} |" in result.stdout and [r["step"] for r in log(workdir, f"out/{mode}")][-1] == 4
    assert json.load(open(tmp_path / "counts.json"))["cuda graph steps"] == graph_steps
    assert torch.load(workdir / "out" / mode / "ckpt.pt", weights_only=True)["train_config"]["compile_mode"] == mode  # resumes choose again


@pytest.mark.slow
def test_auto_compile_mode_leaves_cuda_graphs_out_with_gradient_accumulation(workdir, tmp_path):
    # two micro-steps a step: auto takes the default mode, with no CUDA graphs, where reduce-overhead would be refused
    tiny = [a for a in TINY if a not in ("--device=cpu", "--compile=False")]
    result = fake_gpu(workdir, "train.py", *tiny, "--out_dir=out/auto_accum", "--max_iters=2", "--tokens_per_step=256", "--batch_size=1",
                      "--eval_seqs=1", "--eval_interval=2", env={"FAKE_CUDA_COUNTS": str(tmp_path / "counts.json")})
    assert result.returncode == 0, result.stderr
    assert "1 x cuda:0 bfloat16 | compile=True | 256 tokens/step = 2 micro-steps" in result.stdout
    assert json.load(open(tmp_path / "counts.json"))["cuda graph steps"] == 0


@pytest.mark.slow
def test_torchrun_with_one_process_runs_as_without_it(workdir, tmp_path):
    # torchrun --nproc_per_node=1 on one GPU: no process group and no DDP (which NCCL would need, and which made a 5M step
    # 1.66x slower on an H100), so auto takes CUDA graphs as a plain run does
    tiny = [a for a in TINY if a not in ("--device=cpu", "--compile=False")]
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "1", "OMP_NUM_THREADS": "1", "FAKE_CUDA_COUNTS": str(tmp_path / "counts.json")}
    result = fake_gpu(workdir, "train.py", *tiny, "--out_dir=out/torchrun_one", "--max_iters=2", "--tokens_per_step=256",
                      "--batch_size=2", "--eval_seqs=2", "--eval_interval=2", env=torchrun)
    assert result.returncode == 0, result.stderr
    assert "1 x cuda:0 bfloat16 | compile=True reduce-overhead |" in result.stdout
    assert json.load(open(tmp_path / "counts.json"))["cuda graph steps"] == 2 + 2


@pytest.mark.parametrize("mode,instead", [("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")])
def test_cuda_graphs_mode_refuses_gradient_accumulation(workdir, mode, instead):
    # the next micro-step's replay would overwrite the gradients being summed: refused before anything is written
    tiny = [a for a in TINY if a != "--device=cpu"]
    result = fake_gpu(workdir, "train.py", *tiny, "--out_dir=out/graphs_accum", "--batch_size=4", "--compile=True",
                      f"--compile_mode={mode}")
    assert one_error_line(result).endswith(f"compile_mode={mode} (CUDA graphs) needs one micro-step per step on one device, not 2 x 1: "
                                           f"set batch_size to tokens_per_step / n_ctx = 8 and run one process, or use compile_mode={instead}")
    assert not (workdir / "out" / "graphs_accum").exists()


def test_cpu_checkpoint_resumes_on_a_gpu_and_samples_there(workdir):
    cpu = [a for a in TINY if not a.startswith("--device")]  # device 'auto': the CPU here, the GPU there
    result = run("train.py", *cpu, "--max_iters=4", "--eval_interval=4", "--out_dir=out/moved", cwd=workdir)
    cpu_dtype = "bfloat16" if configurator.bf16_is_fast("cpu") else "float32"
    assert result.returncode == 0 and f"1 x cpu {cpu_dtype}" in result.stdout, result.stderr
    result = fake_gpu(workdir, "train.py", "--init_from=resume", "--out_dir=out/moved", "--max_iters=8")
    assert result.returncode == 0, result.stderr
    assert "1 x cuda:0 bfloat16" in result.stdout and [r["step"] for r in log(workdir, "out/moved")][-1] == 8
    result = fake_gpu(workdir, "sample.py", "--out_dir=out/moved", "--device=cuda", "--num_samples=2", "--max_new_tokens=8")
    assert result.returncode == 0 and result.stdout.count("-" * 40) == 2, result.stderr


def test_auto_dtype_is_bf16_where_it_is_fast(monkeypatch):
    for amx, avx512_bf16 in [(True, False), (False, True), (True, True)]:  # Sapphire Rapids, Zen 4, both
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        assert configurator.bf16_is_fast("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # bf16 emulated: 10x slower
    assert not configurator.bf16_is_fast("cpu") and not configurator.bf16_is_fast("mps")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the checks: float32
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not configurator.bf16_is_fast("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert configurator.bf16_is_fast("cuda")  # native bf16 only, not emulated


def test_gpu_index_beyond_the_gpus_is_refused(workdir):
    result = fake_gpu(workdir, "train.py", *TINY, "--device=cuda:3", "--out_dir=out/nowhere")
    assert "device=cuda:3 but torch sees 1 GPU(s)" in one_error_line(result)


def test_no_arguments_and_help(workdir):
    line = one_error_line(run("train.py", cwd=workdir))
    assert "configs/quickstart.py" in line and "--help" in line
    result = run("train.py", "--help", cwd=workdir)
    described = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.startswith("  --")}
    assert result.returncode == 0 and "--seed=1337" in described and "--n_layers=6" in described, result.stdout
    assert all(described.values())  # each setting says what it does
    # ... in one line: a description carried on to a comment line below would be cut off mid-sentence
    assert all(" ".join(words).count("(") == " ".join(words).count(")") for words in described.values())


def test_config_files_count_as_much_as_flags_on_resume(workdir, tmp_path):
    train(workdir, "--max_iters=4", "--eval_interval=4", "--out_dir=out/configured")
    config = tmp_path / "longer.py"
    config.write_text("max_iters = 8\n")
    result = run("train.py", str(config), "--init_from=resume", "--out_dir=out/configured", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert torch.load(workdir / "out" / "configured" / "ckpt.pt", weights_only=True)["iter_num"] == 8
    config.write_text("max_iters = 12\nn_layers = 3\n")
    line = one_error_line(run("train.py", str(config), "--init_from=resume", "--out_dir=out/configured", cwd=workdir))
    assert "n_layers (2 -> 3)" in line


def test_resume_refuses_bins_or_tokenizer_made_since(tmp_workdir):
    train(tmp_workdir, "--max_iters=2", "--eval_interval=2", "--out_dir=out/pinned")
    # a tokenizer trained again, of the same size, on more stories: a resume goes on with the one in its checkpoint
    (tmp_workdir / "data" / "other").mkdir()
    extra = json.dumps({"story": "Quizzical zebras jogged by wavy fjords. " * 30}) + "\n"
    (tmp_workdir / "data" / "other" / "stories.jsonl").write_text(open(SAMPLE).read() + extra)
    assert run("tokenizer.py", "--input=data/other/stories.jsonl", "--name=sample", cwd=tmp_workdir).returncode == 0
    train(tmp_workdir, "--init_from=resume", "--out_dir=out/pinned", "--max_iters=3")
    sampled = run("sample.py", "--out_dir=out/pinned", "--max_new_tokens=20", cwd=tmp_workdir)
    assert sampled.returncode == 0, sampled.stderr
    # and the bins prepared with it
    assert run("prepare.py", "--input=data/other/stories.jsonl", "--tokenizer=tokenizers/sample.model",
               "--data_dir=data/sample", cwd=tmp_workdir).returncode == 0
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/pinned", "--max_iters=4", cwd=tmp_workdir))
    assert "data/sample was prepared again" in line and "tokenizer sha256" in line and "train tokens" in line
    # sample.py decodes with the tokenizer saved in the checkpoint, whatever lies in tokenizers/, from any folder
    elsewhere = run("sample.py", f"--out_dir={tmp_workdir / 'out' / 'pinned'}", "--max_new_tokens=20", cwd=tmp_workdir / "data")
    assert elsewhere.returncode == 0 and elsewhere.stdout == sampled.stdout, elsewhere.stderr


def test_resume_refuses_the_same_stories_prepared_again_in_another_order(tmp_workdir):
    import random

    lines = open(SAMPLE).readlines()
    (tmp_workdir / "data" / "shuffled").mkdir()
    stories = tmp_workdir / "data" / "shuffled" / "stories.jsonl"
    prepare = ["--input=data/shuffled/stories.jsonl", "--tokenizer=tokenizers/sample.model", "--data_dir=data/shuffled"]
    stories.write_text("".join(lines))
    assert run("prepare.py", *prepare, cwd=tmp_workdir).returncode == 0
    train(tmp_workdir, "--dataset=shuffled", "--max_iters=2", "--eval_interval=2", "--out_dir=out/shuffled")
    random.Random(0).shuffle(lines)
    stories.write_text("".join(lines))
    assert run("prepare.py", *prepare, cwd=tmp_workdir).returncode == 0  # the same counts, tokens in another order
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/shuffled", "--max_iters=4", cwd=tmp_workdir))
    assert "data/shuffled was prepared again" in line and "train sha256" in line and "train tokens" not in line


def test_resume_past_max_iters(workdir):
    train(workdir, "--max_iters=4", "--eval_interval=4", "--out_dir=out/finished")
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/finished", "--max_iters=2", cwd=workdir))
    assert "at step 4, past max_iters=2" in line
    result = run("train.py", "--init_from=resume", "--out_dir=out/finished", cwd=workdir)
    assert result.returncode == 0 and "nothing to train" in result.stdout


def test_resume_between_two_log_lines_logs_the_same_losses(workdir):
    args = ["--eval_interval=6", "--log_interval=4"]  # the checkpoint at step 6 falls inside a log interval
    train(workdir, *args, "--max_iters=14", "--out_dir=out/whole")
    train(workdir, *args, "--max_iters=6", "--lr_decay_iters=14", "--out_dir=out/halves")
    result = run("train.py", "--init_from=resume", "--out_dir=out/halves", "--max_iters=14", cwd=workdir)
    assert result.returncode == 0, result.stderr
    whole = [(r["step"], r.get("loss"), r.get("val_loss")) for r in log(workdir, "out/whole")]
    halves = [(r["step"], r.get("loss"), r.get("val_loss")) for r in log(workdir, "out/halves")]
    assert halves == whole[:2] + [(6, halves[2][1], None)] + whole[2:]  # and the last line of the first half


def test_out_dir_that_cannot_be_made(tmp_workdir):
    (tmp_workdir / "blocker").write_text("a file where a folder would go")
    line = one_error_line(run("train.py", *TINY, "--out_dir=blocker/run", cwd=tmp_workdir))
    assert "out_dir=blocker/run cannot be written" in line and "blocker is a file, not a folder" in line
    line = one_error_line(run("train.py", *TINY, "--out_dir=", cwd=tmp_workdir))
    assert "out_dir= cannot be written: the name is empty" in line


def test_sample_greedy_at_a_tiny_temperature_and_a_prompt_file_without_prompts(workdir, tmp_path):
    out = workdir / "out" / "tiny_sampler"
    if not out.exists():
        train(workdir, "--max_iters=1", "--eval_interval=1", f"--out_dir={out}")
    args = [f"--out_dir={out}", "--max_new_tokens=30", "--num_samples=1"]
    tiny = run("sample.py", *args, "--temperature=1e-45", cwd=workdir)
    greedy = run("sample.py", *args, "--temperature=0", cwd=workdir)
    assert tiny.returncode == 0 and tiny.stdout == greedy.stdout, tiny.stderr
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    assert "has no prompts" in one_error_line(run("sample.py", f"--out_dir={out}", f"--prompt_file={blank}", cwd=workdir))


def snapshots(cwd, out_dir):
    """{step: state dict} of the snapshots train.py kept in out_dir."""
    from safetensors.torch import load_file

    folder = os.path.join(cwd, out_dir, "checkpoints")
    return {int(name[5:12]): load_file(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def test_checkpoints_over_training(workdir, tmp_path):
    from safetensors import safe_open

    import export
    from model import GPT, GPTConfig
    from sample import load_model, snapshot_path

    result = train(workdir, "--max_iters=10", "--eval_interval=5", "--keep_checkpoints=log", "--out_dir=out/keep")
    assert "keep_checkpoints=log: 7 snapshots of 1.4 MB" in result.stdout
    kept = snapshots(workdir, "out/keep")
    assert list(kept) == [0, 1, 2, 4, 5, 8, 10]  # powers of two, every evaluation, the last step
    final = weights(workdir, "out/keep")
    assert set(kept[10]) == set(final) - {"lm_head.weight"} and all(torch.equal(kept[10][k], final[k]) for k in kept[10])
    torch.manual_seed(1337)  # the run's seed: step 0 is the model as initialised
    config = GPTConfig(**torch.load(workdir / "out" / "keep" / "ckpt.pt", weights_only=True)["model_config"])
    init = GPT(config).state_dict()
    assert all(torch.equal(kept[0][k], init[k]) for k in kept[0])
    assert not all(torch.equal(kept[1][k], kept[2][k]) for k in kept[1])
    val = {r["step"]: r["val_loss"] for r in log(workdir, "out/keep") if "val_loss" in r}
    for step in (0, 5, 10):
        with safe_open(snapshot_path(str(workdir / "out" / "keep"), step), "pt") as f:
            info = f.metadata()
        assert int(info["step"]) == step and float(info["val_loss"]) == val[step]

    # stopped at step 4, a snapshot of a killed run's step 8 left behind: the resume replaces it, and every
    # snapshot equals the uninterrupted run's
    train(workdir, "--max_iters=4", "--lr_decay_iters=10", "--eval_interval=5", "--keep_checkpoints=log",
          "--out_dir=out/keep_resumed")
    open(workdir / "out" / "keep_resumed" / "checkpoints" / "step_0000008.safetensors", "wb").write(b"torn")
    result = run("train.py", "--init_from=resume", "--out_dir=out/keep_resumed", "--max_iters=10", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "keep_checkpoints=log: 3 snapshots" in result.stdout  # 5, 8 and 10: step 4's is there already
    resumed = snapshots(workdir, "out/keep_resumed")
    assert list(resumed) == list(kept)
    assert all(torch.equal(resumed[s][k], kept[s][k]) for s in kept for k in kept[s])

    # linear:N, and a scratch run over the run in out_dir drops that run's snapshots
    result = train(workdir, "--max_iters=7", "--eval_interval=5", "--keep_checkpoints=linear:3",
                   "--out_dir=out/keep_resumed", "--overwrite=True")
    assert list(snapshots(workdir, "out/keep_resumed")) == [0, 3, 6, 7]

    # sample.py, evaluate.py, activations.py and export.py take --step
    model, _ = load_model(str(workdir / "out" / "keep"), "cpu", step=4)
    assert all(torch.equal(model.state_dict()[k], kept[4][k]) for k in kept[4])
    assert torch.equal(model.lm_head.weight, kept[4]["embed.weight"])
    result = run("sample.py", "--out_dir=out/keep", "--step=4", "--max_new_tokens=10", cwd=workdir)
    assert result.returncode == 0 and "-" * 40 in result.stdout, result.stderr
    assert "no snapshot of step 3: it kept steps 0, 1, 2, 4, 5, 8, 10" in one_error_line(
        run("sample.py", "--out_dir=out/keep", "--step=3", cwd=workdir))
    os.makedirs(tmp_path / "plain")
    shutil.copy(workdir / "out" / "keep" / "ckpt.pt", tmp_path / "plain")  # a run without snapshots
    assert "it kept none: train with --keep_checkpoints" in one_error_line(
        run("sample.py", f"--out_dir={tmp_path / 'plain'}", "--step=1", cwd=workdir))
    result = run("evaluate.py", "--out_dir=out/keep", "--step=5", cwd=workdir)
    assert result.returncode == 0, result.stderr
    report = json.load(open(workdir / "out" / "keep" / "eval" / "step_0000005" / "loss.json"))
    assert report["checkpoint"].endswith("step_0000005.safetensors")
    result = run("activations.py", "--out_dir=out/keep", "--step=5", "--sites=resid_post.1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    manifest = json.load(open(workdir / "out" / "keep" / "activations" / "step_0000005" / "val" / "activations.json"))
    assert list(manifest["checkpoint"]) == [snapshot_path("out/keep", 5)]
    result = run("export.py", "--out_dir=out/keep", "--step=8", f"--hf_dir={tmp_path / 'hf8'}", cwd=workdir)
    assert result.returncode == 0, result.stderr
    hf_model, tok = export.load_hf(str(tmp_path / "hf8"), "cpu")
    eight, _ = load_model(str(workdir / "out" / "keep"), "cpu", step=8)
    ids = torch.tensor([tok.encode("Once there was a fox.", bos=True)])
    with torch.no_grad():
        assert torch.equal(hf_model(ids)[0], eight(ids)[0])


def test_muon_with_wsd_learns_follows_its_schedule_and_resumes_exactly(workdir):
    args = ["--optimizer=muon", "--muon_lr=1e-2", "--lr_schedule=wsd", "--decay_fraction=0.25", "--log_interval=1"]
    train(workdir, *args, "--max_iters=20", "--eval_interval=10", "--out_dir=out/muon")
    train(workdir, *args, "--max_iters=10", "--lr_decay_iters=20", "--eval_interval=10", "--out_dir=out/muon_stopped")
    result = run("train.py", "--init_from=resume", "--out_dir=out/muon_stopped", "--max_iters=20", cwd=workdir)
    assert result.returncode == 0, result.stderr
    a, b = weights(workdir, "out/muon"), weights(workdir, "out/muon_stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    straight, resumed = log(workdir, "out/muon"), log(workdir, "out/muon_stopped")
    assert [r.get("loss") for r in straight] == [r.get("loss") for r in resumed]
    evals = [r["val_loss"] for r in straight if "val_loss" in r]
    assert evals[-1] < evals[0] - 1.5
    # warmup over 5 steps, 1 until the last quarter of the 20 steps (15), then a line down to min_lr_ratio 0.1
    scale = [(s + 1) / 5 if s < 5 else 1.0 if s < 15 else 1 - 0.9 * (s - 15) / 5 for s in range(20)]
    assert [r["lr"] for r in straight if "lr" in r] == pytest.approx([3e-3 * f for f in scale])
    state = torch.load(workdir / "out" / "muon" / "ckpt.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in state["muon"]["param_groups"]] == pytest.approx([1e-2 * scale[-1]])  # Muon's own peak, scaled
    assert [g["lr"] for g in state["adamw"]["param_groups"]] == pytest.approx([3e-3 * scale[-1]] * 2)
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/muon", "--max_iters=30", "--optimizer=adamw", cwd=workdir))
    assert "trained with optimizer=muon" in line and "optimizer=adamw" in line


def test_muon_on_a_gpu_uses_fused_adamw_for_the_rest(workdir):
    tiny = [a for a in TINY if not a.startswith("--device")]  # device 'auto': the GPU
    result = fake_gpu(workdir, "train.py", *tiny, "--optimizer=muon", "--max_iters=2", "--eval_interval=2", "--out_dir=out/gpu_muon")
    assert result.returncode == 0, result.stderr
    state = torch.load(workdir / "out" / "gpu_muon" / "ckpt.pt", weights_only=True)["optimizer"]
    assert all(group["fused"] for group in state["adamw"]["param_groups"]) and len(state["muon"]["state"]) == 14


def test_grad_clip_clips_and_a_huge_one_is_no_clip(workdir):
    args = ["--max_iters=3", "--eval_interval=3", "--dtype=float32"]
    for clip in ("1e-3", "0", "1e6"):
        train(workdir, *args, f"--grad_clip={clip}", f"--out_dir=out/clip_{clip}")
    tiny, off, huge = (weights(workdir, f"out/clip_{clip}") for clip in ("1e-3", "0", "1e6"))
    assert all(r["grad_norm"] > 1e-2 for r in log(workdir, "out/clip_1e-3") if "grad_norm" in r)  # so 1e-3 clips
    assert not all(torch.equal(tiny[k], off[k]) for k in off)
    assert all(torch.equal(huge[k], off[k]) for k in off)


def test_adamw_betas_are_beta1_then_beta2(workdir):
    for optimizer in ("adamw", "muon"):
        train(workdir, "--max_iters=1", "--eval_interval=1", "--beta1=0.8", "--beta2=0.99", f"--optimizer={optimizer}",
              f"--out_dir=out/betas_{optimizer}")
        state = torch.load(workdir / "out" / f"betas_{optimizer}" / "ckpt.pt", weights_only=True)["optimizer"]
        groups = state["param_groups"] if optimizer == "adamw" else state["adamw"]["param_groups"]
        assert groups and all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)


def test_val_bpb_is_the_nats_of_text_tokens_over_their_bytes(workdir):
    from sample import load_model

    train(workdir, "--max_iters=2", "--eval_interval=2", "--dtype=float32", "--out_dir=out/bpb")
    last = [r for r in log(workdir, "out/bpb") if "val_bpb" in r][-1]
    assert last["step"] == 2  # the checkpoint's weights
    model, tok = load_model(str(workdir / "out" / "bpb"), "cpu")
    n_ctx = model.config.n_ctx
    val = np.fromfile(workdir / "data" / "sample" / "val.bin", dtype="<u2").astype(np.int64)
    # eval_seqs=8 windows of n_ctx + 1 tokens, spread evenly from the start of val.bin to its last full window
    starts = np.linspace(0, len(val) - n_ctx - 1, num=8).astype(np.int64)
    rows = torch.from_numpy(np.stack([val[s:s + n_ctx + 1] for s in starts]))
    with torch.no_grad():
        logits = model(rows[:, :-1])[0]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="none")
    nbytes = torch.tensor(tok.token_bytes(), dtype=torch.float64)[rows[:, 1:].reshape(-1)]
    assert (nbytes == 0).sum() >= 2  # BOS and EOS among the targets: their nats are left out
    assert last["val_loss"] == pytest.approx(nll.mean().item(), rel=1e-4)
    text = nbytes > 0
    assert last["val_bpb"] == pytest.approx(nll.double()[text].sum().item() / (math.log(2) * nbytes.sum().item()), rel=1e-4)
