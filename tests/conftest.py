"""Shared fixtures and helpers: a working folder with the sample corpus tokenized (and private copies of it), the
tiny model's flags (TINY), and ways to run a script as a user would (run), press Ctrl-C in it (interrupt) and check
that it failed in one line (one_error_line)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "sample", "stories.jsonl")
sys.path.insert(0, REPO)

# a model small enough that a training run takes seconds on two cores
TINY = ["--n_layers=2", "--d_model=64", "--n_heads=4", "--n_ctx=128", "--tokens_per_step=1024", "--batch_size=8",
        "--warmup_iters=5", "--learning_rate=3e-3", "--eval_seqs=8", "--sample_tokens=0", "--log_interval=5",
        "--compile=False", "--dataset=sample", "--device=cpu"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds on two cores (torch.compile's first compilation); "
                                       "-m 'not slow' leaves it out")


def run(script, *args, cwd, env=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=600)


def interrupt(script, *args, cwd, when=None, after=None):
    """Start one of the repo's scripts, press Ctrl-C (SIGINT) once a line of its output makes when(line) true (or
    after that many seconds), and return the CompletedProcess; a script that ends before is returned as it ended."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = []
    if after is not None:
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
    else:
        for line in proc.stdout:
            seen.append(line)
            if when(line):
                proc.send_signal(signal.SIGINT)
                break
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(seen) + stdout, stderr)


def one_error_line(result):
    """The run failed, ending in a single 'error: ...' line on stderr, with no traceback (a progress bar may precede it)."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error") for line in lines) == 1, result.stderr
    return lines[-1]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A folder laid out as the repo's root after the quickstart's first two stages: tokenizer and bins."""
    root = tmp_path_factory.mktemp("work")
    os.makedirs(root / "data" / "sample")
    shutil.copy(SAMPLE, root / "data" / "sample" / "stories.jsonl")
    for script, args in (("tokenizer.py", ["--input=data/sample/stories.jsonl"]),
                         ("prepare.py", ["--input=data/sample/stories.jsonl", "--tokenizer=tokenizers/sample.model"])):
        result = run(script, *args, cwd=root)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def tmp_workdir(workdir, tmp_path):
    """A private copy of workdir for tests that change or break its files."""
    shutil.copytree(workdir / "data", tmp_path / "data")
    shutil.copytree(workdir / "tokenizers", tmp_path / "tokenizers")
    return tmp_path
