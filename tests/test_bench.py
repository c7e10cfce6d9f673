"""bench.py's GPU table and profile. The table runs on a CPU posing as a GPU (tests/fake_cuda.py): the runs start, it is
read from their logs, a run that fails is reported in its row while the others go on, and runs can be chosen by
name. The profile of a compiled step lists its ops, on the CPU, and reports MFU on the fake GPU."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
from conftest import REPO


def test_gpu_table_reads_each_run_from_its_log(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(bench, "PYTHON", [sys.executable, f"{REPO}/tests/fake_cuda.py"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    # float32: the table is the subject here, and bf16 on a CPU without bf16 units is ten times slower (the one-GPU path's
    # bf16 is tested in test_train.py)
    small = ["--n_layers=2", "--d_model=64", "--n_ctx=128", "--tokens_per_step=1024", "--compile=False", "--dtype=float32"]
    monkeypatch.setattr(bench, "GPU_RUNS", [("tiny", "1.25m", 8, small), ("tiny x2", "1.25m", 4, small),
                                            ("bad", "1.25m", 8, [*small, "--n_ctx=100"])])
    bench.gpu(max_iters=40, with_sampling=False)
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    for name in ("tiny", "tiny x2"):  # one micro-step and two
        ms, rate, mfu, wait, memory, first, loss = rows[name]
        # the medians of three log lines (the first holds the warm-up) are of the same line: 1,024 tokens in ms, each
        # number rounded as printed (ms to 0.1, tokens/s to 1: 0.24 ms at 700 ms a step on a loaded machine)
        rate = float(rate.replace(",", ""))
        assert float(ms) > 0 and abs(1000 * 1024 / rate - float(ms)) <= 0.051 + 1000 * 1024 * 0.5 / rate**2
        assert re.fullmatch(r"\d+\.\d%", mfu) and 0 <= float(wait.rstrip("%")) < 100  # the MFU of a CPU against an H100: 0.0%
        assert memory == "1.50 GB" and float(first.split()[0]) > 0  # fake_cuda's max_memory_allocated
        assert loss.endswith(" |") and 7 < float(loss[:-2]) < 9  # about ln(4096) = 8.3 after 40 steps of warm-up
    assert rows["bad"][0].startswith("failed: error: tokens_per_step=1024 is not a multiple of n_ctx")
    # runs go in the order named, each with caches of its own (a cold start); a log too short for a median is a failed row
    calls, run_timed = [], bench.run_timed
    monkeypatch.setattr(bench, "run_timed", lambda command, timeout, env: calls.append(env) or run_timed(command, timeout, env))
    bench.gpu(runs="tiny x2,tiny", max_iters=10, with_sampling=False)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| t")]
    assert [row.split(" | ")[0] for row in rows] == ["| tiny x2", "| tiny"]
    assert all("failed: fewer than two log lines: give more max_iters" in row for row in rows)
    assert len({env["TORCHINDUCTOR_CACHE_DIR"] for env in calls}) == 2 and len({env["TRITON_CACHE_DIR"] for env in calls}) == 2
    with pytest.raises(SystemExit, match="no run named tiny x3; the runs are tiny, tiny x2, bad"):
        bench.gpu(runs="tiny,tiny x3")


def test_a_run_is_stopped_at_its_timeout_even_when_a_worker_of_its_own_session_holds_its_pipes(tmp_path):
    # as torchrun's workers do: a child in a session of its own, which the SIGTERM to its parent does not reach
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              f"start_new_session=True); open({str(pid_file)!r}, 'w').write(str(child.pid)); "
              "print('step 10: loss 8.3', flush=True); time.sleep(60)")
    t0 = time.time()
    code, first, why = bench.run_timed([sys.executable, "-c", script], timeout=3)
    try:
        assert time.time() - t0 < 20 and code != 0 and why == "timed out after 3 s" and 0 < first < 3
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_failed_run_is_named_by_its_error_line():
    script = "import sys; print('error: tokens_per_step=3 is not a multiple', file=sys.stderr); print('=' * 40, file=sys.stderr); sys.exit(1)"
    assert bench.run_timed([sys.executable, "-c", script], timeout=60) == (1, None, "error: tokens_per_step=3 is not a multiple")
    script = "raise ValueError('bad shape')"
    assert bench.run_timed([sys.executable, "-c", script], timeout=60) == (1, None, "ValueError: bad shape")


def test_profile_lists_where_a_compiled_step_spends_its_time():
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "profile", "config=1.25m", "batch_size=1", "steps=1", "rows=30"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("profile 1.25m cpu, "))
    assert re.search(r"batch 1 x 512: \d+\.\d ms a step, [\d,]+ tokens/s$", line), line
    assert "aten::mm" in result.stdout and "CompiledFxGraph" in result.stdout  # the matmuls, in the compiled step


@pytest.mark.slow
def test_profile_on_a_gpu_reports_mfu():
    result = subprocess.run([sys.executable, f"{REPO}/tests/fake_cuda.py", f"{REPO}/bench.py", "profile", "config=1.25m",
                             "device=cuda", "batch_size=1", "steps=1", "rows=5"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r"profile 1.25m cuda, bf16, batch 1 x 512: .* tokens/s, MFU \d+\.\d%", result.stdout), result.stdout


def test_data_wait_compares_the_bins_with_synthetic_tokens(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    bench.data_wait(max_iters=10, rounds=1)
    lines = capsys.readouterr().out.splitlines()
    _, real, synthetic, ratio, wait = lines[3].strip("| ").split(" | ")
    real, synthetic = float(real.removesuffix(" ms")), float(synthetic.removesuffix(" ms"))
    assert real > 0 and synthetic > 0 and abs(float(ratio.removesuffix("x")) - real / synthetic) < 0.01  # of the ms as printed
    assert 0 <= float(wait.rstrip("%")) < 100 and lines[4].startswith(f"real bins: {ratio} the synthetic step (median of 1 rounds")


def test_an_unknown_argument_is_refused_in_one_line():
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "gpu", "foo=1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("bench.py gpu: got an unexpected keyword argument 'foo'; "
                                     "its arguments are runs, max_iters, timeout, with_sampling")
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "kv_cache", "n_tokens=abc"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == \
        "bench.py kv_cache: n_tokens='abc' must be of type int, like its default 256"
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "train_step", "rounds=0"], capture_output=True,
                            text=True, timeout=60)  # refused before any model is built or timed
    assert result.returncode == 1 and result.stderr.strip() == "bench.py train_step: rounds=0 must be at least 1"
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "sampling", "rounds=0"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.strip() == "bench.py sampling: rounds=0 must be at least 1"
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "data_wait", "max_iters=5"], capture_output=True,
                            text=True, timeout=60)  # refused before train.py runs: its first log line is left out
    assert result.returncode == 1 and result.stderr.strip().startswith("bench.py data_wait: max_iters=5 must be at least 10")
    for argv, start in ((["nosuch"], "bench.py: no benchmark 'nosuch'; usage: python bench.py {generate|"),
                        (["kv_cache", "n_tokens"], "bench.py kv_cache: 'n_tokens' is not argument=value; usage: ")):
        result = subprocess.run([sys.executable, f"{REPO}/bench.py", *argv], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stderr.strip().startswith(start), result.stderr


def test_a_missing_input_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, f"{REPO}/bench.py", "openers", "stories=nope.jsonl"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)  # and no tokenizer there either
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "bench.py openers: tokenizer tokenizers/sample.model does not exist; train one with tokenizer.py"
