"""Train a SimpleStories model: one script for CPU, one GPU and many GPUs.

    python train.py configs/quickstart.py                      # CPU, minutes
    python train.py configs/5m.py --max_iters=2000              # one GPU: bf16, TF32, torch.compile, fused AdamW
    torchrun --standalone --nproc_per_node=8 train.py configs/35m.py   # DDP
    python train.py configs/5m.py --init_from=resume            # go on from out_dir/ckpt.pt

Settings are the globals below. A config file (plain `name = value` lines) overrides them, then
`--key=value` flags override that; an unknown key, a value of the wrong type or out of its range is an
error. The global batch (tokens_per_step) is the same whatever the number of devices: gradient
accumulation makes up the rest. Batches are drawn from a generator seeded by (seed, step), so a
resumed run sees exactly the batches it would have seen, and on CPU ends with the same weights.

Writes out_dir/ckpt.pt (atomically, at each evaluation and at the end) and out_dir/log.jsonl. The
checkpoint keeps the tokenizer it was trained with and the meta.json of its bins: a resume refuses
bins or a tokenizer made since, and settings (config file or flag) that would change its batches.

--keep_checkpoints=log keeps the model's weights over training, for studies of training dynamics: at steps
0, 1, 2, 4, 8, ... (powers of two), at every evaluation and at the last step; linear:N at every N steps and
the last. Each is out_dir/checkpoints/step_0000512.safetensors (float32 weights, the output embedding tied to
the input one and stored once; metadata: step, model_config, tokenizer_sha256, and val_loss at an evaluation).
`sample.py`, `evaluate.py`, `activations.py` and `export.py` take --step=512 to use one. A resume drops the
snapshots after its checkpoint (a killed run's), and a scratch run drops those of the run it replaces.
"""

import signal
import sys

# Ctrl-C while torch loads or the run is set up: nothing is written before the training loop, whose handler replaces this one
signal.signal(signal.SIGINT, lambda signum, frame: sys.exit("error: interrupted before training started; nothing was written"))

