"""activations.py: every site against a forward pass written out here and against TransformerLens' hooks, each
row's token, story and position against the bins, --n_tokens and shard sizes, and bad inputs ending in one line."""

import hashlib
import json
import math
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import activations
import evaluate
import prepare
from conftest import TINY, one_error_line, run

KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn_z", "mlp_post")
N_CTX, STRIDE = 128, 48  # the tiny model's context; an odd stride, so windows do not line up with it


@pytest.fixture(scope="module")
def trained(workdir):
    """workdir with a tiny model (2 layers, n_ctx 128: most val stories need windows) in out/tiny_act."""
    result = run("train.py", *TINY, "--max_iters=10", "--eval_interval=10", "--out_dir=out/tiny_act", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


@pytest.fixture(scope="module")
def recorded(trained):
    """Every site of every layer over the whole val split, in shards of 1024 rows; returns the act_dir."""
    result = run("activations.py", "--out_dir=out/tiny_act", f"--sites={','.join(KINDS)}", f"--stride={STRIDE}",
                 "--batch_size=5", "--shard_tokens=1024", "--device=cpu", cwd=trained)
    assert result.returncode == 0, result.stderr
    return trained / "out" / "tiny_act" / "activations" / "val"


def read_all(act_dir, site):
    """(acts, tokens, story, position) of every shard, concatenated."""
    return [torch.cat(parts) for parts in zip(*activations.iter_activations(str(act_dir), site))]


def reference(model, ids):
    """{site: (T, ...)} for one sequence ids (T,) from its BOS, and the logits: a forward pass written out from the
    architecture (RMSNorm, RoPE, grouped-query causal attention, SwiGLU), reading only the model's weights."""
    c, T = model.config, len(ids)
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * w  # noqa: E731
    angles = torch.outer(torch.arange(T).float(), c.rope_base ** (-torch.arange(0, c.head_dim, 2).float() / c.head_dim))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    rope = lambda x: x * cos + torch.cat((-x[..., c.head_dim // 2:], x[..., :c.head_dim // 2]), -1) * sin  # noqa: E731
    heads = lambda x, n: x.view(T, n, c.head_dim).transpose(0, 1)  # noqa: E731  (n, T, head_dim)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x, out = model.embed.weight[ids], {}
    for L, block in enumerate(model.blocks):
        out[f"resid_pre.{L}"] = x
        h = rms(x, block.attn_norm.weight)
        q = rope(heads(h @ block.attn.q_proj.weight.T, c.n_heads))
        k = rope(heads(h @ block.attn.k_proj.weight.T, c.n_kv_heads)).repeat_interleave(c.n_heads // c.n_kv_heads, 0)
        v = heads(h @ block.attn.v_proj.weight.T, c.n_kv_heads).repeat_interleave(c.n_heads // c.n_kv_heads, 0)
        pattern = (q @ k.transpose(1, 2) / math.sqrt(c.head_dim)).masked_fill(~causal, float("-inf")).softmax(-1)
        out[f"attn_z.{L}"] = z = (pattern @ v).transpose(0, 1)  # (T, n_heads, head_dim)
        out[f"attn_out.{L}"] = z.reshape(T, -1) @ block.attn.o_proj.weight.T
        out[f"resid_mid.{L}"] = x = x + out[f"attn_out.{L}"]
        h = rms(x, block.mlp_norm.weight)
        out[f"mlp_post.{L}"] = F.silu(h @ block.mlp.gate_proj.weight.T) * (h @ block.mlp.up_proj.weight.T)
        out[f"mlp_out.{L}"] = out[f"mlp_post.{L}"] @ block.mlp.down_proj.weight.T
        out[f"resid_post.{L}"] = x = x + out[f"mlp_out.{L}"]
    return out, rms(x, model.norm.weight) @ model.embed.weight.T


def test_every_site_matches_a_forward_pass_of_each_window(recorded):
    from sample import load_model

    model, _ = load_model(str(recorded.parents[1]), "cpu")
    tokens = np.fromfile(recorded.parents[3] / "data" / "sample" / "val.bin", dtype="<u2").astype(np.int64)
    index = prepare.read_index(str(recorded.parents[3] / "data" / "sample"), "val")
    offsets, lengths = index["offset"].to_numpy().astype(np.int64), index["length"].to_numpy().astype(np.int64)
    assert lengths.max() > 3 * N_CTX  # windows are exercised
    sites = [f"{kind}.{L}" for kind in KINDS for L in range(model.config.n_layers)]
    expected = {s: [] for s in sites}
    with torch.no_grad():
        first = torch.from_numpy(tokens[:lengths[0]][:N_CTX])
        assert (reference(model, first)[1] - model(first[None])[0][0]).abs().max() < 1e-4  # the reference is the model
        for offset, n in zip(offsets, lengths):
            story, cache = tokens[offset:offset + n], {}
            for p in range(n):  # position p is taken from the window that ends at N_CTX + k * STRIDE, the first past p
                end = min(N_CTX + max(0, math.ceil((p + 1 - N_CTX) / STRIDE)) * STRIDE, n)
                start = max(0, end - N_CTX)
                if (start, end) not in cache:
                    cache[start, end] = reference(model, torch.from_numpy(story[start:end]))[0]
                for s in sites:
                    expected[s].append(cache[start, end][s][p - start])
    manifest = json.load(open(recorded / "activations.json"))
    assert list(manifest["sites"]) == sites and manifest["dtype"] == "float16" and manifest["stride"] == STRIDE
    for s in sites:
        acts = read_all(recorded, s)[0]
        kind, L = s.split(".")
        assert manifest["sites"][s]["hook"] == activations.SITES[kind][0].format(L=L)
        assert acts.dtype == torch.float16 and list(acts.shape[1:]) == manifest["sites"][s]["shape"]
        torch.testing.assert_close(acts.float(), torch.stack(expected[s]), rtol=2e-3, atol=1e-4, msg=s)


def test_rows_are_the_tokens_of_the_bin_with_their_story_and_position(recorded):
    data_dir = recorded.parents[3] / "data" / "sample"
    acts, tokens, story, position = read_all(recorded, "resid_post.1")
    bin_tokens = np.fromfile(data_dir / "val.bin", dtype="<u2")
    index = prepare.read_index(str(data_dir), "val")
    offsets = index["offset"].to_numpy().astype(np.int64)
    assert len(acts) == len(tokens) == len(bin_tokens)  # the whole split, every token once
    assert tokens.dtype == story.dtype == position.dtype == torch.int32
    assert np.array_equal(tokens.numpy(), bin_tokens)
    assert np.array_equal(bin_tokens[offsets[story.numpy()] + position.numpy()], tokens.numpy())
    assert np.array_equal(story.numpy(), np.repeat(np.arange(index.num_rows), index["length"].to_numpy()))
    assert (tokens[position == 0] == 1).all() and (tokens[position == 0] == 1).sum() == index.num_rows  # BOS
    stories = pq.read_table(recorded / "stories.parquet")
    assert stories["story"].to_pylist() == list(range(index.num_rows)) and stories["id"].to_pylist() == index["id"].to_pylist()
    assert stories["theme"].to_pylist() == index["theme"].to_pylist()
    manifest = json.load(open(recorded / "activations.json"))
    ckpt = recorded.parents[1] / "ckpt.pt"
    assert manifest["checkpoint"] == {"out/tiny_act/ckpt.pt": hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert manifest["n_tokens"] == len(bin_tokens) and manifest["n_stories"] == index.num_rows
    assert manifest["model_config"]["n_ctx"] == N_CTX and manifest["split"] == "val"
    assert manifest["model_config"]["norm"] == "rms"  # a norm-free model's says 'none'
    assert [s["rows"] for s in manifest["shards"]] == [min(1024, len(bin_tokens) - r) for r in range(0, len(bin_tokens), 1024)]
    assert sorted(os.listdir(recorded)) == ["activations.json", *(s["file"] for s in manifest["shards"]), "stories.parquet"]


def test_n_tokens_takes_the_first_tokens_in_shards_of_shard_tokens(recorded, monkeypatch):
    monkeypatch.chdir(recorded.parents[3])
    index = prepare.read_index("data/sample", "val")
    offsets, lengths = index["offset"].to_numpy().astype(np.int64), index["length"].to_numpy().astype(np.int64)
    cut = np.flatnonzero(lengths > 3 * N_CTX)[1]  # a story cut in its third window
    n_tokens = int(offsets[cut]) + 2 * N_CTX + 10
    activations.main(["--out_dir=out/tiny_act", "--sites=resid_post.1,attn_z.0", f"--n_tokens={n_tokens}",
                      "--shard_tokens=900", f"--stride={STRIDE}", "--batch_size=7",
                      "--act_dir=out/tiny_act/part", "--device=cpu"])
    manifest = json.load(open("out/tiny_act/part/activations.json"))
    shard_rows = [900] * (n_tokens // 900) + [n_tokens % 900]
    assert manifest["n_tokens"] == n_tokens and manifest["n_stories"] == cut + 1
    assert [s["rows"] for s in manifest["shards"]] == shard_rows
    for site in ("resid_post.1", "attn_z.0"):
        assert [len(acts) for acts, *_ in activations.iter_activations("out/tiny_act/part", site)] == shard_rows
        part, full = read_all("out/tiny_act/part", site), read_all(recorded, site)
        for a, b in zip(part[1:], full[1:]):  # tokens, story, position: the first n_tokens rows of the whole split
            assert torch.equal(a, b[:n_tokens])
        assert part[3][-1] == 2 * N_CTX + 9
        # the cut story is run in the windows it has whole (other batches: float16 rounding may differ)
        torch.testing.assert_close(part[0].float(), full[0][:n_tokens].float(), rtol=2e-3, atol=1e-4)
    assert len(pq.read_table("out/tiny_act/part/stories.parquet")) == cut + 1


def test_sites_are_transformer_lens_hooks_of_the_exported_model(recorded, tmp_path, monkeypatch):
    from transformer_lens import TransformerBridge

    workdir = recorded.parents[3]
    result = run("export.py", "--out_dir=out/tiny_act", f"--hf_dir={tmp_path / 'hf'}", cwd=workdir)
    assert result.returncode == 0, result.stderr
    bridge = TransformerBridge.boot_transformers(str(tmp_path / "hf"), device="cpu", dtype=torch.float32)
    rows = read_all(recorded, "resid_pre.0")
    first = rows[2] == 0  # the first story; its first N_CTX positions come from a window at its BOS
    ids = rows[1][first][:N_CTX].long()
    _, cache = bridge.run_with_cache(ids[None])
    manifest = json.load(open(recorded / "activations.json"))
    for site, about in manifest["sites"].items():
        acts = read_all(recorded, site)[0][first][:N_CTX]
        torch.testing.assert_close(acts.float(), cache[about["hook"]][0], rtol=2e-3, atol=1e-4, msg=site)
    # the Hugging Face folder gives the same rows
    monkeypatch.chdir(workdir)
    activations.main([f"--hf_dir={tmp_path / 'hf'}", "--dataset=sample", "--sites=resid_post.1,attn_z.1",
                      "--n_tokens=2000", f"--stride={STRIDE}", f"--act_dir={tmp_path / 'from_hf'}", "--device=cpu"])
    for site in ("resid_post.1", "attn_z.1"):
        torch.testing.assert_close(read_all(tmp_path / "from_hf", site)[0].float(), read_all(recorded, site)[0][:2000].float(),
                                   rtol=2e-3, atol=1e-4)


def error_of(argv):
    """The one line activations.main(argv) ends with."""
    with pytest.raises(SystemExit) as e:
        activations.main(argv)
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), e.value.code
    return str(e.value.code)


def test_bad_inputs_end_in_one_line(trained, tmp_workdir, monkeypatch):
    shutil.copytree(trained / "out" / "tiny_act", tmp_workdir / "out" / "tiny_act", ignore=shutil.ignore_patterns("activations"))
    monkeypatch.chdir(tmp_workdir)
    line = one_error_line(run("activations.py", "--out_dir=out/tiny_act", "--sites=resid_post.1,resid_post.7", cwd=tmp_workdir))
    assert "site resid_post.7: the model has layers 0 to 1" in line
    base = ["--out_dir=out/tiny_act", "--device=cpu"]
    line = error_of([*base, "--sites=residual.1"])
    assert "unknown site 'residual.1'" in line and all(kind in line for kind in KINDS)
    assert "unknown site 'attn_z.x'" in error_of([*base, "--sites=attn_z.x"])
    assert "unknown site 'attn_z.\u00b2'" in error_of([*base, "--sites=attn_z.\u00b2"])  # '²'.isdigit() is True
    assert activations.parse_sites("resid_post.01,resid_post.1, mlp_out.0", n_layers=2) == ["resid_post.1", "mlp_out.0"]
    assert "--sites is empty" in error_of(base)
    assert "--n_tokens=0 must be at least 1" in error_of([*base, "--sites=resid_post.0", "--n_tokens=0"])
    assert "--shard_tokens=0 must be at least 1" in error_of([*base, "--sites=resid_post.0", "--shard_tokens=0"])
    assert "invalid choice: 'float64'" in error_of([*base, "--sites=resid_post.0", "--dtype=float64"])
    assert "one of the two" in error_of(["--sites=resid_post.0"])
    assert "out/none/ckpt.pt does not exist" in error_of(["--out_dir=out/none", "--sites=resid_post.0"])
    assert "more than the model's context" in error_of([*base, "--sites=resid_post.0", "--stride=200"])
    # no bins, bins of another tokenizer, bins made before the story index
    assert "data/nothing/meta.json is missing" in error_of([*base, "--sites=resid_post.0", "--dataset=nothing"])
    for name in ("other_tokenizer", "no_index"):
        shutil.copytree("data/sample", f"data/{name}")
    meta = json.load(open("data/other_tokenizer/meta.json"))
    json.dump({**meta, "tokenizer_sha256": "0" * 64}, open("data/other_tokenizer/meta.json", "w"))
    os.remove("data/no_index/val.stories.parquet")
    assert "another tokenizer" in error_of([*base, "--sites=resid_post.0", "--dataset=other_tokenizer"])
    assert "no_index/val.stories.parquet does not exist" in error_of([*base, "--sites=resid_post.0", "--dataset=no_index"])
    assert not os.path.exists("out/tiny_act/activations")  # nothing written by a refused run
    # a folder with activations in it is replaced only when asked, and one with other files never
    activations.main([*base, "--sites=resid_post.0", "--n_tokens=900", "--shard_tokens=300"])
    assert "is not empty; give --overwrite=True" in error_of([*base, "--sites=mlp_out.1", "--n_tokens=200"])
    activations.main([*base, "--sites=mlp_out.1", "--n_tokens=200", "--overwrite=True", "--dtype=bfloat16"])
    manifest = json.load(open("out/tiny_act/activations/val/activations.json"))
    assert list(manifest["sites"]) == ["mlp_out.1"] and manifest["n_tokens"] == 200 and manifest["dtype"] == "bfloat16"
    acts = read_all("out/tiny_act/activations/val", "mlp_out.1")[0]
    assert acts.dtype == torch.bfloat16 and acts.shape == (200, 64) and acts.abs().max() > 0
    assert sorted(os.listdir("out/tiny_act/activations/val")) == ["activations.json", "shard_00000.safetensors", "stories.parquet"]
    # a run stopped by Ctrl-C leaves no manifest, and the next run names it as unfinished
    load_run = evaluate.load_run
    monkeypatch.setattr(evaluate, "load_run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))  # while loading
    assert "interrupted before anything was written to out/tiny_act/activations/val" in error_of(
        [*base, "--sites=mlp_out.1", "--overwrite=True"])
    monkeypatch.setattr(evaluate, "load_run", load_run)
    record = activations.record
    monkeypatch.setattr(activations, "record", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert "interrupted: out/tiny_act/activations/val holds a run that did not finish" in error_of(
        [*base, "--sites=mlp_out.1", "--overwrite=True"])
    monkeypatch.setattr(activations, "record", record)
    assert "holds a run that did not finish (no activations.json); give --overwrite=True" in error_of(
        [*base, "--sites=mlp_out.1"])
    activations.main([*base, "--sites=mlp_out.1", "--n_tokens=200", "--overwrite=True"])
    open("out/tiny_act/activations/val/notes.txt", "w").close()
    assert "holds 'notes.txt', which activations.py did not write" in error_of(
        [*base, "--sites=mlp_out.1", "--overwrite=True"])
    with pytest.raises(ValueError, match="holds no site 'resid_post.0'; it holds mlp_out.1"):
        next(activations.iter_activations("out/tiny_act/activations/val", "resid_post.0"))


def test_default_act_dir_keeps_a_hugging_face_model_apart_from_the_run_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = activations.parse_args(["--hf_dir=hf/5m", "--sites=resid_post"])
    assert args.act_dir == os.path.join("out", "5m", "activations_hf", "val")
    args = activations.parse_args(["--out_dir=out/5m", "--step=512", "--split=train", "--sites=resid_post"])
    assert args.act_dir == os.path.join("out", "5m", "activations", "step_0000512", "train")
