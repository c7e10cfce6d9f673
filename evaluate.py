"""Evaluate models and datasets as the SimpleStories paper does: loss by story and label, an LLM judge, data diversity.

    python evaluate.py --out_dir=out/5m                        # loss and bits per byte by story, length and label
    python evaluate.py --out_dir=out/5m --step=512              # the snapshot of step 512, to out/5m/eval/step_0000512
    python evaluate.py --out_dir=out/5m --judge --dry_run      # the judge prompt and the cost; nothing is sent
    python evaluate.py --out_dir=out/5m --judge                # the model's completions graded by an LLM judge
    python evaluate.py --hf_dir=hf/SimpleStories-35M --dataset=simplestories-wp   # a Hugging Face folder
    python evaluate.py --data=data/sample/stories.jsonl --data=tinystories.txt    # data report, side by side

Each mode writes a JSON report, the same numbers as a markdown table, and PNG plots (when matplotlib is
installed) to --eval_dir: <out_dir>/eval for a model, out/<name>/eval_hf for a Hugging Face folder
hf/<name> (export.py's, or a published SimpleStories model: give --dataset, bins that prepare.py made with
the folder's tokenizer.json), out/data_report for datasets. A model's reports on other bins than its val
split go to a folder inside: eval/<dataset> for --dataset, then train for --split=train.

Loss (loss.json, loss.md, loss_by_label.png, loss_by_position.png, loss_by_story.parquet): every story of the
val split of the model's dataset (data/<dataset>, --dataset to choose another with the same tokenizer) is
scored from its BOS: a story's loss is the mean cross-entropy in nats over its tokens after BOS through EOS,
its bits per byte the nats of its text tokens over its UTF-8 bytes, in bits (EOS carries no bytes, as in
train.py). A story longer than the context is scored in windows of n_ctx tokens that move by --stride
(default n_ctx / 2): each token is scored once, with at least n_ctx - stride tokens of the story before it.
Rows: all stories, stories by length, and every value of every label in the story index prepare.py writes
(val.stories.parquet); each row gives the number of stories and the mean over them with the half-width of a
95% t-interval over stories (stories taken as independent draws). "token loss" pools every predicted token,
as train.py's val loss does (its windows start anywhere in val.bin, so the two differ a little). The opening loss
is the mean over stories of the mean loss of a story's first ten tokens after BOS, scored from position 0 with
nothing before BOS, as sample.py starts a story (loss_by_story.parquet has each story's).

Judge (judge.json, judge.md, judge.jsonl): see judge.py. Data report (data.json, data.md, zipf.png,
lengths.png, labels.png): see data_report.py, which states each method.
"""

import json
import math
import os
import sys

import numpy as np

from configurator import Parser, atomic_write, autocast_for, boolean, die, folder_problem, pick_device, run_folder

LENGTH_BUCKETS = (0, 128, 256, 512, 1024)  # predicted tokens: 0-127, 128-255, 256-511, 512-1023, 1024+
OPENING_TOKENS = 10  # the opening loss is the mean over a story's first ten tokens after BOS


# ----------------------------------------------------------------------------------------------
# what the three modes share: intervals, report files, plots