import inspect
import json
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import configurator
from configurator import atomic_write, die
from model import GPT, GPTConfig
from prepare import SPLITS, open_bins, read_offsets, story_windows, window_tokens
from sample import snapshot_path, snapshot_steps
from tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------
# data and output
dataset = "sample"  # reads data/<dataset>/{train,val}.bin and meta.json from prepare.py
out_dir = "out/run"  # ckpt.pt and log.jsonl go here
init_from = "scratch"  # 'scratch', or 'resume' from out_dir/ckpt.pt with the settings saved there
overwrite = False  # let a scratch run replace the checkpoint already in out_dir
windows = "random"  # training windows: 'random' (start anywhere, cross stories) or 'story' (start at a BOS, whole stories packed)
synthetic_data = False  # train on one micro-batch of random tokens made on the device, never reading train.bin: the baseline bench.py compares real bins with
keep_checkpoints = ""  # model snapshots in out_dir/checkpoints: 'log' (steps 0, 1, 2, 4, 8, ... and each evaluation), 'linear:N'
# model (GPTConfig)
n_layers = 6  # transformer blocks
d_model = 256  # width of the residual stream
n_heads = 4  # attention heads (query heads)
n_kv_heads = 2  # key/value heads shared by the query heads (grouped-query attention)
d_mlp = 0  # hidden width of the SwiGLU MLP; 0: int(8 * d_model / 3), rounded up to d_mlp_multiple
d_mlp_multiple = 1  # round the default d_mlp up to a multiple of this (64: whole tensor-core tiles); 1: the suite's exact shapes
n_ctx = 512  # context length in tokens
d_vocab = 4096  # must equal the vocab_size in meta.json
rope_base = 10000.0  # RoPE frequency base
norm_eps = 1e-6  # RMSNorm epsilon
norm = "rms"  # 'rms': RMSNorm; 'none': no normalization (each norm a fixed scale; see README, Models without normalization)
# optimization: AdamW (or Muon on the hidden matrices), linear warmup then cosine (or warmup-stable-decay) schedule
tokens_per_step = 32768  # global batch in tokens, whatever the number of devices
batch_size = 16  # sequences per device per micro-step, at most; gradient accumulation makes up tokens_per_step
max_iters = 20000  # optimizer steps
optimizer = "adamw"  # 'adamw', or 'muon': Muon (model.Muon) on the attention and MLP matrices, AdamW on embedding and norms
learning_rate = 1e-3  # peak learning rate (AdamW's), reached after warmup_iters
muon_lr = 0.0  # Muon's peak learning rate, on AdamW's scale (Muon matches its update's size to AdamW's); 0: learning_rate
muon_momentum = 0.95  # Muon's Nesterov momentum
lr_schedule = "cosine"  # after warmup: 'cosine' down to min_lr_ratio, or 'wsd': constant, then linear down over the last decay_fraction
decay_fraction = 0.2  # wsd: the share of the steps to lr_decay_iters spent decaying
min_lr_ratio = 0.1  # the schedule ends at the peak learning rate * min_lr_ratio
warmup_iters = 500  # steps of linear warmup from 0
lr_decay_iters = 0  # length of the schedule; 0: max_iters (set it to stop early now and resume later)
weight_decay = 0.1  # on matrices only, not on norm weights
beta1 = 0.9  # AdamW's first-moment decay
beta2 = 0.95  # AdamW's second-moment decay
grad_clip = 1.0  # max global gradient norm; 0: off
# evaluation and logging
eval_interval = 500  # steps between evaluations (and checkpoints)
eval_seqs = 256  # fixed val windows of n_ctx tokens, spread evenly over val.bin
log_interval = 10  # steps between log lines
sample_tokens = 200  # a story of up to this many tokens is printed at each evaluation; 0: none
wandb_log = False  # send the log to Weights & Biases too
wandb_project = "simplestories"  # Weights & Biases project
wandb_run_name = ""  # Weights & Biases run name; "": out_dir's name
# system
device = "auto"  # 'auto' (cuda if there is one), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = "auto"  # 'auto' (bfloat16 autocast on a GPU that has it or a CPU with AMX or AVX512_BF16, else float32), 'float32', 'bfloat16'
compile = True  # torch.compile the model
compile_mode = "auto"  # torch.compile's mode: 'auto' ('reduce-overhead' where CUDA graphs can run, else 'default'); 'default'; 'reduce-overhead' (CUDA graphs: one GPU, one micro-step); 'max-autotune-no-cudagraphs' (the fastest of several kernels per matmul, a longer compile); 'max-autotune' (both)
peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0: look the GPU up in configurator.PEAK_FLOPS
seed = 1337  # seeds the weights, the batches and the samples
# ----------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and type(v) in (int, float, bool, str)}
CHECKS = [  # the range of each setting, checked once the command line and a resumed checkpoint are read
    (("n_layers", "d_model", "n_heads", "n_kv_heads", "n_ctx", "d_vocab", "tokens_per_step", "batch_size", "eval_interval",
      "eval_seqs", "log_interval"), lambda v: v >= 1, "at least 1"),
    (("d_mlp", "muon_lr", "max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "learning_rate", "weight_decay", "grad_clip",
      "peak_flops"), lambda v: v >= 0, "0 or more"),
    (("rope_base", "norm_eps"), lambda v: v > 0, "positive"),
    (("min_lr_ratio", "decay_fraction"), lambda v: 0 <= v <= 1, "between 0 and 1"),
    (("beta1", "beta2", "muon_momentum"), lambda v: 0 <= v < 1, "at least 0 and below 1"),
    (("d_mlp_multiple",), lambda v: v >= 1, "at least 1"),
    (("optimizer",), lambda v: v in ("adamw", "muon"), "'adamw' or 'muon'"),
    (("lr_schedule",), lambda v: v in ("cosine", "wsd"), "'cosine' or 'wsd'"),
    (("seed",), lambda v: 0 <= v < 2**63, "between 0 and 2**63 - 1"),
    (("init_from",), lambda v: v in ("scratch", "resume"), "'scratch' or 'resume'"),
    (("norm",), lambda v: v in ("rms", "none"), "'rms' (RMSNorm) or 'none' (no normalization)"),
    (("dtype",), lambda v: v in ("auto", "float32", "bfloat16"), "'auto', 'float32' or 'bfloat16'"),
    (("windows",), lambda v: v in ("random", "story"), "'random' or 'story'"),
    (("compile_mode",), lambda v: v in ("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"),
     "'auto', 'default', 'reduce-overhead', 'max-autotune-no-cudagraphs' or 'max-autotune'"),
    (("keep_checkpoints",), lambda v: v in ("", "log") or re.fullmatch(r"linear:[1-9][0-9]*", v),
     "'' (none), 'log' or 'linear:N' with N at least 1"),
]
# settings a resumed run must keep: those that decide which batches a step sees, and the model's shape
FIXED_ON_RESUME = ("dataset", "seed", "tokens_per_step", "n_ctx", "windows", "synthetic_data", "n_layers", "d_model", "n_heads", "n_kv_heads",
                   "d_mlp", "d_mlp_multiple", "d_vocab", "rope_base", "norm_eps", "norm")

