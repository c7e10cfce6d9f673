"""Export a train.py checkpoint as a Hugging Face model folder, and import one back.

    python export.py --out_dir=out/5m --hf_dir=hf/5m                  # ours -> LlamaForCausalLM + fast tokenizer
    python export.py --out_dir=out/5m --hf_dir=hf/5m --push_to_hub=you/simplestories-5m
    python export.py --out_dir=out/5m --hf_dir=hf/5m-step512 --step=512   # a snapshot (train.py --keep_checkpoints)
    python export.py --from_hf=hf/5m --out_dir=out/imported           # back: a checkpoint sample.py and train.py take

An --hf_dir that is not empty, or an --out_dir that holds a ckpt.pt, is refused unless --overwrite=True is given.

The folder loads with transformers (AutoModelForCausalLM, AutoTokenizer), TransformerLens
(TransformerBridge.boot_transformers) and nnsight:
    config.json              LlamaConfig: rope_theta, rms_norm_eps, tie_word_embeddings, max_position_embeddings
                             = n_ctx, bos/eos ids
    model.safetensors        the weights, float32; ours map one to one onto Llama's
    generation_config.json   bos/eos ids, and sampling as sample.py does it (temperature 0.8, top-k 50)
    tokenizer.json           a fast tokenizer (the `tokenizers` library) that gives the ids of ours: the same
                             sentencepiece BPE, merges ranked as sentencepiece ranks them, spaces as spaces, so that
                             a literal U+2581 falls back to bytes as it does in ours. It adds BOS in front, as
                             every story in train.bin starts; tokenizer(text, add_special_tokens=False) is
                             exactly Tokenizer.encode(text)
    tokenizer_config.json    special tokens; "<s>" in text is text, not BOS (split_special_tokens)
    tokenizer.model          our sentencepiece model itself: an import gets the very file its bins were made with

A model without norms (norm='none', remove_norms.py) is exported as published norm-free models are: RMSNorms of
epsilon 1e12, each fixed scale folded into its weight (weights of about 1e6, past float16's range: load it in
float32 or bfloat16); an import reads such a folder back as norm='none', each norm of scale 1 with rsqrt(eps)
folded back into its weight.
An import takes any Llama-shaped folder of our family: SwiGLU, RMSNorm, RoPE without scaling, no biases,
input and output embedding tied (or untied but equal, as in published checkpoints); anything else is
refused in one line that names what differs. The published SimpleStories models carry a WordPiece
tokenizer.json of their own; Tokenizer reads it, so `python sample.py --hf_dir=DIR` runs them.
"""

import json
import os
import tempfile
from dataclasses import asdict

import torch

from configurator import Parser, atomic_write, boolean, die, folder_problem, run_folder
from model import GPT, GPTConfig
from tokenizer import SP_SPACE, Tokenizer

# our parameter names -> Llama's, applied in order (norm.weight, the final norm, is the exception)
LLAMA_NAMES = (("embed.", "model.embed_tokens."), ("blocks.", "model.layers."), (".attn_norm.", ".input_layernorm."),
               (".attn.", ".self_attn."), (".mlp_norm.", ".post_attention_layernorm."))


# A model without norms (norm='none') is a LlamaForCausalLM whose RMSNorms have this epsilon, as the published
# norm-free GPT-2 models are: rmsnorm(x) = x * w / sqrt(mean(x^2) + 1e12), and in float32 1e12 + mean(x^2) is 1e12
# for any token of RMS under ~180 (1e12's float32 spacing is 65536), so the norm is x * w * rsqrt(1e12), linear. An
# import reads an epsilon of at least NORM_FREE_EPS as norm='none'.
HUGE_EPS = 1e12
NORM_FREE_EPS = 1e10


def eps_factor(eps):
    """rsqrt(eps) as Llama's RMSNorm computes it, in float32."""
    return torch.rsqrt(torch.tensor(eps, dtype=torch.float32)).item()


def llama_state_dict(state):
    """Our state dict under Llama's names; the tied output embedding is Llama's embed_tokens too. The scale of each
    FixedNorm (norm='none') is folded into its weight, w / (scale * rsqrt(HUGE_EPS)), for RMSNorms of eps HUGE_EPS."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" or key.endswith("norm.scale"):
            continue
        if key.endswith("norm.weight") and key[:-len("weight")] + "scale" in state:
            value = value / (state[key[:-len("weight")] + "scale"] * eps_factor(HUGE_EPS))
        if key == "norm.weight":
            key = "model.norm.weight"
        for ours, theirs in LLAMA_NAMES:
            key = key.replace(ours, theirs)
        out[key] = value
    return out


def our_state_dict(state):
    """Llama's state dict under our names (the inverse of llama_state_dict), lm_head tied to the embedding."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        if key == "model.norm.weight":
            key = "norm.weight"
        for ours, theirs in reversed(LLAMA_NAMES):
            key = key.replace(theirs, ours)
        out[key] = value
    out["lm_head.weight"] = out["embed.weight"]
    return out