def interval(values):
    """(mean, half-width of the 95% t-interval of the mean) of values; the half-width is None below two values."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    from scipy.stats import t  # scipy is large: imported only when a report is made

    return mean, float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def plus_minus(mean, half, digits=3):
    """'4.521 ± 0.034' (the mean alone when there is no interval, '-' when there is no mean)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def write_report(eval_dir, name, report, markdown):
    """eval_dir/name.json and name.md, each written whole or not at all; returns their paths."""
    os.makedirs(eval_dir, exist_ok=True)
    paths = [os.path.join(eval_dir, f"{name}.json"), os.path.join(eval_dir, f"{name}.md")]
    with atomic_write(paths[0], "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with atomic_write(paths[1], "w") as f:
        f.write(markdown.rstrip() + "\n")
    return paths


def pyplot():
    """matplotlib.pyplot drawing to files, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("note: matplotlib is not installed, so no PNG plots; pip install matplotlib", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write a figure whole (a temporary file renamed), then free it."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# a checkpoint and the bins it is evaluated on (the loss and the judge)


def model_files(args):
    """The files that hold the evaluated weights: <out_dir>/ckpt.pt, or the --hf_dir folder's safetensors."""
    from sample import snapshot_path

    if args.hf_dir:
        return sorted(os.path.join(args.hf_dir, f) for f in os.listdir(args.hf_dir) if f.endswith(".safetensors"))
    return [snapshot_path(args.out_dir, args.step) if args.step is not None else os.path.join(args.out_dir, "ckpt.pt")]


def load_run(args):
    """(model, tokenizer, device, data_dir, meta, index) for --out_dir or --hf_dir: the model, its dataset's bins
    (or --dataset's) and their story index, checked to have been made with the model's tokenizer."""
    import torch

    from prepare import open_bins, read_index
    from sample import load_model

    device = pick_device(args.device)
    model, tok = load_model(args.out_dir, device, args.hf_dir, args.step)
    dataset = args.dataset
    if not dataset and args.hf_dir:
        raise ValueError(f"--hf_dir={args.hf_dir} does not name a dataset; give --dataset=NAME, bins in data/NAME made "
                         f"with its tokenizer: those of the run it was exported from, or prepare.py's with "
                         f"--tokenizer={os.path.join(args.hf_dir, 'tokenizer.json')}")
    if not dataset:
        saved = torch.load(os.path.join(args.out_dir, "ckpt.pt"), map_location="cpu", weights_only=True, mmap=True)
        dataset = (saved.get("train_config") or {}).get("dataset")
        if not dataset:
            raise ValueError(f"{args.out_dir}/ckpt.pt does not name the dataset it was trained on; give --dataset")
    data_dir = os.path.join("data", dataset)
    meta, _ = open_bins(data_dir, (args.split,))
    if meta["tokenizer_sha256"] != tok.sha256():
        raise ValueError(f"{data_dir} was tokenized with another tokenizer ({meta['tokenizer']}) than the model "
                         f"in {args.hf_dir or args.out_dir}; give --dataset bins made with the model's tokenizer")
    return model, tok, device, data_dir, meta, read_index(data_dir, args.split)


# ----------------------------------------------------------------------------------------------
# loss by story


def windows(n_targets, n_ctx, stride):
    """[(start, end, first)] windows over a story of n_targets + 1 tokens: the input is tokens[start:end], the
    targets tokens[start + 1:end + 1], of which those after position `first` are scored; each target once."""
    end = min(n_ctx, n_targets)
    out = [(0, end, 0)]
    while end < n_targets:
        new_end = min(end + stride, n_targets)
        out.append((new_end - n_ctx, new_end, end))
        end = new_end
    return out


def story_losses(model, tokens, offsets, lengths, token_bytes, stride, batch_size, device):
    """Per story: nats summed over its predicted tokens, nats over its text tokens (those with bytes) and its
    bytes; and per position in the story: nats summed and the number of tokens. Windows of similar length
    are batched together, padded on the right (where causal attention cannot see the padding)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    n_ctx = model.config.n_ctx
    work = [(i, *w) for i, n in enumerate(lengths - 1) for w in windows(int(n), n_ctx, stride)]
    work.sort(key=lambda w: w[2] - w[1], reverse=True)
    nats, text_nats, nbytes = (np.zeros(len(lengths)) for _ in range(3))
    pos_nats, pos_tokens = np.zeros(int(lengths.max())), np.zeros(int(lengths.max()))
    token_bytes = torch.tensor(token_bytes, dtype=torch.float32, device=device)
    autocast = autocast_for(device)
    bar = tqdm(total=int((lengths - 1).sum()), unit=" tokens", unit_scale=True, desc="scoring", dynamic_ncols=True)
    for b in range(0, len(work), batch_size):
        batch = work[b:b + batch_size]
        width = batch[0][2] - batch[0][1]
        x = np.zeros((len(batch), width), dtype=np.int64)
        y = np.full((len(batch), width), -1, dtype=np.int64)
        story = np.zeros((len(batch), width), dtype=np.int64)
        position = np.zeros((len(batch), width), dtype=np.int64)
        for row, (i, start, end, first) in enumerate(batch):
            seq = tokens[offsets[i] + start:offsets[i] + end + 1].astype(np.int64)
            x[row, :end - start] = seq[:-1]
            y[row, first - start:end - start] = seq[first - start + 1:]  # only the targets not scored before
            story[row], position[row] = i, start + 1 + np.arange(width)
        x, y = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        with torch.no_grad(), autocast:
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                              reduction="none")
        scored = (y.reshape(-1) >= 0)
        target_bytes = token_bytes[y.reshape(-1).clamp(min=0)] * scored
        nll, text_nll = nll * scored, nll * (target_bytes > 0)  # BOS/EOS carry no bytes: left out of bits per byte
        nll, text_nll, target_bytes, scored = (t.double().cpu().numpy() for t in (nll, text_nll, target_bytes, scored))
        story, position = story.reshape(-1), position.reshape(-1)
        nats += np.bincount(story, weights=nll, minlength=len(lengths))
        text_nats += np.bincount(story, weights=text_nll, minlength=len(lengths))
        nbytes += np.bincount(story, weights=target_bytes, minlength=len(lengths))
        pos_nats += np.bincount(position, weights=nll, minlength=len(pos_nats))[:len(pos_nats)]
        pos_tokens += np.bincount(position, weights=scored, minlength=len(pos_nats))[:len(pos_nats)]
        bar.update(int(scored.sum()))
    bar.close()
    return nats, text_nats, nbytes, pos_nats, pos_tokens


def opening_losses(model, tokens, offsets, lengths, batch_size, device, n=OPENING_TOKENS):
    """Per story: the mean loss (nats) of its first n tokens after BOS (all of them in a shorter story), scored from
    position 0: BOS first, nothing before it, as sample.py starts a story. Random training windows almost never
    see that context."""
    import torch
    import torch.nn.functional as F

    n = min(n, model.config.n_ctx)
    out = np.zeros(len(lengths))
    for b in range(0, len(lengths), batch_size):
        rows = np.full((min(batch_size, len(lengths) - b), n + 1), -1, dtype=np.int64)
        for row, i in enumerate(range(b, b + len(rows))):
            story = tokens[offsets[i]:offsets[i] + min(lengths[i], n + 1)]
            rows[row, :len(story)] = story
        x, y = torch.from_numpy(rows[:, :-1]).clamp(min=0).to(device), torch.from_numpy(rows[:, 1:]).to(device)
        with torch.no_grad(), autocast_for(device):
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")
        out[b:b + len(rows)] = (nll.sum(1) / (y >= 0).sum(1)).double().cpu().numpy()
    return out


def loss_row(group, value, loss, bpb):
    mean, half = interval(loss)
    bpb_mean, bpb_half = interval(bpb)
    return {"group": group, "value": value, "stories": int(len(loss)), "loss": mean, "loss_ci": half,
            "bpb": bpb_mean, "bpb_ci": bpb_half}


def length_bucket(n):
    i = int(np.searchsorted(LENGTH_BUCKETS, n, side="right")) - 1
    return (f"{LENGTH_BUCKETS[i]}-{LENGTH_BUCKETS[i + 1] - 1} tokens" if i + 1 < len(LENGTH_BUCKETS)
            else f"{LENGTH_BUCKETS[i]}+ tokens")


def loss_mode(args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tokenizer import LABELS

    model, tok, device, data_dir, meta, index = load_run(args)
    present = [k for k in LABELS if k in index.column_names and index[k].null_count < index.num_rows]
    wanted = list(dict.fromkeys(k.strip() for k in args.labels.split(",") if k.strip())) if args.labels else present
    for k in wanted:
        if k not in LABELS:
            raise ValueError(f"--labels: no label {k!r}; the labels are {', '.join(LABELS)}")
        if k not in present:
            raise ValueError(f"the {args.split} stories of {data_dir} carry no label {k} (stories from text files "
                             f"have none); leave it out of --labels")
    if not present:
        print(f"note: the {args.split} stories of {data_dir} carry no labels: the report has loss by length and "
              f"position only", file=sys.stderr)
    stride = args.stride or max(1, model.config.n_ctx // 2)
    if stride > model.config.n_ctx:
        raise ValueError(f"--stride={stride} is more than the model's context n_ctx={model.config.n_ctx}")
    tokens = np.memmap(os.path.join(data_dir, f"{args.split}.bin"), dtype=np.uint16, mode="r")
    offsets = index["offset"].to_numpy().astype(np.int64)
    lengths = index["length"].to_numpy().astype(np.int64)
    if (lengths < 2).any() or offsets[-1] + lengths[-1] != len(tokens):
        raise ValueError(f"the story index of {data_dir} does not match {args.split}.bin; run prepare.py again")
    nats, text_nats, nbytes, pos_nats, pos_tokens = story_losses(
        model, tokens, offsets, lengths, tok.token_bytes(), stride, args.batch_size, device)
    n_targets = lengths - 1
    loss = nats / n_targets
    opening = opening_losses(model, tokens, offsets, lengths, args.batch_size, device)
    opening_mean, opening_ci = interval(opening)
    with np.errstate(invalid="ignore", divide="ignore"):
        bpb = np.where(nbytes > 0, text_nats / (math.log(2) * nbytes), np.nan)

    rows = [loss_row("all", "", loss, bpb)]
    buckets = np.array([length_bucket(n) for n in n_targets])
    for bucket in sorted(set(buckets), key=lambda b: int(b.split("-")[0].split("+")[0])):
        rows.append(loss_row("length", bucket, loss[buckets == bucket], bpb[buckets == bucket]))
    by_label = {}
    for k in wanted:
        values = index[k].to_pylist()
        keys = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
        column = np.array(values, dtype=object)
        by_label[k] = [loss_row(k, v, loss[column == v], bpb[column == v]) for v in keys]
        rows += by_label[k]

    eval_dir = args.eval_dir
    total = {"token_loss": float(nats.sum() / n_targets.sum()),
             "token_bpb": float(text_nats.sum() / (math.log(2) * nbytes.sum())) if nbytes.sum() else None,
             "opening_loss": opening_mean, "opening_loss_ci": opening_ci}
    report = {
        "checkpoint": args.hf_dir or model_files(args)[0], "data_dir": data_dir, "split": args.split,
        "stories": int(len(lengths)), "predicted_tokens": int(n_targets.sum()), **total,
        "n_ctx": model.config.n_ctx, "stride": stride,
        "method": "per story: mean nats over the tokens after BOS through EOS, and bits per byte of its text tokens; "
                  "rows: mean over stories with the half-width of a 95% t-interval (stories independent); stories "
                  f"longer than n_ctx in windows moving by stride={stride}, each token scored once; opening_loss: "
                  f"mean over stories of the mean loss of their first {OPENING_TOKENS} tokens after BOS, scored from "
                  f"position 0",
        "rows": rows,
        "by_position": {"position": list(range(1, len(pos_nats))), "tokens": pos_tokens[1:].astype(int).tolist(),
                        "loss": [float(s / c) if c else None for s, c in zip(pos_nats[1:], pos_tokens[1:])]},
    }
    header = f"Loss by story: {args.hf_dir or args.out_dir} on {data_dir} {args.split} ({len(lengths):,} stories, {int(n_targets.sum()):,} predicted tokens)"
    table = markdown_table(["group", "value", "stories", "loss (nats/token)", "bits per byte"],
                           [(r["group"], r["value"], r["stories"], plus_minus(r["loss"], r["loss_ci"]),
                             plus_minus(r["bpb"], r["bpb_ci"])) for r in rows])
    markdown = (f"# {header}\n\nA story's loss is the mean over its tokens after BOS through EOS; ± is the half-width "
                f"of a 95% t-interval over stories. Token loss (all tokens pooled): {total['token_loss']:.4f} nats, "
                f"{total['token_bpb'] or float('nan'):.4f} bits per byte. Opening loss (a story's first "
                f"{OPENING_TOKENS} tokens, from BOS at position 0): {plus_minus(opening_mean, opening_ci)} nats. "
                f"Context {model.config.n_ctx}, stride {stride}."
                f"\n\n{table}\n")
    paths = write_report(eval_dir, "loss", report, markdown)
    story_table = pa.table({"id": index["id"], "offset": offsets.astype(np.uint64), "tokens": n_targets,
                            "bytes": nbytes.astype(np.int64), "loss": loss, "bpb": bpb, "opening_loss": opening})
    paths.append(os.path.join(eval_dir, "loss_by_story.parquet"))
    with atomic_write(paths[-1]) as f:
        pq.write_table(story_table, f)
    paths += loss_plots(eval_dir, by_label, report["by_position"], model.config.n_ctx, stride, header)

    print(markdown_table(["group", "value", "stories", "loss", "bits per byte"],
                         [(r["group"], r["value"], r["stories"], plus_minus(r["loss"], r["loss_ci"]),
                           plus_minus(r["bpb"], r["bpb_ci"])) for r in rows if r["group"] in ("all", "length")]))
    print(f"opening loss (first {OPENING_TOKENS} tokens from BOS at position 0) {plus_minus(opening_mean, opening_ci)} nats")
    print(f"token loss {total['token_loss']:.4f} nats over {int(n_targets.sum()):,} tokens; "
          f"{sum(len(v) for v in by_label.values())} label rows in {paths[1]}")
    print("wrote " + ", ".join(paths))


def loss_plots(eval_dir, by_label, by_position, n_ctx, stride, title):
    """loss_by_label.png (a panel a label, its values sorted by mean loss, 95% intervals) and
    loss_by_position.png (mean loss at each position in the story); returns the paths written."""
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    if by_label:
        # two columns of panels, each panel as tall as its label has values
        labels = sorted(by_label, key=lambda k: -len(by_label[k]))
        columns, heights = [[], []], [0, 0]
        for k in labels:
            c = int(heights[1] < heights[0])
            columns[c].append(k)
            heights[c] += len(by_label[k]) + 3
        fig = plt.figure(figsize=(15, max(4.0, 0.16 * max(heights))), layout="constrained")
        for subfig, keys in zip(fig.subfigures(1, 2), columns):
            if not keys:
                continue
            axes = subfig.subplots(len(keys), 1, gridspec_kw={"height_ratios": [len(by_label[k]) + 2 for k in keys]})
            for ax, k in zip(np.atleast_1d(axes), keys):
                rows = sorted(by_label[k], key=lambda r: r["loss"])
                ax.errorbar([r["loss"] for r in rows], range(len(rows)), fmt="o", markersize=3,
                            xerr=[r["loss_ci"] or 0 for r in rows], capsize=2)
                ax.set_yticks(range(len(rows)), [f"{r['value'] or '(none)'} ({r['stories']})" for r in rows], fontsize=7)
                ax.set_ylim(-0.7, len(rows) - 0.3)
                ax.invert_yaxis()
                ax.set_title(k, fontsize=9, loc="left")
                ax.tick_params(axis="x", labelsize=7)
                ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"{title}\nmean loss (nats/token) by label value, 95% interval over stories; (stories)", fontsize=9)
        paths.append(save_figure(fig, os.path.join(eval_dir, "loss_by_label.png")))
    position, loss = np.array(by_position["position"]), np.array(by_position["loss"], dtype=float)
    tokens = np.array(by_position["tokens"], dtype=float)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 8  # positions averaged together, weighted by their tokens, so the curve is readable
    edges = np.arange(0, len(position) + width, width)
    summed = np.add.reduceat(np.nan_to_num(loss) * tokens, edges[:-1])
    counts = np.add.reduceat(tokens, edges[:-1])
    keep = counts > 0
    ax.plot(position[edges[:-1]][keep], summed[keep] / counts[keep], lw=1.2)
    ax.axvline(n_ctx, color="gray", ls=":", lw=1)
    ax.text(n_ctx, ax.get_ylim()[1], f" n_ctx={n_ctx} (windows move by {stride} after it)", fontsize=7, va="top")
    ax.set_xlabel("position of the predicted token in the story (1 = the first after BOS)")
    ax.set_ylabel(f"mean loss (nats), {width} positions averaged")
    twin = ax.twinx()
    twin.fill_between(position, tokens, step="mid", alpha=0.12, color="gray")
    twin.set_ylabel("stories that reach the position", color="gray")
    ax.set_title(f"{title}\nloss by position in the story", fontsize=9)
    paths.append(save_figure(fig, os.path.join(eval_dir, "loss_by_position.png")))
    return paths


# ----------------------------------------------------------------------------------------------
# the command line


# the flags of one mode, refused in the others
MODEL_FLAGS = ("dataset", "split", "batch_size", "stride", "labels")
LOSS_FLAGS = ("stride", "labels")  # of a model's loss report, not of its judge
JUDGE_FLAGS = ("n_prompts", "prompt_words", "temperature", "top_k", "max_new_tokens", "judge_model", "base_url",
               "response_format", "concurrency", "rpm", "tpm", "timeout", "max_retries", "backoff", "max_unusable",
               "price_in", "price_out")
DATA_FLAGS = ("max_stories", "sample_size", "readability_sample", "jaccard")


def parse_args(argv=None):
    p = Parser(__doc__, "evaluate.py")
    g = p.add_argument_group("a model (the loss by story, and the judge)")
    g.add_argument("--out_dir", default="", type=run_folder, help="training run folder holding ckpt.pt")
    g.add_argument("--hf_dir", default="", help="a Hugging Face model folder instead (export.py's, or a published one)")
    g.add_argument("--step", type=int, default=None, help="the snapshot of this step of --out_dir (train.py --keep_checkpoints)")
    g.add_argument("--dataset", default="", help="evaluate on data/<dataset> (default: the dataset the model trained on)")
    g.add_argument("--split", default="val", choices=("val", "train"), help="the bins' split to evaluate on")
    g.add_argument("--eval_dir", default="", help="where the reports go (default: <out_dir>/eval, out/<name>/eval_hf for --hf_dir, or out/data_report; "
                                                   "a folder inside for --step, --dataset and --split=train)")
    g.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    g.add_argument("--batch_size", type=int, default=16, help="sequences scored or sampled at a time")
    g.add_argument("--stride", type=int, default=0, help="tokens a window moves along a story longer than n_ctx (0: n_ctx/2)")
    g.add_argument("--labels", default="", help="comma-separated labels to report (default: every label the stories have)")
    g = p.add_argument_group("the judge (see judge.py)")
    g.add_argument("--judge", type=boolean, nargs="?", const=True, default=False,
                   help="grade the model's completions of held-out story beginnings with an LLM judge")
    g.add_argument("--dry_run", type=boolean, nargs="?", const=True, default=False,
                   help="with --judge: print the judge prompt and the cost, send nothing")
    g.add_argument("--n_prompts", type=int, default=100, help="held-out stories whose beginnings are prompts (the first in the split)")
    g.add_argument("--prompt_words", type=int, default=18, help="words of the story a prompt keeps; 0: its first sentence")
    g.add_argument("--temperature", type=float, default=0.7, help="the model's sampling temperature")
    g.add_argument("--top_k", type=int, default=40, help="the model samples from its top_k tokens (0: all)")
    g.add_argument("--max_new_tokens", type=int, default=300, help="tokens the model adds to a prompt at most")
    g.add_argument("--seed", type=int, default=1337, help="seeds the model's sampling, and the data report's samples")
    g.add_argument("--judge_model", default="gpt-4o-mini", help="the judge, any chat model of the server")
    g.add_argument("--base_url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    g.add_argument("--response_format", default="json_schema", choices=("json_schema", "json_object", "none"),
                   help="how the judge is asked for JSON: a JSON schema, any JSON object, or the prompt alone")
    g.add_argument("--concurrency", type=int, default=16, help="judge requests in flight")
    g.add_argument("--rpm", type=float, default=0, help="judge requests per minute at most (0: no limit)")
    g.add_argument("--tpm", type=float, default=0, help="judge tokens per minute at most (0: no limit)")
    g.add_argument("--timeout", type=float, default=60, help="seconds a judge request may take before it is tried again")
    g.add_argument("--max_retries", type=int, default=8, help="retries of a judge request before its prompt is left for a rerun")
    g.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each time")
    g.add_argument("--max_unusable", type=int, default=10, help="judge answers in a row that are not grades before the run stops")
    g.add_argument("--price_in", type=float, default=None, help="USD per million judge input tokens")
    g.add_argument("--price_out", type=float, default=None, help="USD per million judge output tokens")
    g = p.add_argument_group("datasets (see data_report.py)")
    g.add_argument("--data", action="append", default=[],
                   help="stories: .jsonl, .parquet or .txt file, folder or glob, or hf:OWNER/NAME; give it once a dataset")
    g.add_argument("--max_stories", type=int, default=0, help="read at most this many stories of each dataset (0: all)")
    g.add_argument("--sample_size", type=int, default=20000, help="stories sampled for near-duplicates")
    g.add_argument("--readability_sample", type=int, default=2000, help="stories of that sample scored for readability")
    g.add_argument("--jaccard", type=float, default=0.8, help="word 5-gram Jaccard similarity that makes a near-duplicate")
    args = p.parse_args(argv)

    if bool(args.out_dir) + bool(args.hf_dir) + bool(args.data) != 1:
        die("give --out_dir=RUN or --hf_dir=FOLDER (evaluate a model) or --data=STORIES (a data report), one of the "
            "three; `python evaluate.py --help` lists the flags")
    if args.data and (args.judge or args.dry_run):
        die("--judge grades a model's completions: give it --out_dir or --hf_dir, not --data")
    if args.step is not None and (args.step < 0 or not args.out_dir):
        die(f"--step={args.step} picks a snapshot of --out_dir's run: give --out_dir and a step of 0 or more")
    if args.dry_run and not args.judge:
        die("--dry_run goes with --judge: it prints the judge prompt and the cost")
    given = [k for k in vars(args) if getattr(args, k) != p.get_default(k)]  # a flag of another mode is refused,
    for flag in given:  # not ignored
        if flag in JUDGE_FLAGS and not args.judge:
            die(f"--{flag} goes with --judge, which grades the model's completions; add --judge or drop it")
        if flag in MODEL_FLAGS and args.data:
            die(f"--{flag} goes with a model's evaluation (--out_dir or --hf_dir), not a data report (--data)")
        if flag in LOSS_FLAGS and args.judge:
            die(f"--{flag} goes with the loss report, not with --judge; run them as two commands")
        if flag in DATA_FLAGS and not args.data:
            die(f"--{flag} goes with a data report (--data), not a model's evaluation")
    for name in ("batch_size", "n_prompts", "max_new_tokens", "concurrency", "max_unusable", "sample_size"):
        if getattr(args, name) < 1:
            die(f"--{name}={getattr(args, name)} must be at least 1")
    for name in ("stride", "prompt_words", "top_k", "max_retries", "max_stories", "readability_sample", "seed"):
        if getattr(args, name) < 0:
            die(f"--{name}={getattr(args, name)} must not be negative")
    for name in ("temperature", "rpm", "tpm", "backoff", "timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            die(f"--{name}={value} must be a finite number, 0 or more")
    if args.timeout <= 0:
        die(f"--timeout={args.timeout} must be more than 0")
    if not 0 < args.jaccard <= 1:
        die(f"--jaccard={args.jaccard} must be in (0, 1]")
    for name in ("price_in", "price_out"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            die(f"--{name}={value} must be a finite number, 0 or more")
    if not args.eval_dir:
        if args.hf_dir:  # not inside the model's folder, which may be uploaded whole
            # eval_hf: beside, not over, the reports of a run of the same name (export.py --out_dir=out/5m --hf_dir=hf/5m)
            args.eval_dir = os.path.join("out", os.path.basename(os.path.normpath(args.hf_dir)), "eval_hf")
        elif not args.out_dir:
            args.eval_dir = os.path.join("out", "data_report")
        else:  # a snapshot's reports, and those on other bins, beside the final model's on its val split, not over them
            args.eval_dir = os.path.join(args.out_dir, "eval", *([f"step_{args.step:07d}"] if args.step is not None else []),
                                         *([args.dataset] if args.dataset else []))
        if (args.out_dir or args.hf_dir) and args.split != "val":
            args.eval_dir = os.path.join(args.eval_dir, args.split)
    problem = folder_problem(args.eval_dir)  # found now, not after the work
    if problem:
        die(f"--eval_dir={args.eval_dir} cannot be written: {problem}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.data:
            from data_report import data_mode

            data_mode(args)
        elif args.judge:
            from judge import judge_mode

            judge_mode(args)
        else:
            loss_mode(args)
    except ValueError as e:
        die(str(e))
    except OSError as e:  # a report that cannot be written
        die(f"{e}; check --eval_dir")
    except KeyboardInterrupt:  # each report is written whole, then renamed into place
        die("interrupted; no report was left half-written")


if __name__ == "__main__":
    main()