given = configurator.parse(sys.argv[1:], DEFAULTS, __doc__, __file__)  # config files and flags alike
settings = {**DEFAULTS, **given}
ckpt_path = os.path.join(settings["out_dir"], "ckpt.pt")
if os.path.isfile(settings["out_dir"]):
    die(f"out_dir={settings['out_dir']} is a file, not a folder; give the run's folder, the one that holds ckpt.pt")
checkpoint, imported = None, False  # imported: a checkpoint export.py made from a Hugging Face model, without training settings
if settings["init_from"] == "resume":
    if not os.path.isfile(ckpt_path):
        die(f"cannot resume: {ckpt_path} does not exist; start with --init_from=scratch")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = checkpoint["train_config"]
        model_config = GPTConfig(**checkpoint["model_config"])
        missing = {"model", "optimizer", "iter_num", "best_val_loss", "tokenizer", "meta", "loss_since_log", "rng"} - set(checkpoint)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except Exception as e:
        die(f"cannot read checkpoint {ckpt_path} ({type(e).__name__}): it is corrupt or not from train.py; "
            f"delete it or start with --init_from=scratch")
    imported = checkpoint["meta"] is None
    # the run goes on with the settings it was started with; only those given now change them
    settings = {**configurator.resume(DEFAULTS, given, saved, FIXED_ON_RESUME, ckpt_path), "init_from": "resume"}
    # (a model imported by export.py has no optimizer state yet: any optimizer can start on it)
    if not imported and settings["optimizer"] != saved["optimizer"]:
        die(f"{ckpt_path} was trained with optimizer={saved['optimizer']}: its optimizer state cannot go on "
            f"with optimizer={settings['optimizer']}; drop that setting or start a new out_dir")
    if settings["max_iters"] < checkpoint["iter_num"]:
        die(f"{ckpt_path} is at step {checkpoint['iter_num']}, past max_iters={settings['max_iters']}; give a larger --max_iters")
configurator.check(settings, CHECKS)
globals().update(settings)
if checkpoint is not None and max_iters == checkpoint["iter_num"]:
    print(f"{ckpt_path} is at step {max_iters} = max_iters: nothing to train; give a larger --max_iters to go on")
    sys.exit(0)
if init_from == "scratch" and os.path.exists(ckpt_path) and not overwrite:
    die(f"{ckpt_path} exists: continue it with --init_from=resume, or replace it with --overwrite=True or another --out_dir")
problem = configurator.folder_problem(out_dir)  # found now, not after the data and model are set up
if problem:
    die(f"out_dir={out_dir} cannot be written: {problem}; choose another --out_dir")
if wandb_log:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True but wandb is not installed; pip install wandb, or leave wandb_log off")
config = {k: globals()[k] for k in DEFAULTS}  # what this run uses, saved in the checkpoint

# ----------------------------------------------------------------------------------------------
# devices and processes
# torchrun sets RANK and WORLD_SIZE. One process under it runs as without it, with no DDP, which has nothing to share
# in a group of one (wrapped in DDP, a 5M step took 18.9 ms on an H100 against 11.4)
world_size = int(os.environ.get("WORLD_SIZE", "1"))
ddp = "RANK" in os.environ and world_size > 1
if ddp:
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
else:
    rank, local_rank, world_size = 0, 0, 1
device = configurator.pick_device(device, local_rank if ddp else None)
device_type = device.split(":")[0]
if ddp:
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
if device_type == "cpu" and "LOCAL_WORLD_SIZE" in os.environ:  # torchrun sets OMP_NUM_THREADS=1: share the cores instead
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["LOCAL_WORLD_SIZE"])))
master = rank == 0
if dtype == "auto":
    dtype = "bfloat16" if configurator.bf16_is_fast(device_type) else "float32"
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=torch.bfloat16)
torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the float32 matmuls left outside autocast
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(seed)

