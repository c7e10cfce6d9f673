"""Print stories sampled from a trained model.

    python sample.py --out_dir=out/quickstart
    python sample.py --out_dir=out/5m --num_samples=5 --temperature=0.8 --top_k=50 --prompt="Once there was a fox"
    python sample.py --out_dir=out/5m --prompt_file=prompts.txt   # one prompt per line
    python sample.py --hf_dir=hf/SimpleStories-35M --prompt="The cat"   # a Hugging Face folder (export.py)
    python sample.py --out_dir=out/5m --step=512   # the snapshot of step 512 (train.py --keep_checkpoints)

Each story starts at BOS (followed by the prompt, if any) and ends at EOS, the end of the context,
or after --max_new_tokens; generation uses the model's KV cache. The tokenizer is the one the model
was trained with, kept in its checkpoint, so this runs from any folder. --compile runs the decode step
through torch.compile (CUDA graphs on a GPU): it pays for many prompts (--prompt_file), not for a few
stories; README's "Sampling fast" has the numbers.
"""

import hashlib
import json
import math
import os
import re
from dataclasses import asdict

import torch

from configurator import Parser, autocast_for, boolean, die, pick_device, run_folder
from model import GPT, GPTConfig
from tokenizer import Tokenizer


SNAPSHOTS = "checkpoints"  # the folder of out_dir where train.py --keep_checkpoints puts its snapshots


def snapshot_path(out_dir, step):
    """Where train.py keeps the model of step `step` (--keep_checkpoints): out_dir/checkpoints/step_0000512.safetensors."""
    return os.path.join(out_dir, SNAPSHOTS, f"step_{step:07d}.safetensors")


def snapshot_steps(out_dir):
    """The steps of the snapshots in out_dir, in order."""
    folder = os.path.join(out_dir, SNAPSHOTS)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[5:-12]) for n in names if re.fullmatch(r"step_\d{7,}\.safetensors", n))


def load_snapshot(model, out_dir, step, tokenizer_sha256):
    """Load the weights of out_dir's snapshot of step `step` into model (of the run's shape, from ckpt.pt)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = snapshot_path(out_dir, step)
    if not os.path.isfile(path):
        steps = snapshot_steps(out_dir)
        kept = (f"it kept steps {', '.join(map(str, steps[:12]))}{' ...' if len(steps) > 12 else ''}" if steps else
                "it kept none: train with --keep_checkpoints=log (or linear:N)")
        raise ValueError(f"{out_dir} has no snapshot of step {step}: {kept}")
    try:
        with safe_open(path, "pt") as f:
            info = f.metadata() or {}
        state = load_file(path)
        if json.loads(info["model_config"]) != asdict(model.config) or info["tokenizer_sha256"] != tokenizer_sha256:
            raise ValueError(f"{path} is from another run than {out_dir}/ckpt.pt (another shape or tokenizer); "
                             f"keep snapshots with the run that made them")
        model.load_state_dict({**state, "lm_head.weight": state["embed.weight"]})  # the output embedding is tied
    except (SafetensorError, OSError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read snapshot {path} ({type(e).__name__}): it is corrupt or not from train.py") from None


def load_model(out_dir, device, hf_dir="", step=None):
    """The model in out_dir/ckpt.pt and the tokenizer it was trained with, saved beside it; with step, the weights
    of that step's snapshot (train.py --keep_checkpoints) instead; or, with hf_dir, the model and tokenizer of a
    Hugging Face folder of our family (export.py reads it)."""
    if hf_dir:
        from export import load_hf

        return load_hf(hf_dir, device)
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; train a model with train.py first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        saved = checkpoint["tokenizer"]
        tokenizer_file, proto, sha256 = saved["file"], saved["model"], saved["sha256"]
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} ({type(e).__name__}): it is corrupt or not from train.py") from None
    if hashlib.sha256(proto).hexdigest() != sha256:
        raise ValueError(f"the tokenizer saved in {path} does not match its sha256: the checkpoint is corrupt")
    tokenizer = Tokenizer(tokenizer_file, proto)
    if tokenizer.vocab_size != model.config.d_vocab:
        raise ValueError(f"{path}: its tokenizer has {tokenizer.vocab_size} pieces but the model {model.config.d_vocab}; "
                         f"the checkpoint is corrupt")
    if step is not None:
        load_snapshot(model, out_dir, step, sha256)
    broken = [name for name, w in model.named_parameters() if not torch.isfinite(w).all()]  # the tied matrix once
    if broken:  # a damaged file, or a snapshot of a run that diverged: sampling and losses would be NaN
        raise ValueError(f"{path if step is None else snapshot_path(out_dir, step)} holds weights that are not finite "
                         f"numbers ({broken[0]}{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}): it is "
                         f"damaged or its run diverged; use another checkpoint or --step")
    return model.to(device).eval(), tokenizer


def main():
    parser = Parser(__doc__, "sample.py")
    parser.add_argument("--out_dir", default="out/quickstart", type=run_folder, help="training run folder holding ckpt.pt")
    parser.add_argument("--hf_dir", default="", help="a Hugging Face model folder instead (ours exported, or published)")
    parser.add_argument("--step", type=int, default=None, help="the snapshot of this step (train.py --keep_checkpoints)")
    parser.add_argument("--num_samples", type=int, default=3, help="stories per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=400, help="tokens after the prompt, at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 (or under 1e-5): greedy")
    parser.add_argument("--top_k", type=int, default=50, help="0: off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1.0: off")
    parser.add_argument("--prompt", default="", help="start of every story")
    parser.add_argument("--prompt_file", default="", help="a file with one prompt per line (instead of --prompt)")
    parser.add_argument("--seed", type=int, default=1337, help="seeds the sampling")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    parser.add_argument("--compile", type=boolean, nargs="?", const=True, default=False,
                        help="compile the decode step (once per batch size and 64 positions: 20 s-3 min on a CPU): for many prompts")
    args = parser.parse_args()
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)} must be at least 1")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature={args.temperature} must be a finite number, 0 or more (0: greedy)")
    if args.top_k < 0:
        raise ValueError(f"--top_k={args.top_k} must not be negative (0: no top-k)")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p={args.top_p} must be in (0, 1] (1: no top-p)")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed={args.seed} must be between 0 and 2**63 - 1")
    if args.prompt and args.prompt_file:
        raise ValueError("give --prompt or --prompt_file, not both")
    if args.step is not None and (args.step < 0 or args.hf_dir):
        raise ValueError("--step picks a snapshot of --out_dir's run: a step of 0 or more, and no --hf_dir")

    prompts = [args.prompt]
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise ValueError(f"cannot read prompt file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"prompt file {args.prompt_file} is not UTF-8 text") from None
        if not prompts:
            raise ValueError(f"prompt file {args.prompt_file} has no prompts: write one per line")
    device = pick_device(args.device)
    model, tok = load_model(args.out_dir, device, args.hf_dir, args.step)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = autocast_for(device)
    for prompt in prompts:
        ids = tok.encode(prompt, bos=True)
        if len(ids) >= model.config.n_ctx:
            raise ValueError(f"prompt {prompt[:40]!r}... is {len(ids)} tokens, leaving no room in the model's context of {model.config.n_ctx}")
        idx = torch.tensor([ids] * args.num_samples, device=device)
        with autocast:
            out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, tok.eos_id, generator,
                                 compile=args.compile)
        for row in out.tolist():
            new = row[idx.size(1):]
            new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
            print(prompt + tok.continuation(row[:idx.size(1)], new))
            print("-" * 40)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted")
