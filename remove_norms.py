"""Remove the norms of a trained model by fine-tuning, after Baroni et al. 2025 (arXiv 2507.02559).

    python remove_norms.py --out_dir=out/quickstart                 # writes out/quickstart_normfree/ckpt.pt
    python remove_norms.py --out_dir=out/5m --steps_per_group=300 --learning_rate=3e-4 --out=out/5m_nonorm

Each RMSNorm divides a token's residual vector by its own RMS. Here, one group at a time (the MLP norms, then
the attention norms, then the final norm), each norm of the group is replaced by a FixedNorm, x * weight /
scale, whose scale is the mean RMS (with RMSNorm's epsilon) of that norm's input, measured on train batches
just before the group goes; then the model trains for --steps_per_group steps with it, and after the last
group for --final_steps more, the learning rate decaying linearly to 0. A token whose RMS is the mean one
sees no change; the fine-tuning teaches the model to live with the others.

BOS and EOS: in a pre-norm model the first token and the tokens that start or end a story carry residual
vectors many times larger than the rest (attention sinks). Baroni et al. leave them out of the average
(their average std is taken over positions 1 and on, and their auxiliary loss sets its target from the
positions that are neither BOS nor EOS); so does this script: the mean RMS is taken over tokens that are not
BOS or EOS and not the first of their window. Those tokens are scaled by the same fixed number as all others
afterwards (the paper's code also tried a separate fixed scale for position 0; a scale that depends on the
position would not be a norm-free LlamaForCausalLM, so it is not done here).

Writes --out/ckpt.pt (default: out_dir + "_normfree"), a train.py checkpoint of the model with norm='none':
sample.py, evaluate.py and export.py take it, and train.py --init_from=resume trains it further (from step 0,
with the settings of the run it came from, and with AdamW, whose state the fine-tuning leaves, even after Muon).
Prints the val loss (train.py's: the mean over eval_seqs fixed windows of val.bin) before, right after each
group's removal, and after its fine-tuning.
"""

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from configurator import Parser, atomic_write, autocast_for, boolean, die, folder_problem, pick_device, run_folder
from model import FixedNorm
from prepare import SPLITS, open_bins

GROUPS = ("mlp", "attention", "final")  # the order the norms go in, as in the paper (ln2, then ln1, then ln_f)


def group_norms(model, group):
    """[(module holding the norm, attribute name)] of one group: 'mlp', 'attention' or 'final'."""
    if group == "final":
        return [(model, "norm")]
    name = {"mlp": "mlp_norm", "attention": "attn_norm"}[group]
    return [(block, name) for block in model.blocks]


@torch.no_grad()
def measure_scales(model, norms, batches, bos_id, eos_id, autocast=nullcontext()):
    """The mean RMS, sqrt(mean(x^2) + eps) as RMSNorm divides by, of each norm's input x over the tokens of batches
    ((B, T) token ids) that are neither BOS nor EOS nor the first of their window; one float per norm."""
    sums = torch.zeros(len(norms), dtype=torch.float64)
    count = 0
    inputs = []
    hooks = [getattr(parent, name).register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for parent, name in norms]
    try:
        for x in batches:
            keep = (x != bos_id) & (x != eos_id)
            keep[:, 0] = False
            inputs.clear()
            with autocast:
                model(x)
            for i, ((parent, name), h) in enumerate(zip(norms, inputs)):
                eps = getattr(parent, name).eps
                rms = (h.float().pow(2).mean(-1) + eps).sqrt()
                sums[i] += rms[keep].double().sum().cpu()
            count += int(keep.sum())
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise ValueError("the batches hold no token that is not BOS, EOS or first in its window: nothing to measure")
    return (sums / count).tolist()


def freeze(norms, scales):
    """Replace each RMSNorm of norms by a FixedNorm of its scale, sharing its weight (the same Parameter: an
    optimizer made before goes on training it)."""
    for (parent, name), scale in zip(norms, scales):
        old = getattr(parent, name)
        new = FixedNorm(old.weight.numel(), scale).to(old.weight.device)
        new.weight = old.weight
        setattr(parent, name, new)