seqs_per_device, remainder = divmod(tokens_per_step, n_ctx * world_size)
if remainder or seqs_per_device == 0:
    die(f"tokens_per_step={tokens_per_step} is not a multiple of n_ctx * devices = {n_ctx} * {world_size}; change tokens_per_step")
batch_size = min(batch_size, seqs_per_device)
if seqs_per_device % batch_size:
    die(f"batch_size={batch_size} does not divide the {seqs_per_device} sequences each device gets per step; change batch_size")
grad_accum = seqs_per_device // batch_size
if compile_mode == "auto":  # CUDA graphs where they can run: on an H100, 4.7 ms a 1.25M step instead of 10.2, 9.6 a 5M step instead of 11.4
    compile_mode = "reduce-overhead" if device_type == "cuda" and grad_accum == 1 and not ddp else "default"
cuda_graphs = compile and compile_mode in ("reduce-overhead", "max-autotune") and device_type == "cuda"
if cuda_graphs and (grad_accum > 1 or ddp):
    # a CUDA graph's replay overwrites the gradients of the one before while they are still being summed
    without_graphs = "max-autotune-no-cudagraphs" if compile_mode == "max-autotune" else "default"
    die(f"compile_mode={compile_mode} (CUDA graphs) needs one micro-step per step on one device, not {grad_accum} x {world_size}: "
        f"set batch_size to tokens_per_step / n_ctx = {tokens_per_step // n_ctx} and run one process, or use compile_mode={without_graphs}")

# ----------------------------------------------------------------------------------------------
# data
data_dir = os.path.join("data", dataset)
meta_path = os.path.join(data_dir, "meta.json")
try:
    meta, _ = open_bins(data_dir)
except ValueError as e:
    die(str(e))
for split in SPLITS:
    if meta[split]["tokens"] < n_ctx + 2:
        die(f"{data_dir}/{split}.bin has {meta[split]['tokens']} tokens, too few for a window of n_ctx + 1 = {n_ctx + 1}; "
            "give more stories or a smaller n_ctx")

if windows == "story":
    try:
        train_offsets = read_offsets(data_dir, "train")  # where each story's BOS is: story windows start there
    except ValueError as e:
        die(f"windows=story needs the story offsets: {e}")


def data_identity(m):
    """What makes bins the same bins, from their meta.json: the tokenizer that encoded them, their sizes and the
    sha256 of each bin (which a meta.json of an older prepare.py does not hold)."""
    return {"tokenizer sha256": m["tokenizer_sha256"],
            **{f"{s} {n}": m[s][n] for s in ("train", "val") for n in ("stories", "tokens", "sha256") if n in m[s]}}


if imported:  # by export.py: no bins yet, a tokenizer
    if checkpoint["tokenizer"]["sha256"] != meta["tokenizer_sha256"]:
        die(f"{data_dir} was prepared with another tokenizer than {ckpt_path} has; prepare the bins with its tokenizer, "
            f"{checkpoint['tokenizer']['file']}")
elif checkpoint is not None:  # the bins it trained on, not others made since under the same name
    was, now = data_identity(checkpoint["meta"]), data_identity(meta)
    def short(v):  # a sha256's first 12 digits tell it
        return v[:12] if isinstance(v, str) else v

    changed = [f"{k} {short(was[k])} -> {short(now[k])}" for k in was if k in now and was[k] != now[k]]
    if changed:
        die(f"{data_dir} was prepared again since {ckpt_path} was written ({', '.join(changed)}); a resume needs the bins "
            f"and tokenizer it trained on: prepare them as before, or train a new out_dir")

if checkpoint is not None:  # its tokenizer is the bins' (checked above), kept in it whatever became of the file since
    tokenizer = Tokenizer(checkpoint["tokenizer"]["file"], checkpoint["tokenizer"]["model"])
else:
    if not os.path.isfile(meta["tokenizer"]):
        die(f"tokenizer {meta['tokenizer']} named in {meta_path} not found; run tokenizer.py and prepare.py again")
    tokenizer = Tokenizer(meta["tokenizer"])
    if (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sha256()) != (
            meta["vocab_size"], meta["bos_id"], meta["eos_id"], meta["tokenizer_sha256"]):
        die(f"{meta['tokenizer']} is not the tokenizer {meta_path} was made with; run prepare.py again with it")


def memmap(split):
    # a fresh memmap per batch, as nanoGPT does: a long-lived one keeps the pages it read and memory grows
    return np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")