def fast_tokenizer(tok):
    """Our sentencepiece BPE as a `tokenizers` BPE that encodes every string to the same ids.

    sentencepiece merges, at each step, the adjacent pair whose joined piece has the best score; a BPE
    with a merge (a, b) for every split of every piece into two pieces, ranked by the joined piece's
    score, does the same. Pieces are written with spaces where sentencepiece writes U+2581, so no
    normalizer is needed and a literal U+2581 in the text, in no piece, falls back to its bytes as ours
    does. "\\n\\n" is matched before the BPE, as sentencepiece matches its user-defined symbol."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as FastTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.proto)
    pieces = [(p.piece.replace(SP_SPACE, " "), p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece for piece, _, kind in pieces if kind == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
    merges = sorted((-score, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                    for piece, score, _ in pieces if piece in normal
                    for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=tok.sp.id_to_piece(0),
                                    byte_fallback=True, fuse_unk=True))
    specials = [p for p, _, kind in pieces if kind in (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
                                                        sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN)]
    fast.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    fast.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, kind in pieces
                     if kind == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED])
    fast.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    bos = tok.sp.id_to_piece(tok.bos_id)
    fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                        special_tokens=[(bos, tok.bos_id)])
    return fast


def llama_of(model, **config):
    """transformers' LlamaForCausalLM of our GPT model's shape, holding its weights (a norm-free model's scales
    folded into RMSNorms of eps HUGE_EPS); config: more LlamaConfig fields (token ids, attn_implementation)."""
    import transformers

    c = model.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.d_vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.n_ctx, rms_norm_eps=c.norm_eps if c.norm == "rms" else HUGE_EPS, rope_theta=c.rope_base,
        tie_word_embeddings=True, hidden_act="silu", attention_bias=False, mlp_bias=False, **config))
    result = llama.load_state_dict(llama_state_dict(model.state_dict()), strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"the weights do not map onto LlamaForCausalLM: {result}")
    return llama


def export(out_dir, hf_dir, push_to_hub="", step=None):
    """Write the checkpoint in out_dir (or its snapshot of step) as a Hugging Face folder hf_dir (and upload it to
    push_to_hub)."""
    import transformers

    from sample import load_model

    model, tok = load_model(out_dir, "cpu", step=step)
    if tok.sp is None:
        raise ValueError(f"{out_dir} was imported with a tokenizer.json; export the folder it came from instead")
    c = model.config
    llama = llama_of(model, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    llama.generation_config = transformers.GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                                            do_sample=True, temperature=0.8, top_k=50)
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=fast_tokenizer(tok), bos_token=tok.sp.id_to_piece(tok.bos_id),
        eos_token=tok.sp.id_to_piece(tok.eos_id), unk_token=tok.sp.id_to_piece(0), split_special_tokens=True,
        clean_up_tokenization_spaces=False, model_max_length=c.n_ctx)
    # written into a folder beside hf_dir (or in it, where its parent is not writable) and moved in when whole: a
    # failed export leaves hf_dir as it was
    parent = os.path.dirname(os.path.abspath(hf_dir))
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK):
        parent = hf_dir
    with tempfile.TemporaryDirectory(dir=parent, prefix=".export-") as tmp:
        llama.save_pretrained(tmp)
        hf_tokenizer.save_pretrained(tmp)
        path = os.path.join(tmp, "tokenizer_config.json")
        with open(path) as f:
            tokenizer_config = json.load(f)
        with open(path, "w") as f:  # the class name that transformers 4 and 5 both know
            json.dump({**tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
        with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
            f.write(tok.proto)
        os.makedirs(hf_dir, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(hf_dir, name))
    if push_to_hub:
        from huggingface_hub import HfApi

        try:
            HfApi().upload_folder(folder_path=hf_dir, repo_id=push_to_hub, repo_type="model")
        except Exception as e:  # the hub's own errors, and its HTTP library's for a network that is down
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"wrote {hf_dir}, but its upload to {push_to_hub} failed ({type(e).__name__}: {reason}); "
                             f"the folder stays: upload it with `hf upload {push_to_hub} {hf_dir}` (logged in: `hf auth login`)") from None


def read_llama(hf_dir):
    """(GPTConfig, our state dict, Tokenizer) of a Hugging Face folder of our family, read without transformers.
    ValueError, naming what differs, for a folder that is not."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); {hf_dir} is not a Hugging Face model folder") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object; {hf_dir} is not a Hugging Face model folder")
    # the shape, in positive whole numbers (a bool is not one); without num_key_value_heads, no grouped heads
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings",
                "vocab_size")
    shape = {key: config.get(key) for key in required}
    shape["num_key_value_heads"] = config.get("num_key_value_heads", shape["num_attention_heads"])
    bad = [f"{key}={value!r}" if key in config else f"{key} missing" for key, value in shape.items()
           if (type(value) is not int or value < 1) and (key in required or key in config)]
    if bad:
        raise ValueError(f"{path} does not give the model's shape in positive whole numbers: {', '.join(bad)}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5 and 4 spell it apart
    if not isinstance(rope, dict):
        raise ValueError(f"{path}: its RoPE parameters {rope!r} are not a JSON object")
    differs = [what for what, wrong in (
        (f"model_type {config.get('model_type')!r}, not 'llama'", config.get("model_type") != "llama"),
        (f"hidden_act {config.get('hidden_act')!r}, not 'silu'", config.get("hidden_act", "silu") != "silu"),
        ("biases in attention", config.get("attention_bias")), ("biases in the MLP", config.get("mlp_bias")),
        (f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}", rope.get("rope_type", rope.get("type", "default"))
         not in ("default", None)),
        ("head_dim other than hidden_size / num_attention_heads",
         config.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
         != shape["hidden_size"] // shape["num_attention_heads"]),
    ) if wrong]
    if differs:
        raise ValueError(f"{hf_dir} is not a model of our family: {'; '.join(differs)}")
    try:
        model_config = GPTConfig(
            n_layers=shape["num_hidden_layers"], d_model=shape["hidden_size"], n_heads=shape["num_attention_heads"],
            n_kv_heads=shape["num_key_value_heads"], d_mlp=shape["intermediate_size"],
            n_ctx=shape["max_position_embeddings"], d_vocab=shape["vocab_size"],
            rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)))
        if model_config.norm_eps >= NORM_FREE_EPS:  # norms that do not normalize: a model without norms
            model_config.norm = "none"
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} does not describe a model of our family ({e})") from None
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{hf_dir} holds no .safetensors weights; save the model with safe_serialization")
    state = {}
    for f in files:
        try:
            state.update(load_file(os.path.join(hf_dir, f)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {os.path.join(hf_dir, f)} ({e}): it is corrupt or cut short; download "
                             f"or export it again") from None
    if "model.embed_tokens.weight" not in state:
        raise ValueError(f"{hf_dir} is not a model of our family: it holds no model.embed_tokens.weight")
    if "lm_head.weight" in state and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        raise ValueError(f"{hf_dir} is not a model of our family: its input and output embeddings differ (our GPT ties them)")
    if "lm_head.weight" not in state and not config.get("tie_word_embeddings", False):  # transformers' default
        raise ValueError(f"{hf_dir} holds no lm_head.weight and its config.json does not tie it to the input embedding "
                         f"(tie_word_embeddings): transformers would load it with a random output embedding")
    ours = our_state_dict({k: v.float() for k, v in state.items()})
    if model_config.norm == "none":  # each norm x * w * rsqrt(eps): a FixedNorm of weight w * rsqrt(eps), scale 1,
        for key in [k for k in ours if k.endswith("norm.weight")]:  # so the weights are on a scale training can move
            ours[key] = ours[key] * eps_factor(model_config.norm_eps)
            ours[key[:-len("weight")] + "scale"] = torch.tensor(1.0)
    expected = GPT(model_config).to("meta").state_dict()
    extra, missing = set(ours) - set(expected), set(expected) - set(ours)
    if extra or missing:
        raise ValueError(f"{hf_dir} is not a model of our family: weights {', '.join(sorted(extra)[:3]) or 'none'} "
                         f"too many, {', '.join(sorted(missing)[:3]) or 'none'} missing")
    wrong = [f"{key} {tuple(ours[key].shape)}, not {tuple(expected[key].shape)}" for key in expected
             if ours[key].shape != expected[key].shape]
    if wrong:
        raise ValueError(f"{hf_dir}: its weights do not have the shape its config.json gives: {'; '.join(wrong[:2])}"
                         f"{f' and {len(wrong) - 2} more' if len(wrong) > 2 else ''}")
    for name in ("tokenizer.model", "tokenizer.json"):  # our own sentencepiece file first: it is what the bins used
        if os.path.isfile(os.path.join(hf_dir, name)):
            tok = Tokenizer(os.path.join(hf_dir, name))
            break
    else:
        raise ValueError(f"{hf_dir} holds no tokenizer.model or tokenizer.json")
    if tok.vocab_size > model_config.d_vocab:
        raise ValueError(f"{hf_dir}: its tokenizer has {tok.vocab_size} pieces, more than the model's {model_config.d_vocab}")
    return model_config, ours, tok


def load_hf(hf_dir, device):
    """The model and tokenizer of a Hugging Face folder, as sample.py's load_model gives a checkpoint's."""
    model_config, state, tok = read_llama(hf_dir)
    model = GPT(model_config)
    model.load_state_dict(state)
    return model.to(device).eval(), tok


def import_hf(hf_dir, out_dir):
    """Write the Hugging Face folder hf_dir as out_dir/ckpt.pt, a checkpoint at step 0: sample.py takes it, and
    train.py --init_from=resume fine-tunes it on bins made with the same tokenizer."""
    model_config, state, tok = read_llama(hf_dir)
    model = GPT(model_config)
    model.load_state_dict(state)
    shape = asdict(model_config)
    checkpoint = {
        "model": model.state_dict(), "model_config": shape,
        "optimizer": model.configure_optimizer(0.0, 0.0, (0.9, 0.95), fused=False).state_dict(),
        "train_config": shape,  # the shape only: everything else comes from the command that resumes it
        "iter_num": 0, "best_val_loss": float("inf"), "loss_since_log": (0.0, 0),
        "tokenizer": {"file": os.path.abspath(tok.model_file), "sha256": tok.sha256(), "model": tok.proto},
        "meta": None,  # no bins yet: a resume checks the tokenizer of the bins it is given against this one
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.empty(0)},
    }
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "ckpt.pt")) as f:
        torch.save(checkpoint, f)


