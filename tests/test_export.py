"""export.py: our checkpoints as Hugging Face folders and back, checked against transformers, TransformerLens
and our own tokenizer; the published SimpleStories layout (WordPiece tokenizer.json) through sample.py and
evaluate.py."""

import json
import math
import os
import shutil

import pytest
import torch

import export
from configurator import read_config
from conftest import REPO, SAMPLE, TINY, one_error_line, run
from model import GPT, GPTConfig
from tokenizer import Tokenizer, read_stories
from test_tokenizer import AWKWARD

transformers = pytest.importorskip("transformers")
MODEL_KEYS = ("n_layers", "d_model", "n_heads", "n_kv_heads", "d_mlp", "n_ctx", "d_vocab", "rope_base", "norm_eps")
# the strings the export has to get right, beside the sample stories and test_tokenizer's
AWKWARD_TOO = ["two  spaces", " leading", "trailing ", "\n\n\n", "\ttab", "a \u2581 literal", "\u2581", "byte \u0b85 fallback",
               "emoji \U0001F98A", "<s> and </s> in text", "<unk>", "  \n\n  ", "x" * 300]


def write_checkpoint(model, tok, out_dir):
    """A checkpoint as train.py writes it, with what sample.py and export.py read: model, its config, the tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": {k: getattr(model.config, k) for k in MODEL_KEYS},
                "tokenizer": {"file": tok.model_file, "sha256": tok.sha256(), "model": tok.proto}},
               os.path.join(out_dir, "ckpt.pt"))


def random_model(config, seed=0):
    """Random weights, norm weights moved off 1 so that a norm mapped to the wrong place shows in the logits."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def tok(workdir):
    return Tokenizer(str(workdir / "tokenizers" / "sample.model"))


@pytest.mark.parametrize("name", ["1.25m", "5m", "11m", "30m", "35m"])
def test_every_suite_model_gives_transformers_the_same_logits_and_generations(tok, tmp_path, name):
    settings = {k: v for k, v, _ in read_config(os.path.join(REPO, "configs", f"{name}.py"))}
    model = random_model(GPTConfig(**{k: settings[k] for k in MODEL_KEYS if k in settings}))
    write_checkpoint(model, tok, tmp_path / "run")
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.max_position_embeddings == 512
    idx = torch.randint(0, 4096, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - llama(idx).logits).abs().max() < 1e-4
    prompt = torch.tensor([tok.encode("Once there was a fox", bos=True)])
    ours = model.generate(prompt, 24, temperature=0, eos_id=tok.eos_id)
    theirs = llama.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(ours, theirs)


def test_mlp_width_rounded_to_64_exports_as_intermediate_size(tok, tmp_path):
    model = random_model(GPTConfig(n_layers=2, d_model=256, n_heads=4, d_mlp_multiple=64))
    write_checkpoint(model, tok, tmp_path / "run")
    export.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert llama.config.intermediate_size == model.config.d_mlp == 704
    idx = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(idx)[0] - llama(idx).logits).abs().max() < 1e-4


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """A tiny trained model, its export and its import back."""
    root = tmp_path_factory.mktemp("exported")
    result = run("train.py", *TINY, "--max_iters=30", "--eval_interval=30", f"--out_dir={root / 'run'}", cwd=workdir)
    assert result.returncode == 0, result.stderr
    for args in ([f"--out_dir={root / 'run'}", f"--hf_dir={root / 'hf'}"],
                 [f"--from_hf={root / 'hf'}", f"--out_dir={root / 'back'}"]):
        result = run("export.py", *args, cwd=workdir)
        assert result.returncode == 0, result.stderr
    return root


def test_fast_tokenizer_encodes_and_decodes_exactly_as_ours(exported, tok):
    hf = transformers.AutoTokenizer.from_pretrained(exported / "hf")
    assert (hf.bos_token_id, hf.eos_token_id, len(hf)) == (tok.bos_id, tok.eos_id, tok.vocab_size)
    for text in [t for _, t in read_stories(SAMPLE)] + AWKWARD + AWKWARD_TOO:
        ids = tok.encode(text)
        assert hf(text, add_special_tokens=False).input_ids == ids, repr(text)
        assert hf(text).input_ids == [tok.bos_id] + ids  # each story in train.bin starts at BOS
        assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


def test_round_trip_is_bit_exact(exported):
    before, after = (torch.load(exported / d / "ckpt.pt", weights_only=True) for d in ("run", "back"))
    assert before["model"].keys() == after["model"].keys()
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert before["model_config"] == after["model_config"]
    assert before["tokenizer"]["model"] == after["tokenizer"]["model"]  # the very sentencepiece file
    samples = [run("sample.py", *args, "--max_new_tokens=30", cwd=exported).stdout
               for args in (["--out_dir=run"], ["--out_dir=back"], ["--hf_dir=hf"])]
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) > 40