def pinned(rows):
    """(N, n_ctx + 1) token windows (uint16, or int64 with -1 as padding) -> one int64 tensor, in pinned memory when
    it goes to a GPU."""
    t = torch.from_numpy(rows.astype(np.int64, copy=False))
    return t.pin_memory() if device_type == "cuda" else t


def to_device(rows):
    """Token windows -> inputs and targets on the device: one copy of the windows (from pinned memory, it does not
    wait for the host), of which both are views. Padding (-1, story windows only) is a target the loss ignores; as
    an input it reads as token 0 and comes after every real token of its row, which causal attention keeps from it."""
    rows = rows.to(device, non_blocking=True)
    return (rows[:, :-1].clamp(min=0) if windows == "story" else rows[:, :-1]), rows[:, 1:]


def get_batch(step, micro_step):
    """This rank's micro-batch and its weight in the step's loss. The step's global batch comes from (seed, step)
    alone, whatever the devices. Random windows start anywhere in train.bin; story windows start at a story's BOS
    and hold whole stories, packed, the rest padding (prepare.story_windows). The step's windows are packed whole,
    then this rank's are read. The weight, the micro-batch's share of the step's scored targets times world_size
    (DDP averages over ranks), makes the step's loss the mean over all its scored targets, however the windows are
    split into micro-batches and ranks: with padding, a mean of the micro-batches' means would weigh short ones more."""
    data = memmap("train")
    rng = np.random.default_rng([seed, step])
    first = (micro_step * world_size + rank) * batch_size
    if windows == "random":
        starts = rng.integers(0, len(data) - n_ctx - 1, size=tokens_per_step // n_ctx)
        return pinned(np.stack([data[s:s + n_ctx + 1] for s in starts[first:first + batch_size]])), 1 / grad_accum
    packed = story_windows(train_offsets, len(data), n_ctx + 1, tokens_per_step // n_ctx, rng)
    scored = [sum(length for _, length in window) - 1 for window in packed]  # targets: every token but a window's first
    weight = sum(scored[first:first + batch_size]) * world_size / max(1, sum(scored))
    return pinned(window_tokens(data, packed[first:first + batch_size], n_ctx + 1)), weight


def train_batches(first_step):
    """The micro-batches (inputs, targets, weight: get_batch) from first_step on, in training order, on the device. Each is read from the bins (and
    pinned) in a background thread while the model trains on the one before: the device does not wait for the disk."""
    if synthetic_data:  # what a step costs when the data costs nothing
        rows = torch.randint(d_vocab, (batch_size, n_ctx + 1), device=device)
        while True:
            yield rows[:, :-1], rows[:, 1:], 1 / grad_accum
    order = ((step, micro_step) for step in range(first_step, max_iters) for micro_step in range(grad_accum))
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(get_batch, *next(order))
        for key in order:
            (rows, weight), pending = pending.result(), reader.submit(get_batch, *key)
            yield *to_device(rows), weight
        rows, weight = pending.result()
        yield *to_device(rows), weight


def val_windows():
    """This rank's share of the fixed val windows: eval_seqs starts spread evenly over val.bin."""
    n = meta["val"]["tokens"]
    starts = np.linspace(0, n - n_ctx - 1, num=min(eval_seqs, max(1, (n - 1) // n_ctx))).astype(np.int64)
    return starts[rank::world_size]


# ----------------------------------------------------------------------------------------------
# model, optimizer, tokenizer
iter_num, best_val_loss, saved_step = 0, float("inf"), None  # saved_step: the step of the checkpoint in out_dir
if checkpoint is not None:
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    saved_step = iter_num
else:
    try:
        model_config = GPTConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, d_mlp=d_mlp,
                                 n_ctx=n_ctx, d_vocab=d_vocab, rope_base=rope_base, norm_eps=norm_eps, norm=norm,
                                 d_mlp_multiple=d_mlp_multiple)
    except ValueError as e:
        die(str(e))
if meta["vocab_size"] != model_config.d_vocab:
    die(f"{meta_path} has vocab_size {meta['vocab_size']} but the model has d_vocab={model_config.d_vocab}; "
        f"set --d_vocab={meta['vocab_size']} or prepare the data with a {model_config.d_vocab}-piece tokenizer")

raw_model = GPT(model_config).to(device)
if checkpoint is not None:
    raw_model.load_state_dict(checkpoint["model"])
opt = raw_model.configure_optimizer(learning_rate, weight_decay, (beta1, beta2), fused=device_type == "cuda",
                                    state=checkpoint["optimizer"] if checkpoint and checkpoint["meta"] else None, optimizer=optimizer,
                                    muon_lr=muon_lr, muon_momentum=muon_momentum,
                                    muon_dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)  # bf16 where it is fast
loss_sum, loss_steps = torch.zeros((), device=device), 0  # training loss since the last log line
if checkpoint is not None:
    loss_sum += checkpoint["loss_since_log"][0]
    loss_steps = checkpoint["loss_since_log"][1]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device_type == "cuda" and len(checkpoint["rng"]["cuda"]):
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
checkpoint = None  # free the memory
# dynamic=False: a graph for each batch shape, never one over symbolic sizes. A val batch of another size (the last one, or
# fewer val windows than batch_size) would otherwise make torch.compile recompile the training step with a dynamic batch
model = torch.compile(raw_model, mode=compile_mode, dynamic=False) if compile else raw_model
eval_model = model
if ddp:
    # the only buffers are the RoPE tables and FixedNorm scales, the same on every rank: no need to sync them before each forward
    # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None, **{no_sync: False})

token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float32, device=device)


def save_checkpoint():
    """Write ckpt.pt atomically (a temporary file, fsynced, renamed over the old one). It keeps the tokenizer's
    bytes, so sample.py needs nothing else, and the meta.json of the bins, so a resume can check them."""
    state = {
        "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "model_config": asdict(model_config),
        "train_config": config, "iter_num": iter_num, "best_val_loss": best_val_loss,
        "tokenizer": {"file": os.path.abspath(tokenizer.model_file), "sha256": tokenizer.sha256(), "model": tokenizer.proto},
        "meta": meta, "loss_since_log": (loss_sum.item(), loss_steps),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else torch.empty(0)},
    }
    with atomic_write(ckpt_path) as f:
        torch.save(state, f)


def stop_if_diverged(name, value):
    """End the run in one line once a loss is not a finite number, before a checkpoint of broken weights is written."""
    if not math.isfinite(value):
        kept = f"{ckpt_path} keeps step {saved_step}" if saved_step is not None else "no checkpoint was written"
        die(f"{name} is {value} at step {iter_num}: training diverged ({kept}); lower --learning_rate={learning_rate:g}"
            + ("" if grad_clip > 0 else " or set --grad_clip=1.0"))


def kept_steps(rule):
    """The steps whose model --keep_checkpoints keeps, up to max_iters."""
    if rule == "log":
        steps = {0} | {2 ** k for k in range(max_iters.bit_length())} | set(range(0, max_iters + 1, eval_interval))
    elif rule:
        steps = set(range(0, max_iters + 1, int(rule.split(":")[1])))
    else:
        return set()
    return {s for s in steps if s <= max_iters} | {max_iters}


def save_snapshot(step, val_loss):
    """Write the model's weights at step to out_dir/checkpoints (float32, the tied output embedding once)."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in raw_model.state_dict().items()
             if k != "lm_head.weight"}
    info = {"step": str(step), "model_config": json.dumps(asdict(model_config)), "tokenizer_sha256": tokenizer.sha256()}
    if val_loss is not None:
        info["val_loss"] = repr(val_loss)
    path = snapshot_path(out_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as f:
        f.write(save(state, metadata=info))


def lr_scale(step):
    """The share of its peak learning rate each parameter group uses at step: linear warmup from 0 over warmup_iters,
    then, to lr_decay_iters (0: max_iters), a cosine from 1 down to min_lr_ratio, or (wsd) 1 until the last
    decay_fraction of those steps and a straight line down to min_lr_ratio over them; min_lr_ratio from there on,
    also after a warmup that ends past lr_decay_iters."""
    decay_iters = lr_decay_iters or max_iters
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step >= decay_iters:
        return min_lr_ratio
    if lr_schedule == "wsd":
        decay_start = decay_iters * (1 - decay_fraction)
        progress = min(1.0, max(0.0, (step - decay_start) / max(1, decay_iters - decay_start)))
        return 1 - (1 - min_lr_ratio) * progress
    progress = min(1.0, (step - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate():
    """Mean loss (nats per token) and bits per byte over the fixed val windows, summed over all ranks."""
    eval_model.eval()
    data, starts = memmap("val"), val_windows()
    sums = torch.zeros(4, device=device)  # nats, tokens, nats on text tokens, their bytes (float32: MPS has no float64)
    for i in range(0, len(starts), batch_size):
        x, y = to_device(pinned(np.stack([data[s:s + n_ctx + 1] for s in starts[i:i + batch_size]])))
        if cuda_graphs:  # a new replay: the last one's outputs are used up
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            logits, _ = eval_model(x)
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        sums[0] += nll.sum()
        sums[1] += nll.numel()
        nbytes = token_bytes[y.reshape(-1)]
        sums[2] += (nll * (nbytes > 0)).sum()  # BOS/EOS carry no bytes: left out of bits per byte
        sums[3] += nbytes.sum()
    if ddp:
        dist.all_reduce(sums)
    eval_model.train()
    val_loss = (sums[0] / sums[1]).item()
    val_bpb = (sums[2] / (math.log(2) * sums[3])).item() if sums[3] > 0 else float("nan")
    return val_loss, val_bpb


def sample_story():
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[tokenizer.bos_id]], device=device)
    with autocast:
        out = raw_model.generate(idx, sample_tokens, temperature=0.8, top_k=50, eos_id=tokenizer.eos_id, generator=generator)
    return tokenizer.decode(out[0, 1:].tolist())


def device_peak_flops():
    if peak_flops:
        return peak_flops
    if device_type != "cuda":
        return 0.0
    return configurator.gpu_peak_flops(device, dtype)


# ----------------------------------------------------------------------------------------------
# training loop
def interrupted(signum, frame):
    """Ctrl-C: one line saying where the run can go on from. A checkpoint being written stays the old one (atomic_write)."""
    kept = f"{ckpt_path} keeps step {saved_step}: go on with --init_from=resume" if saved_step is not None else "no checkpoint yet"
    die(f"interrupted at step {iter_num}; {kept}")


signal.signal(signal.SIGINT, interrupted)
keep = kept_steps(keep_checkpoints)
log_file = None
if master:
    log_path = os.path.join(out_dir, "log.jsonl")
    kept = []
    if init_from == "resume" and os.path.isfile(log_path):  # a killed run logged past its checkpoint: drop that part
        for line in open(log_path):
            try:
                if json.loads(line)["step"] <= iter_num:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by the kill
    if wandb_log:  # before out_dir is touched: a run that cannot start leaves the one there as it was
        try:
            wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(out_dir.rstrip("/")), config=config)
        except Exception as e:  # no login, no network: wandb raises its own errors
            die(f"wandb.init failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); run `wandb login`, "
                "or leave wandb_log off")
    try:
        os.makedirs(out_dir, exist_ok=True)
        if init_from == "scratch" and os.path.exists(ckpt_path):  # --overwrite: the old run goes first, as a whole,
            print(f"overwrite=True: replacing the run in {out_dir}")
            os.remove(ckpt_path)  # so that no resume can go on from its checkpoint with its log and snapshots gone
        with atomic_write(log_path, "w") as f:
            f.writelines(kept)
        log_file = open(log_path, "a")
    except OSError as e:
        die(f"cannot write to out_dir={out_dir}: {e.strerror}; choose another --out_dir")
    mode = f" {compile_mode}" if compile and compile_mode != "default" else ""
    print(f"{raw_model.num_params():,} parameters | {world_size} x {device} {dtype} | compile={compile}{mode} | "
          f"{tokens_per_step:,} tokens/step = {grad_accum} micro-steps x {world_size} x {batch_size} x {n_ctx}, {windows} windows")
    if init_from == "resume":
        print(f"resuming {ckpt_path} at step {iter_num}" + (
            ": imported, it holds no training settings; this run's (train.py's defaults, then the config files and flags "
            "given) are saved with it, and its resumes keep them" if imported else ", with the settings saved in it"))
    print(f"val loss to beat: {meta['unigram_entropy']:.4f}, the unigram entropy of train.bin (nats per token)")
    # snapshots a killed run wrote after its checkpoint, or all of those of the run a scratch run replaces
    for step in snapshot_steps(out_dir):
        if init_from == "scratch" or step > iter_num:
            os.remove(snapshot_path(out_dir, step))
    if keep:
        to_write = len([s for s in keep if s > iter_num or s == iter_num and not os.path.exists(snapshot_path(out_dir, s))])
        size = sum(p.numel() for p in raw_model.parameters()) * 4 + 1024  # float32, and the header
        print(f"keep_checkpoints={keep_checkpoints}: {to_write} snapshots of {size / 1e6:.1f} MB = {to_write * size / 1e6:,.1f} MB "
              f"in {os.path.join(out_dir, 'checkpoints')}")


def log(record, line):
    if master:
        print(line, flush=True)
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
        if wandb_log:
            wandb.log(record, step=record["step"])


peak = device_peak_flops() * world_size
flops_per_step = raw_model.flops_per_token() * tokens_per_step
start_iter = iter_num
t_last, timed_steps, ms_per_step = time.time(), 0, 0.0
batches = train_batches(iter_num)
wait_s = 0.0  # seconds the loop waited for batches since the last log line
while True:
    val_loss = None
    if iter_num % eval_interval == 0 or iter_num == max_iters:
        if iter_num > start_iter or init_from == "scratch":  # a resumed run has this evaluation already
            val_loss, val_bpb = evaluate()
            stop_if_diverged("val loss", val_loss)
            best_val_loss = min(best_val_loss, val_loss)
            log({"step": iter_num, "val_loss": val_loss, "val_bpb": val_bpb},
                f"step {iter_num}: val loss {val_loss:.4f} (best {best_val_loss:.4f}), val bits per byte {val_bpb:.4f}")
            if ddp:  # the checkpoint keeps the mean over ranks of the loss since the last log line
                dist.all_reduce(loss_sum)
                loss_sum /= world_size
            if master:
                save_checkpoint()
                if sample_tokens:
                    print(f"sample: {sample_story()!r}", flush=True)
            saved_step = iter_num  # on every rank: each names it if the run stops
            t_last, timed_steps, wait_s = time.time(), 0, 0.0  # evaluation time is not training time
    if iter_num in keep and (iter_num > start_iter or not os.path.exists(snapshot_path(out_dir, iter_num))):
        t0 = time.time()
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # every rank: DDP keeps them equal
            stop_if_diverged("a weight of the model", float("nan"))  # the loss is checked only every log_interval
        if master:
            save_snapshot(iter_num, val_loss)
        t_last += time.time() - t0  # writing is not training time
    if iter_num >= max_iters:
        break

    scale = lr_scale(iter_num)
    lr = learning_rate * scale  # AdamW's, as logged; Muon's is muon_lr * scale
    for group in opt.param_groups:
        group["lr"] = group["peak_lr"] * scale
    for micro_step in range(grad_accum):
        t_wait = time.time()
        x, y, weight = next(batches)
        wait_s += time.time() - t_wait
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = model(x, y)[1]
        (loss * weight).backward()
        loss_sum += loss.detach() * weight
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    iter_num += 1
    loss_steps += 1
    timed_steps += 1

    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= world_size
        loss_value = loss_sum.item() / loss_steps  # .item() waits for the device: once per log line only
        stop_if_diverged("training loss", loss_value)
        if iter_num % log_interval == 0:  # the last line of a run that stops between two keeps them for a resume
            loss_sum.zero_()
            loss_steps = 0
        now = time.time()
        dt = (now - t_last) / timed_steps
        data_wait = wait_s / (now - t_last)  # of the step time, spent waiting for the next batch
        t_last, timed_steps, wait_s = now, 0, 0.0
        # ETA from a running average of step time; the first interval (compilation, warm-up) is replaced, not averaged
        ms_per_step = dt * 1000 if iter_num - start_iter <= log_interval else 0.9 * ms_per_step + 0.1 * dt * 1000
        tokens_per_s = tokens_per_step / dt
        mfu = flops_per_step / dt / peak if peak else None
        eta_s = (max_iters - iter_num) * ms_per_step / 1000
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None  # since the start
        log({"step": iter_num, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(), "ms_per_step": dt * 1000,
             "tokens_per_s": tokens_per_s, "mfu": mfu, "data_wait": data_wait, "peak_memory_gb": peak_gb, "eta_s": eta_s},
            f"step {iter_num}: loss {loss_value:.4f} | lr {lr:.2e} | grad norm {grad_norm.item():.3f} | {dt * 1000:.0f} ms/step | "
            f"{tokens_per_s:,.0f} tokens/s | MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'} | data wait {100 * data_wait:.1f}% | "
            + ("" if peak_gb is None else f"{peak_gb:.2f} GB | ") + f"ETA {eta_s / 60:.1f} min")

if master:
    log_file.close()
if ddp:
    dist.barrier()  # no rank leaves while rank 0 still writes the last checkpoint
    dist.destroy_process_group()