def main():
    parser = Parser(__doc__, "export.py")
    parser.add_argument("--out_dir", default="", type=run_folder, help="the training run: ckpt.pt is read from it, or written by --from_hf")
    parser.add_argument("--hf_dir", default="", help="the Hugging Face folder to write")
    parser.add_argument("--from_hf", default="", help="a Hugging Face folder to import into --out_dir")
    parser.add_argument("--push_to_hub", default="", help="also upload --hf_dir to this hub repo (user/name)")
    parser.add_argument("--step", type=int, default=None, help="export the snapshot of this step (train.py --keep_checkpoints)")
    parser.add_argument("--overwrite", type=boolean, nargs="?", const=True, default=False,
                        help="replace the files of an --hf_dir that is not empty, or the ckpt.pt of an import's --out_dir")
    args = parser.parse_args()
    if not args.out_dir or bool(args.hf_dir) == bool(args.from_hf):
        die("give --out_dir and either --hf_dir (export) or --from_hf (import); --help shows both")
    if args.from_hf and (args.step is not None or args.push_to_hub):
        die("--step and --push_to_hub go with an export (--hf_dir), not an import (--from_hf)")
    if args.from_hf:
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        if os.path.exists(ckpt_path) and not args.overwrite:
            die(f"{ckpt_path} exists: import into another --out_dir, or replace it with --overwrite=True")
        problem = folder_problem(args.out_dir)
        if problem:
            die(f"--out_dir={args.out_dir} cannot be written: {problem}; choose another --out_dir")
        try:
            import_hf(args.from_hf, args.out_dir)
            from sample import snapshot_path, snapshot_steps

            # --overwrite over a training run: its log and snapshots go with its checkpoint, or sample.py --step
            # would serve that run's weights as the import's
            for old in [os.path.join(args.out_dir, "log.jsonl")] + [snapshot_path(args.out_dir, s) for s in snapshot_steps(args.out_dir)]:
                if os.path.exists(old):
                    os.remove(old)
        except OSError as e:
            die(f"cannot write {ckpt_path}: {e.strerror or e}; choose another --out_dir")
        print(f"wrote {ckpt_path} from {args.from_hf}")
    else:
        if args.step is not None and args.step < 0:
            die(f"--step={args.step} must be 0 or more")
        if args.push_to_hub:
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(args.push_to_hub)
            except ValueError as e:
                die(f"--push_to_hub={args.push_to_hub} is not a hub repo id (user/name): {e}")
        problem = folder_problem(args.hf_dir)
        if problem:
            die(f"--hf_dir={args.hf_dir} cannot be written: {problem}; choose another --hf_dir")
        if os.path.isdir(args.hf_dir) and os.listdir(args.hf_dir) and not args.overwrite:
            die(f"--hf_dir={args.hf_dir} is not empty; give --overwrite=True to replace its files, or another --hf_dir")
        try:
            export(args.out_dir, args.hf_dir, args.push_to_hub, args.step)
        except OSError as e:
            die(f"cannot write {args.hf_dir}: {e.strerror or e}; choose another --hf_dir")
        print(f"wrote {args.hf_dir}: " + ", ".join(sorted(os.listdir(args.hf_dir))))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        die(str(e))