def main():
    p = Parser(__doc__, "remove_norms.py")
    p.add_argument("--out_dir", default="", type=run_folder, help="the training run whose ckpt.pt has the model (with RMSNorm)")
    p.add_argument("--out", default="", help="where the norm-free checkpoint goes (default: out_dir + '_normfree')")
    p.add_argument("--overwrite", type=boolean, nargs="?", const=True, default=False, help="replace --out/ckpt.pt if it exists")
    p.add_argument("--dataset", default="", help="fine-tune on data/<dataset> (default: the dataset the model trained on)")
    p.add_argument("--steps_per_group", type=int, default=30, help="fine-tuning steps after each group of norms is removed")
    p.add_argument("--final_steps", type=int, default=30, help="steps after the last group, the learning rate decaying to 0")
    p.add_argument("--learning_rate", type=float, default=3e-4, help="AdamW's learning rate (after 10 steps of warmup)")
    p.add_argument("--weight_decay", type=float, default=0.1, help="on matrices only, as in train.py")
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm; 0: off")
    p.add_argument("--batch_size", type=int, default=16, help="windows of n_ctx tokens per step")
    p.add_argument("--measure_batches", type=int, default=4, help="train batches the mean RMS of each norm is measured on")
    p.add_argument("--eval_seqs", type=int, default=0, help="val windows for the val loss (0: the run's eval_seqs)")
    p.add_argument("--seed", type=int, default=1337, help="seeds the batches")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    args = p.parse_args()
    if not args.out_dir:
        die("give --out_dir, the training run whose model loses its norms")
    for flag in ("steps_per_group", "final_steps", "eval_seqs", "seed"):
        if getattr(args, flag) < 0:
            die(f"--{flag}={getattr(args, flag)} must be 0 or more")
    for flag in ("batch_size", "measure_batches"):
        if getattr(args, flag) < 1:
            die(f"--{flag}={getattr(args, flag)} must be at least 1")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        die(f"--learning_rate={args.learning_rate} must be a finite number above 0: at 0 the fine-tuning changes nothing")
    for name in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            die(f"--{name}={getattr(args, name)} must be a finite number, 0 or more")
    out = args.out or args.out_dir.rstrip("/") + "_normfree"
    out_path = os.path.join(out, "ckpt.pt")
    if os.path.exists(out_path) and not args.overwrite:
        die(f"{out_path} exists: give another --out, or --overwrite")
    problem = folder_problem(out)
    if problem:
        die(f"--out={out} cannot be written: {problem}; choose another --out")

    from sample import load_model

    device = pick_device(args.device)
    try:
        model, tok = load_model(args.out_dir, device)
    except ValueError as e:
        die(str(e))
    if model.config.norm != "rms":
        die(f"{args.out_dir}/ckpt.pt has norm={model.config.norm!r}: it has no norms to remove")
    checkpoint = torch.load(os.path.join(args.out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    train_config = checkpoint["train_config"]
    dataset = args.dataset or train_config.get("dataset")
    if not dataset:
        die(f"{args.out_dir}/ckpt.pt does not say which data it trained on (an imported model); give --dataset")
    data_dir = os.path.join("data", dataset)
    try:
        meta, data = open_bins(data_dir)
    except ValueError as e:
        die(str(e))
    if meta["tokenizer_sha256"] != tok.sha256():
        die(f"{data_dir} was prepared with another tokenizer than {args.out_dir}/ckpt.pt has; give the --dataset it trained on")
    n_ctx = model.config.n_ctx
    for split in SPLITS:
        if len(data[split]) < n_ctx + 2:
            die(f"{data_dir}/{split}.bin holds {len(data[split])} tokens, fewer than n_ctx + 2 = {n_ctx + 2}; give more stories")

    autocast = autocast_for(device)
    rng = np.random.default_rng(args.seed)

    def train_batch():
        starts = rng.integers(0, len(data["train"]) - n_ctx - 1, size=args.batch_size)
        w = torch.from_numpy(np.stack([data["train"][s:s + n_ctx + 1] for s in starts]).astype(np.int64)).to(device)
        return w[:, :-1], w[:, 1:]

    eval_seqs = args.eval_seqs or train_config.get("eval_seqs", 256)
    n_val = len(data["val"])
    val_starts = np.linspace(0, n_val - n_ctx - 1, num=min(eval_seqs, max(1, (n_val - 1) // n_ctx))).astype(np.int64)

    @torch.no_grad()
    def val_loss():
        """train.py's val loss: mean cross-entropy over the fixed windows spread evenly over val.bin."""
        model.eval()
        total, n = 0.0, 0
        for i in range(0, len(val_starts), args.batch_size):
            w = torch.from_numpy(np.stack([data["val"][s:s + n_ctx + 1] for s in val_starts[i:i + args.batch_size]])
                                 .astype(np.int64)).to(device)
            with autocast:
                logits, _ = model(w[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
            n += w[:, 1:].numel()
        model.train()
        return total / n

    optimizer = model.configure_optimizer(args.learning_rate, args.weight_decay, (0.9, 0.95), fused=device.startswith("cuda"))
    total_steps = len(GROUPS) * args.steps_per_group + args.final_steps
    step = 0

    def train(n_steps):
        nonlocal step
        model.train()
        losses = []
        for _ in range(n_steps):
            lr = args.learning_rate * min(1.0, (step + 1) / 10)
            if step >= total_steps - args.final_steps:  # after the last group: linear decay to 0
                lr *= (total_steps - step) / (args.final_steps + 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = train_batch()
            with autocast:
                loss = model(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
        return sum(losses[-10:]) / max(1, len(losses[-10:]))

    def diverged(what, value, when):
        """value, if it is a finite number; else the run stops, writing nothing, as train.py's would."""
        if not math.isfinite(value):
            die(f"the {what} is {value} {when}: the fine-tuning diverged and nothing was written; "
                f"lower --learning_rate (now {args.learning_rate:g})")
        return value

    t0 = time.time()
    before = val_loss()
    print(f"{args.out_dir}: val loss {before:.4f} with RMSNorm")
    record = {"val_loss_rms": before, "groups": []}
    for group in GROUPS:
        norms = group_norms(model, group)
        model.eval()
        scales = measure_scales(model, norms, [train_batch()[0] for _ in range(args.measure_batches)], tok.bos_id, tok.eos_id, autocast)
        freeze(norms, scales)
        when = f"with the {group} norms fixed"
        right_after = diverged("val loss", val_loss(), when)
        train_loss = diverged("train loss", train(args.steps_per_group), when)
        after = diverged("val loss", val_loss(), when)
        print(f"{group} norms -> fixed scales {', '.join(f'{s:.3g}' for s in scales)}: val loss {right_after:.4f} right after, "
              f"{after:.4f} after {args.steps_per_group} steps (train loss {train_loss:.4f}) | {time.time() - t0:.0f} s", flush=True)
        record["groups"].append({"group": group, "scales": scales, "val_loss_right_after": right_after, "val_loss_after": after})
    if args.final_steps:
        diverged("train loss", train(args.final_steps), "in the final steps")
    final = diverged("val loss", val_loss(), "after the final steps")
    diverged("sum of the weights", sum(p.double().sum().item() for p in model.parameters()), "after the final steps")
    print(f"norm-free: val loss {final:.4f} after {args.final_steps} final steps ({final - before:+.4f} against RMSNorm)")
    model.config.norm = "none"

    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_config": asdict(model.config),
        # a resume trains it further from step 0 with the settings of the run it came from, and no norms; its
        # optimizer state is the fine-tuning's AdamW, whatever optimizer the run used
        "train_config": {**train_config, "norm": "none", "dataset": dataset, "out_dir": out, "optimizer": "adamw"},
        "iter_num": 0, "best_val_loss": final, "loss_since_log": (0.0, 0),
        "tokenizer": checkpoint["tokenizer"], "meta": meta,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.empty(0)},
        "remove_norms": {**record, "val_loss": final, "steps_per_group": args.steps_per_group, "final_steps": args.final_steps,
                         "learning_rate": args.learning_rate, "batch_size": args.batch_size},
    }
    try:
        os.makedirs(out, exist_ok=True)
        with atomic_write(out_path) as f:
            torch.save(state, f)
    except OSError as e:
        die(f"cannot write {out_path}: {e.strerror}; choose another --out")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the checkpoint is written at the end, whole or not at all
        die("interrupted; nothing was written")