def test_imported_model_fine_tunes_on_bins_of_its_tokenizer(exported, tmp_workdir):
    for name in ("back", "other"):
        shutil.copytree(exported / "back", tmp_workdir / "out" / name)
    result = run("train.py", "--init_from=resume", "--out_dir=out/back", "--max_iters=6", "--eval_interval=3", *TINY,
                 cwd=tmp_workdir)
    assert result.returncode == 0, result.stderr
    assert "resuming out/back/ckpt.pt at step 0: imported, it holds no training settings" in result.stdout
    assert [r["step"] for r in map(json.loads, open(tmp_workdir / "out" / "back" / "log.jsonl")) if "val_loss" in r] == [3, 6]
    result = run("train.py", "--init_from=resume", "--out_dir=out/back", "--max_iters=7", cwd=tmp_workdir)
    assert "resuming out/back/ckpt.pt at step 6, with the settings saved in it" in result.stdout, result.stderr
    # it has no optimizer state yet: Muon can start on it as well as AdamW
    shutil.copytree(exported / "back", tmp_workdir / "out" / "muon")
    result = run("train.py", "--init_from=resume", "--out_dir=out/muon", "--max_iters=2", "--eval_interval=2", *TINY,
                 "--optimizer=muon", cwd=tmp_workdir)
    assert result.returncode == 0, result.stderr
    # bins made with another tokenizer of the same size are refused
    (tmp_workdir / "data" / "other").mkdir()
    extra = json.dumps({"story": "Quizzical zebras jogged by wavy fjords. " * 30}) + "\n"
    (tmp_workdir / "data" / "other" / "stories.jsonl").write_text(open(SAMPLE).read() + extra)
    for script, args in (("tokenizer.py", ["--input=data/other/stories.jsonl"]),
                         ("prepare.py", ["--input=data/other/stories.jsonl", "--tokenizer=tokenizers/other.model"])):
        assert run(script, *args, cwd=tmp_workdir).returncode == 0
    line = one_error_line(run("train.py", "--init_from=resume", "--out_dir=out/other", "--dataset=other", "--max_iters=6",
                              cwd=tmp_workdir))
    assert "data/other was prepared with another tokenizer than out/other/ckpt.pt has" in line


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "biases in attention"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling 'linear'"),
    ({"model_type": "mistral"}, "model_type 'mistral', not 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_folders_outside_the_family_are_refused(exported, tmp_path, change, message):
    shutil.copytree(exported / "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
    line = one_error_line(run("export.py", f"--from_hf={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path))
    assert "is not a model of our family" in line and message in line
    assert not (tmp_path / "out").exists()


def test_untied_output_embedding_is_refused_unless_equal(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(exported / "hf" / "model.safetensors")
    for name, lm_head in (("equal", state["model.embed_tokens.weight"].clone()),
                          ("other", torch.randn_like(state["model.embed_tokens.weight"]))):
        shutil.copytree(exported / "hf", tmp_path / name)
        save_file({**state, "lm_head.weight": lm_head}, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    assert run("sample.py", f"--hf_dir={tmp_path / 'equal'}", "--max_new_tokens=5", cwd=tmp_path).returncode == 0
    line = one_error_line(run("sample.py", f"--hf_dir={tmp_path / 'other'}", cwd=tmp_path))
    assert "input and output embeddings differ" in line
    # an output embedding alone, or none in a folder whose config.json leaves it untied
    shutil.copytree(exported / "hf", tmp_path / "renamed")
    save_file({("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in state.items()},
              tmp_path / "renamed" / "model.safetensors", metadata={"format": "pt"})
    line = one_error_line(run("sample.py", f"--hf_dir={tmp_path / 'renamed'}", cwd=tmp_path))
    assert "holds no model.embed_tokens.weight" in line
    shutil.copytree(exported / "hf", tmp_path / "untied")
    config = json.load(open(tmp_path / "untied" / "config.json"))
    json.dump({**config, "tie_word_embeddings": False}, open(tmp_path / "untied" / "config.json", "w"))
    line = one_error_line(run("sample.py", f"--hf_dir={tmp_path / 'untied'}", cwd=tmp_path))
    assert "holds no lm_head.weight and its config.json does not tie it" in line


def published_folder(root):
    """A folder laid out as the published SimpleStories checkpoints are: a lowercasing WordPiece tokenizer.json
    ([UNK] 0, [EOS] 1, EOS after each text), a LlamaForCausalLM saved by transformers with
    max_position_embeddings 2048, eos id 1 and the output embedding stored beside the input one."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    fast = FastTokenizer(models.WordPiece(unk_token="[UNK]"))
    fast.normalizer = normalizers.Lowercase()
    fast.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation(),
                                                  pre_tokenizers.Digits(individual_digits=True)])
    fast.train_from_iterator((t for _, t in read_stories(SAMPLE)),
                             trainers.WordPieceTrainer(vocab_size=1024, special_tokens=["[UNK]", "[EOS]"]))
    fast.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    fast.decoder = decoders.WordPiece(prefix="##")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=fast, unk_token="[UNK]", eos_token="[EOS]")
    config = transformers.LlamaConfig(vocab_size=fast.get_vocab_size(), hidden_size=64, intermediate_size=170,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
                                      eos_token_id=1, tie_word_embeddings=False)  # not our defaults: read, not assumed
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(config)
    llama.lm_head.weight.data.copy_(llama.model.embed_tokens.weight.data)  # tied when trained, saved twice
    llama.save_pretrained(root)
    hf_tokenizer.save_pretrained(root)
    return llama, fast


def test_published_layout_runs_through_sample_and_evaluate(tmp_path):
    llama, fast = published_folder(tmp_path / "published")
    tok = Tokenizer(str(tmp_path / "published" / "tokenizer.json"))
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (1, 1, fast.get_vocab_size())  # EOS stands for BOS
    text = "The cat sat on the mat. It was happy!"
    assert tok.encode(text) == fast.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == "the cat sat on the mat. it was happy!"
    model, _ = export.load_hf(str(tmp_path / "published"), "cpu")
    assert model.config.n_ctx == 2048
    idx = torch.tensor([tok.encode(text, bos=True)])
    with torch.no_grad():
        assert (model(idx)[0] - llama(idx).logits).abs().max() < 1e-4
    result = run("sample.py", f"--hf_dir={tmp_path / 'published'}", "--prompt=The cat", "--max_new_tokens=20",
                 "--num_samples=2", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.count("-" * 40) == 2, result.stderr
    # WordPiece decodes a piece by the one before it: the new text goes on from the prompt's, a space before a word,
    # a '##' piece joined to the word it ends
    ids = tok.encode("the curious cat sat on the mat.")
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) + tok.continuation(ids[:cut], ids[cut:]) == "the curious cat sat on the mat."
    assert result.stdout.startswith("The cat") and "##" not in result.stdout
    # bins made with the folder's tokenizer.json, then the loss by story and label on them
    result = run("prepare.py", f"--input={SAMPLE}", f"--tokenizer={tmp_path / 'published' / 'tokenizer.json'}",
                 "--data_dir=data/published", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "give --dataset=NAME" in one_error_line(run("evaluate.py", f"--hf_dir={tmp_path / 'published'}", cwd=tmp_path))
    result = run("evaluate.py", f"--hf_dir={tmp_path / 'published'}", "--dataset=published", "--batch_size=32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.load(open(tmp_path / "out" / "published" / "eval_hf" / "loss.json"))  # not over a run's eval/
    meta = json.load(open(tmp_path / "data" / "published" / "meta.json"))
    assert report["stories"] == meta["val"]["stories"] and report["n_ctx"] == 2048
    assert report["predicted_tokens"] == meta["val"]["tokens"] - meta["val"]["stories"]
    # a random model predicts about uniformly: its loss is near log(vocab size)
    assert abs(report["token_loss"] - math.log(tok.vocab_size)) < 0.5
    assert {"theme", "topic"} <= {r["group"] for r in report["rows"]}


def test_transformer_lens_gives_the_same_logits_and_a_cache(exported):
    from transformer_lens import TransformerBridge

    model, tok = export.load_hf(str(exported / "hf"), "cpu")
    bridge = TransformerBridge.boot_transformers(str(exported / "hf"), device="cpu", dtype=torch.float32)
    ids = torch.tensor([tok.encode("Once there was a fox who liked the moon.", bos=True)])
    logits, cache = bridge.run_with_cache(ids)
    with torch.no_grad():
        assert (model(ids)[0] - logits).abs().max() < 1e-4
    pattern = cache["blocks.1.attn.hook_pattern"]
    assert pattern.shape == (1, model.config.n_heads, ids.size(1), ids.size(1))
    assert torch.allclose(pattern.sum(-1), torch.ones(1)) and pattern[0, :, 0, 1:].abs().max() == 0  # causal


def test_bad_export_arguments(tmp_path):
    assert "either --hf_dir (export) or --from_hf (import)" in one_error_line(run("export.py", cwd=tmp_path))
    assert "train a model with train.py" in one_error_line(run("export.py", "--out_dir=none", "--hf_dir=hf", cwd=tmp_path))
    assert "cannot read" in one_error_line(run("export.py", "--from_hf=none", "--out_dir=out", cwd=tmp_path))
    for flag in ("--step=3", "--push_to_hub=you/model"):  # an export's flags, not an import's
        line = one_error_line(run("export.py", "--from_hf=none", "--out_dir=out", flag, cwd=tmp_path))
        assert "--step and --push_to_hub go with an export (--hf_dir), not an import (--from_hf)" in line


def test_export_and_import_refuse_to_overwrite_unless_told(exported, tmp_path):
    shutil.copytree(exported / "hf", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{}")  # a mark: the folder is replaced only with --overwrite=True
    line = one_error_line(run("export.py", f"--out_dir={exported / 'run'}", f"--hf_dir={tmp_path / 'hf'}", cwd=tmp_path))
    assert "is not empty; give --overwrite=True" in line and (tmp_path / "hf" / "config.json").read_text() == "{}"
    result = run("export.py", f"--out_dir={exported / 'run'}", f"--hf_dir={tmp_path / 'hf'}", "--overwrite=True", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hf" / "config.json").read_text() == (exported / "hf" / "config.json").read_text()
    shutil.copytree(exported / "back", tmp_path / "back")
    line = one_error_line(run("export.py", f"--from_hf={exported / 'hf'}", f"--out_dir={tmp_path / 'back'}", cwd=tmp_path))
    assert "ckpt.pt exists" in line and "--overwrite=True" in line
    # the run it replaces goes as a whole: its log and snapshots are not the import's
    (tmp_path / "back" / "log.jsonl").write_text('{"step": 0, "val_loss": 8.3}\n')
    (tmp_path / "back" / "checkpoints").mkdir(exist_ok=True)
    (tmp_path / "back" / "checkpoints" / "step_0000004.safetensors").write_bytes(b"an older run's")
    result = run("export.py", f"--from_hf={exported / 'hf'}", f"--out_dir={tmp_path / 'back'}", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "back" / "log.jsonl").exists() and os.listdir(tmp_path / "back" / "checkpoints") == []


def test_unwritable_output_is_one_line_and_a_failed_export_writes_nothing(exported, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    for args in ([f"--out_dir={exported / 'run'}", "--hf_dir=file"], [f"--out_dir={exported / 'run'}", "--hf_dir=file/hf"],
                 [f"--from_hf={exported / 'hf'}", "--out_dir=file"]):
        assert "file is a file, not a folder" in one_error_line(run("export.py", *args, cwd=tmp_path))
    # a write that fails half-way leaves no folder, and no temporary one beside it
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", fail)
    with pytest.raises(OSError):
        export.export(str(exported / "run"), str(tmp_path / "out" / "hf"))
    assert os.listdir(tmp_path / "out") == []


def test_failed_upload_is_one_line_and_keeps_the_folder(exported, tmp_path):
    result = run("export.py", f"--out_dir={exported / 'run'}", "--hf_dir=hf", "--push_to_hub=someone/x", cwd=tmp_path,
                 env={"HF_HUB_OFFLINE": "1"})
    line = one_error_line(result)
    assert "wrote hf, but its upload to someone/x failed" in line and "hf upload someone/x hf" in line
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    line = one_error_line(run("export.py", f"--out_dir={exported / 'run'}", "--hf_dir=hf2", "--push_to_hub=bad name!/x",
                              cwd=tmp_path))
    assert "--push_to_hub=bad name!/x is not a hub repo id" in line and not (tmp_path / "hf2").exists()


def break_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))


@pytest.mark.parametrize("breaking, message", [
    pytest.param(lambda d: break_config(d, lambda c: {"model_type": "llama"}),
                 "does not give the model's shape in positive whole numbers: num_hidden_layers missing, hidden_size missing",
                 id="no shape"),
    pytest.param(lambda d: break_config(d, lambda c: {**c, "max_position_embeddings": "x"}), "max_position_embeddings='x'",
                 id="context of text"),
    pytest.param(lambda d: (d / "config.json").write_text("[1, 2]"), "config.json is not a JSON object", id="not an object"),
    pytest.param(lambda d: break_config(d, lambda c: {**c, "intermediate_size": 100}),
                 "its weights do not have the shape its config.json gives: blocks.0.mlp.gate_proj.weight (170, 64), not (100, 64)",
                 id="shape unlike the weights"),
    pytest.param(lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                 "model.safetensors (Error while deserializing header", id="weights cut short"),
])
def test_broken_folders_are_refused_naming_the_problem(exported, tmp_path, breaking, message):
    shutil.copytree(exported / "hf", tmp_path / "hf")
    breaking(tmp_path / "hf")
    with pytest.raises(ValueError) as e:
        export.read_llama(str(tmp_path / "hf"))
    assert str(tmp_path / "hf") in str(e.value) and message in str(e.value)
    # the scripts that read a folder end in that one line
    assert one_error_line(run("sample.py", f"--hf_dir={tmp_path / 'hf'}", cwd=tmp_path)) == f"error: {e.value}"
