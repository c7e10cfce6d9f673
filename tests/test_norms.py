"""Models without normalization: norm='none' (FixedNorm), remove_norms.py, and their export to transformers."""

import copy
import os
import shutil
from dataclasses import asdict

import pytest
import torch

import export
from conftest import TINY, interrupt, one_error_line, run
from model import GPT, FixedNorm, GPTConfig, RMSNorm
from remove_norms import GROUPS, freeze, group_norms, measure_scales
from tokenizer import Tokenizer

CONFIG = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, n_ctx=32, d_vocab=4096)
BOS, EOS = 1, 2


def random_model(norm="rms", seed=0):
    """Random weights with norm weights off 1, so that a norm in the wrong place shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIG, norm=norm)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def batch(seed=1):
    """Token ids with BOS and EOS at some places, as stories packed into windows have them."""
    idx = torch.randint(3, 4096, (3, 32), generator=torch.Generator().manual_seed(seed))
    idx[:, 5], idx[0, 0], idx[1, 12], idx[2, 20] = BOS, BOS, EOS, EOS
    return idx


def test_bad_norm_value_is_one_clear_error(workdir):
    with pytest.raises(ValueError, match="norm='layer' must be 'rms'"):
        GPTConfig(norm="layer")
    line = one_error_line(run("train.py", *TINY, "--norm=layer", "--max_iters=1", cwd=workdir))
    assert "norm='layer'" in line and "'rms'" in line


def test_fixed_norm_is_x_times_weight_over_scale_and_rmsnorm_at_that_rms():
    norm = FixedNorm(8, scale=2.5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8)
    assert torch.allclose(norm(x), x * norm.weight / 2.5)
    # a token whose RMS (with eps) is the scale gets what RMSNorm gives it
    rms = RMSNorm(8, 1e-6)
    rms.weight = norm.weight
    y = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * 2.5
    assert torch.allclose(norm(y), rms(y), atol=1e-6)
    assert "scale" in dict(norm.named_buffers()) and "scale" in norm.state_dict()  # saved, not trained
    assert [n for n, _ in norm.named_parameters()] == ["weight"]


def test_scales_are_the_mean_rms_over_tokens_not_bos_eos_or_first():
    model = random_model()
    idx = batch()
    seen = []
    model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    (scale,) = measure_scales(model, group_norms(model, "final"), [idx], BOS, EOS)
    rms = (seen[0].pow(2).mean(-1) + model.config.norm_eps).sqrt()
    keep = (idx != BOS) & (idx != EOS)
    keep[:, 0] = False
    assert scale == pytest.approx(rms[keep].mean().item(), rel=1e-6)
    with torch.no_grad():  # a huge residual at the BOS and EOS tokens (attention sinks) hardly moves the scale
        model.embed.weight[[BOS, EOS]] *= 1000
    seen.clear()
    assert measure_scales(model, group_norms(model, "final"), [idx], BOS, EOS)[0] == pytest.approx(scale, rel=1e-2)
    assert (seen[0].pow(2).mean(-1) + 1e-6).sqrt().mean() > 10 * scale  # as it would if they were counted


def test_removal_replaces_each_group_by_its_frozen_scales_exactly():
    original = random_model()
    model = copy.deepcopy(original)
    idx = batch()
    scales = {}
    for group in GROUPS:  # as remove_norms.py does it, without the fine-tuning in between
        norms = group_norms(model, group)
        scales[group] = measure_scales(model, norms, [idx], BOS, EOS)
        freeze(norms, scales[group])
        if group == "mlp":  # the first removal: the original with x * w / scale in place of each MLP norm
            hooks = [block.mlp_norm.register_forward_hook(lambda m, args, out, s=s: args[0] * m.weight / s)
                     for block, s in zip(original.blocks, scales["mlp"])]
            with torch.no_grad():
                assert torch.allclose(model(idx)[0], original(idx)[0], atol=1e-5)
                for hook in hooks:
                    hook.remove()
                assert not torch.allclose(model(idx)[0], original(idx)[0], atol=1e-3)  # and it is a change
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    # the result is the model norm='none' builds, its scales saved with its weights
    free = GPT(GPTConfig(**CONFIG, norm="none")).eval()
    free.load_state_dict(model.state_dict())
    assert free.blocks[1].attn_norm.scale.item() == pytest.approx(scales["attention"][1])
    assert free.norm.scale.item() == pytest.approx(scales["final"][0])
    with torch.no_grad():
        assert torch.equal(free(idx)[0], model(idx)[0])
        manual = original.embed(idx)  # and it computes x * w / scale at every norm: the hand-written forward
        cos, sin = original.rope_cos[:32], original.rope_sin[:32]
        for block, sa, sm in zip(original.blocks, scales["attention"], scales["mlp"]):
            manual = manual + block.attn(manual * block.attn_norm.weight / sa, cos, sin)
            manual = manual + block.mlp(manual * block.mlp_norm.weight / sm)
        manual = original.lm_head(manual * original.norm.weight / scales["final"][0])
        assert torch.allclose(free(idx)[0], manual, atol=1e-5)


def test_norm_free_model_exports_to_transformers_with_the_same_logits(workdir, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model("none")
    with torch.no_grad():  # scales of trained models' norms span 0.1 to 50
        for i, m in enumerate(m for m in model.modules() if isinstance(m, FixedNorm)):
            m.scale.fill_([0.1, 0.7, 3.0, 50.0, 1.0][i])
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    os.makedirs(tmp_path / "run")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.config),
                "tokenizer": {"file": tok.model_file, "sha256": tok.sha256(), "model": tok.proto}}, tmp_path / "run" / "ckpt.pt")
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert llama.config.rms_norm_eps == 1e12
    idx = batch()
    with torch.no_grad():
        ours = model(idx)[0]
        assert (ours - llama(idx).logits).abs().max() < 1e-4  # float32 rounding: 3.7e-9 measured, on logits of up to 0.04
        back, _ = export.load_hf(str(tmp_path / "hf"), "cpu")  # the import reads it back as norm='none'
        assert back.config.norm == "none"
        assert (ours - back(idx)[0]).abs().max() < 1e-4
    # each scale comes back folded into its weight (scale 1), a weight of the size AdamW's steps move: the
    # exported weight w / (scale * 1e-6) would come back as weights of about 1e6, which fine-tuning cannot move
    for norm, imported in zip((m for m in model.modules() if isinstance(m, FixedNorm)),
                              (m for m in back.modules() if isinstance(m, FixedNorm))):
        assert imported.scale.item() == 1.0
        assert torch.allclose(imported.weight, norm.weight / norm.scale, rtol=1e-6)


def test_train_py_trains_without_norms(workdir):
    result = run("train.py", *TINY, "--norm=none", "--learning_rate=1e-3", "--max_iters=10", "--eval_interval=10",
                 "--out_dir=out/nonorm", cwd=workdir)
    assert result.returncode == 0, result.stderr
    losses = [float(line.split("val loss ")[1].split()[0]) for line in result.stdout.splitlines() if ": val loss" in line]
    assert losses[-1] < losses[0] - 0.5
    checkpoint = torch.load(workdir / "out" / "nonorm" / "ckpt.pt", weights_only=True)
    assert checkpoint["model_config"]["norm"] == "none" and "norm.scale" in checkpoint["model"]
    assert not any(isinstance(m, RMSNorm) for m in GPT(GPTConfig(**checkpoint["model_config"])).modules())
    line = one_error_line(run("train.py", *TINY, "--norm=rms", "--init_from=resume", "--max_iters=12",
                              "--out_dir=out/nonorm", cwd=workdir))
    assert "norm ('none' -> 'rms')" in line


def test_remove_norms_end_to_end(workdir):
    result = run("train.py", *TINY, "--max_iters=20", "--eval_interval=20", "--out_dir=out/withnorm", cwd=workdir)
    assert result.returncode == 0, result.stderr
    args = ["--out_dir=out/withnorm", "--steps_per_group=3", "--final_steps=3", "--batch_size=4", "--measure_batches=1",
            "--eval_seqs=4", "--overwrite"]
    result = run("remove_norms.py", *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines if "norms -> fixed scales" in line] == list(GROUPS)
    assert "norm-free: val loss" in result.stdout and "wrote out/withnorm_normfree/ckpt.pt" in result.stdout
    checkpoint = torch.load(workdir / "out" / "withnorm_normfree" / "ckpt.pt", weights_only=True)
    assert checkpoint["model_config"]["norm"] == "none"
    scales = checkpoint["remove_norms"]["groups"][0]["scales"]
    assert [checkpoint["model"][f"blocks.{i}.mlp_norm.scale"].item() for i in range(2)] == pytest.approx(scales)
    # the rest of the repo takes it: sample.py, evaluate.py, export.py and a resumed train.py
    result = run("sample.py", "--out_dir=out/withnorm_normfree", "--num_samples=1", "--max_new_tokens=8", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run("evaluate.py", "--out_dir=out/withnorm_normfree", "--batch_size=32", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run("export.py", "--out_dir=out/withnorm_normfree", "--hf_dir=out/withnorm_normfree_hf", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run("train.py", "--init_from=resume", "--out_dir=out/withnorm_normfree", "--max_iters=2", "--eval_interval=2",
                 "--device=cpu", cwd=workdir)
    assert result.returncode == 0, result.stderr
    # Ctrl-C once it has begun: one line, and nothing written
    result = interrupt("remove_norms.py", *args, "--steps_per_group=100000", "--out=out/interrupted", cwd=workdir,
                       when=lambda line: "with RMSNorm" in line)
    assert one_error_line(result) == "error: interrupted; nothing was written" and not (workdir / "out" / "interrupted").exists()
    # bounded errors
    assert "no norms to remove" in one_error_line(run("remove_norms.py", "--out_dir=out/withnorm_normfree",
                                                      "--out=out/x", cwd=workdir))
    assert "does not exist" in one_error_line(run("remove_norms.py", "--out_dir=out/missing", cwd=workdir))
    assert "exists" in one_error_line(run("remove_norms.py", "--out_dir=out/withnorm", cwd=workdir))
    for bad in ("inf", "0"):  # at 0 the fine-tuning would change nothing
        assert f"--learning_rate={float(bad)} must be a finite number above 0" in one_error_line(
            run("remove_norms.py", *args, f"--learning_rate={bad}", cwd=workdir))
    assert "--grad_clip=-1.0 must be a finite number, 0 or more" in one_error_line(
        run("remove_norms.py", *args, "--grad_clip=-1", cwd=workdir))
    # a fine-tuning that diverges writes nothing, and leaves the checkpoint it would have replaced as it was
    written = (workdir / "out" / "withnorm_normfree" / "ckpt.pt").read_bytes()
    line = one_error_line(run("remove_norms.py", *args, "--learning_rate=1e9", cwd=workdir))
    assert "the fine-tuning diverged and nothing was written; lower --learning_rate (now 1e+09)" in line, line
    assert (workdir / "out" / "withnorm_normfree" / "ckpt.pt").read_bytes() == written
    shutil.copytree(workdir / "data" / "sample", workdir / "data" / "cut_short")
    with open(workdir / "data" / "cut_short" / "train.bin", "r+b") as f:
        f.truncate(1000)  # bins cut short: refused, not fine-tuned on
    line = one_error_line(run("remove_norms.py", "--out_dir=out/withnorm", "--dataset=cut_short", "--out=out/cut", cwd=workdir))
    assert "train.bin is missing or does not match" in line and not (workdir / "out" / "cut").exists()


def test_model_trained_with_muon_resumes_after_remove_norms(workdir):
    result = run("train.py", *TINY, "--optimizer=muon", "--max_iters=2", "--eval_interval=2", "--out_dir=out/normfree_muon", cwd=workdir)
    assert result.returncode == 0, result.stderr
    result = run("remove_norms.py", "--out_dir=out/normfree_muon", "--steps_per_group=1", "--final_steps=1", "--batch_size=4",
                 "--measure_batches=1", "--eval_seqs=4", "--overwrite", cwd=workdir)
    assert result.returncode == 0, result.stderr
    # the fine-tuning's optimizer state is AdamW's, and the checkpoint says so: a resume goes on with AdamW
    checkpoint = torch.load(workdir / "out" / "normfree_muon_normfree" / "ckpt.pt", weights_only=True)
    assert checkpoint["train_config"]["optimizer"] == "adamw" and "muon" not in checkpoint["optimizer"]
    result = run("train.py", "--init_from=resume", "--out_dir=out/normfree_muon_normfree", "--max_iters=2", "--eval_interval=2",
                 "--learning_rate=3e-4", "--device=cpu", cwd=workdir)
    assert result.returncode == 0, result.stderr
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/normfree_muon_normfree", "--max_iters=3",
                              "--optimizer=muon", "--device=cpu", cwd=workdir))
    assert "optimizer=adamw" in line
