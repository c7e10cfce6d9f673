"""Training windows that start at a story's BOS (train.py --windows=story): whole stories packed, padding ignored."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, one_error_line, run
from model import GPT, GPTConfig
from prepare import read_offsets, story_windows, window_tokens

def sample_bins(workdir):
    """meta.json, train.bin and its story offsets, as prepare.py wrote them for the sample corpus."""
    data = str(workdir / "data" / "sample")
    meta = json.load(open(os.path.join(data, "meta.json")))
    tokens = np.fromfile(os.path.join(data, "train.bin"), dtype="<u2")
    return meta, tokens, read_offsets(data, "train")


@pytest.mark.parametrize("width", [65, 257, 513])
def test_story_windows_start_at_bos_and_hold_whole_stories(workdir, width):
    meta, tokens, offsets = sample_bins(workdir)
    lengths = dict(zip(offsets.tolist(), np.diff(offsets, append=len(tokens)).tolist()))
    packed = story_windows(offsets, len(tokens), width, 64, np.random.default_rng([1337, 3]))
    rows = window_tokens(tokens, packed, width)
    assert rows.shape == (64, width)
    assert (rows[:, 0] == meta["bos_id"]).all()
    for row, stories in zip(rows, packed):
        at = 0
        for start, length in stories:
            assert length == min(lengths[start], width)  # whole, or cut to the window when longer than it
            assert row[at] == meta["bos_id"] and (row[at:at + length] == tokens[start:start + length]).all()
            if length < width:
                assert row[at + length - 1] == meta["eos_id"]  # a story packed whole ends with its EOS
            at += length
        assert at <= width and (row[at:] == -1).all()
        if len(stories) > 1:
            assert all(length < width for _, length in stories)
    if width == 513:  # sample stories are 368 tokens at the median: first fit packs short ones beside them
        assert (rows == -1).mean() < 0.15 and np.mean([len(s) for s in packed]) > 1.2


def test_story_windows_depend_on_seed_and_step_only(workdir):
    _, tokens, offsets = sample_bins(workdir)

    def windows(seed, step):
        return story_windows(offsets, len(tokens), 129, 32, np.random.default_rng([seed, step]))

    assert windows(1337, 5) == windows(1337, 5)
    assert windows(1337, 5) != windows(1337, 6) and windows(1337, 5) != windows(7, 5)


def test_padding_is_ignored_by_the_loss(workdir):
    # a batch of story windows as train.py feeds it: inputs with padding read as token 0, targets -1 there. The loss
    # is the mean over the real tokens, each scored as if its row held nothing after them
    meta, tokens, offsets = sample_bins(workdir)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=64, n_heads=4, n_ctx=512, d_vocab=meta["vocab_size"]))
    for p in model.parameters():
        p.data += 0.2 * torch.randn_like(p)  # far from uniform predictions, so a padding scored would show
    rows = torch.from_numpy(window_tokens(tokens, story_windows(offsets, len(tokens), 513, 6, np.random.default_rng(1)), 513))
    assert (rows == -1).any()
    x, y = rows[:, :-1].clamp(min=0), rows[:, 1:]
    loss = model(x, y)[1]  # training: the fused lm_head and cross-entropy
    nats, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            real = row[row >= 0]
            logits = model(real[None, :-1])[0][0]
            nats += F.cross_entropy(logits, real[1:], reduction="sum").item()
            count += len(real) - 1
    assert loss.item() == pytest.approx(nats / count, rel=1e-5)
    padding_scored = model(x, y.clamp(min=0))[1]
    assert padding_scored.item() != pytest.approx(loss.item(), rel=1e-4)


def test_train_with_story_windows(workdir):
    # the batches' determinism is test_story_windows_depend_on_seed_and_step_only: here, that train.py runs on them
    result = run("train.py", *TINY, "--windows=story", "--max_iters=6", "--eval_interval=6", "--log_interval=2",
                 "--out_dir=out/story", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "story windows" in result.stdout
    records = [json.loads(line) for line in open(workdir / "out" / "story" / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/story", "--max_iters=8",
                              "--windows=random", cwd=workdir))
    assert "windows ('story' -> 'random')" in line
    line = one_error_line(run("train.py", *TINY, "--windows=documents", "--out_dir=out/bad", cwd=workdir))
    assert "windows='documents'" in line and "'random' or 'story'" in line


def test_story_windows_need_the_story_offsets(tmp_workdir):
    os.remove(tmp_workdir / "data" / "sample" / "train.idx")
    line = one_error_line(run("train.py", *TINY, "--windows=story", "--out_dir=out/x", cwd=tmp_workdir))
    assert "train.idx" in line and "prepare.py" in line


def test_story_windows_on_a_gpu_pin_one_copy_per_batch(workdir, tmp_path):
    cpu_free = [a for a in TINY if not a.startswith("--device")]
    counts = tmp_path / "counts.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fake_cuda.py"), os.path.join(REPO, "train.py"), *cpu_free,
                             "--device=cuda", "--windows=story", "--max_iters=3", "--eval_interval=3", "--out_dir=out/gpu_story"],
                            cwd=workdir, capture_output=True, text=True, timeout=600, env={**os.environ, "FAKE_CUDA_COUNTS": str(counts)})
    assert result.returncode == 0, result.stderr
    assert "1 x cuda:0 bfloat16" in result.stdout and "story windows" in result.stdout
    # three training batches, read by the background thread, and one val batch at each evaluation (steps 0 and 3)
    assert json.load(open(counts)) == {"pinned main": 2, "pinned other": 3, "cuda graph steps": 0}
