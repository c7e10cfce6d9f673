"""Record a model's activations over whole stories, in shards a sparse autoencoder trainer can stream.

    python activations.py --out_dir=out/5m --sites=resid_post.3,mlp_out.2            # the val split, all of it
    python activations.py --out_dir=out/5m --split=train --sites=resid_post --n_tokens=10000000   # every layer
    python activations.py --hf_dir=hf/SimpleStories-35M --dataset=simplestories-wp --sites=attn_z.5

Sites, each with the TransformerLens hook it is (L: a layer, 0 to n_layers - 1; a kind alone, such as
`resid_post`, names that site in every layer):

    site          TransformerLens hook        per token            what it is
    resid_pre.L   blocks.L.hook_resid_pre     (d_model,)           the residual stream into block L
    resid_mid.L   blocks.L.hook_resid_mid     (d_model,)           the residual stream after block L's attention
    resid_post.L  blocks.L.hook_resid_post    (d_model,)           the residual stream out of block L
    attn_out.L    blocks.L.hook_attn_out      (d_model,)           block L's attention output (after o_proj)
    mlp_out.L     blocks.L.hook_mlp_out       (d_model,)           block L's MLP output
    attn_z.L      blocks.L.attn.hook_z        (n_heads, head_dim)  each head's output, before o_proj mixes them
    mlp_post.L    blocks.L.mlp.hook_post      (d_mlp,)             silu(gate_proj(x)) * up_proj(x), into down_proj

They are read with forward hooks on the model's modules, and the forward pass
stops after the last block a site needs.

Rows: row k is token k of data/<dataset>/{split}.bin, so the rows are the split's stories in bin order, each
BOS story EOS, every token once; --n_tokens takes the first n_tokens tokens (whole stories and the beginning
of the last one). Each story is run from its BOS; a story longer than the context is run in windows of n_ctx
tokens that move by --stride, as evaluate.py scores it (evaluate.windows): each token's activation is taken
once, with at least n_ctx - stride tokens of its story before it (all of them in the first window). Windows of
like length are batched, padded on the right, where causal attention cannot see the padding.

Output, in --act_dir (default <out_dir>/activations/<split>, <out_dir>/activations/step_0000512/<split> for
--step=512, a snapshot of train.py --keep_checkpoints, out/<name>/activations_hf/<split> for --hf_dir hf/<name>):
    shard_00000.safetensors, ...   --shard_tokens rows each (the last fewer): one tensor per site, named by
                                   the site, (rows, *per token) in --dtype; and tokens, story (its index in
                                   the split) and position (in its story, 0 = BOS), int32 (rows,)
    stories.parquet                row s is story s of the split: offset, length, id and labels (prepare.py's)
    activations.json               the checkpoint and its sha256, model_config, data_dir, split, sites (hook,
                                   shape), dtype, n_ctx, stride, n_tokens written and the shards with their rows
Each shard is written whole (a temporary file renamed), and activations.json last, so a folder without it is
a run that did not finish. Memory holds one shard, twice while it is written: shard_tokens * (sum of the
sites' widths) * 2 bytes in float16 (2**18 rows of one d_model 256 site: 128 MB); lower --shard_tokens for
many sites.

Reading, one shard at a time (safetensors reads only the tensors asked for):

    from activations import iter_activations
    for acts, tokens, story, position in iter_activations("out/5m/activations/val", "resid_post.3"):
        acts = acts[position > 0]   # e.g. leave out BOS, whose residual stream is unlike the others'
"""

import hashlib
import json
import os
import time
from dataclasses import asdict

import numpy as np

from configurator import Parser, atomic_write, autocast_for, boolean, die, folder_problem, run_folder

SITES = {  # kind: (its TransformerLens hook, the module of block L it is read from, its input (True) or its output)
    "resid_pre": ("blocks.{L}.hook_resid_pre", lambda block: block, True),
    "resid_mid": ("blocks.{L}.hook_resid_mid", lambda block: block.mlp_norm, True),
    "resid_post": ("blocks.{L}.hook_resid_post", lambda block: block, False),
    "attn_out": ("blocks.{L}.hook_attn_out", lambda block: block.attn, False),
    "mlp_out": ("blocks.{L}.hook_mlp_out", lambda block: block.mlp, False),
    "attn_z": ("blocks.{L}.attn.hook_z", lambda block: block.attn.o_proj, True),
    "mlp_post": ("blocks.{L}.mlp.hook_post", lambda block: block.mlp.down_proj, True),
}
DTYPES = ("float16", "bfloat16", "float32")
MANIFEST = "activations.json"


def site_shape(site, config):
    """The shape of a site's activations per token."""
    kind = site.split(".")[0]
    return {"attn_z": (config.n_heads, config.head_dim), "mlp_post": (config.d_mlp,)}.get(kind, (config.d_model,))


def written_by_us(name):
    """Whether a file in act_dir is one this script writes (and --overwrite may remove)."""
    return (name in (MANIFEST, "stories.parquet") or (name.startswith("shard_") and name.endswith(".safetensors"))
            or name.endswith(".tmp"))


def parse_sites(text, n_layers=None):
    """The sites of a --sites value, in order, once each; a kind alone stands for every layer (n_layers given).
    ValueError naming the valid sites for an unknown one or a layer the model does not have."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--sites is empty; give sites such as --sites=resid_post.3,mlp_out.2 (kinds: {', '.join(SITES)})")
    sites = []
    for item in items:
        kind, dot, layer = item.partition(".")
        if kind not in SITES or (dot and not (layer.isascii() and layer.isdigit())):
            raise ValueError(f"unknown site {item!r}; a site is KIND.LAYER or KIND alone (every layer), KIND one of "
                             f"{', '.join(SITES)}, e.g. --sites=resid_post.3,mlp_out.2")
        if n_layers is None:
            continue
        if dot and int(layer) >= n_layers:
            raise ValueError(f"site {item}: the model has layers 0 to {n_layers - 1}; give a layer in that range")
        sites += [f"{kind}.{int(layer)}"] if dot else [f"{kind}.{L}" for L in range(n_layers)]  # 03 is 3
    return list(dict.fromkeys(sites))


class Done(Exception):
    """Raised after the last block a site needs: the rest of the forward pass (and the logits) is not computed."""


def add_hooks(model, sites, captured):
    """Hooks that put each site's activations (B, T, width) into captured[site] at every forward pass and stop the
    pass after the last block needed; returns their handles (handle.remove() takes one off)."""
    handles = []
    for site in sites:
        kind, layer = site.split(".")
        _, module_of, reads_input = SITES[kind]
        module = module_of(model.blocks[int(layer)])
        if reads_input:
            handles.append(module.register_forward_pre_hook(lambda m, args, site=site: captured.update({site: args[0]})))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out, site=site: captured.update({site: out})))

    def stop(module, args, out):
        raise Done

    # registered last, so the block's own hooks (its resid_post) run before it
    handles.append(model.blocks[max(int(s.split(".")[1]) for s in sites)].register_forward_hook(stop))
    return handles


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record(model, tokens, offsets, lengths, n_tokens, sites, dtype, stride, batch_size, shard_tokens, device, act_dir):
    """Run the model over the first n_tokens tokens of the split and write the shards; returns [(file, rows)]."""
    import torch
    from safetensors.torch import save
    from tqdm import tqdm

    from evaluate import windows

    c, n_ctx = model.config, model.config.n_ctx
    captured = {}
    handles = add_hooks(model, sites, captured)
    # one buffer a site, reused by every shard: what memory holds
    buffers = {s: torch.empty((min(shard_tokens, n_tokens), *site_shape(s, c)), dtype=dtype) for s in sites}
    autocast = autocast_for(device)
    bar = tqdm(total=n_tokens, unit=" tokens", unit_scale=True, desc="activations", dynamic_ncols=True)
    shards = []
    for r0 in range(0, n_tokens, shard_tokens):
        r1 = min(r0 + shard_tokens, n_tokens)
        # the windows of the stories in rows [r0, r1), each recording the positions [lo, hi) of its story there;
        # a story's windows are the same whatever n_tokens and shard_tokens cut from it
        work = []
        for i in range(np.searchsorted(offsets, r0, "right") - 1, np.searchsorted(offsets, r1 - 1, "right")):
            for start, end, first in windows(int(lengths[i]), n_ctx, stride):
                lo, hi = max(first, r0 - offsets[i]), min(end, r1 - offsets[i])
                if lo < hi:
                    work.append((offsets[i], start, end, lo, hi))
        work.sort(key=lambda w: w[2] - w[1], reverse=True)
        filled = 0
        for b in range(0, len(work), batch_size):
            batch = work[b:b + batch_size]
            x = np.zeros((len(batch), batch[0][2] - batch[0][1]), dtype=np.int64)
            for row, (offset, start, end, lo, hi) in enumerate(batch):
                x[row, :end - start] = tokens[offset + start:offset + end]
            captured.clear()
            with torch.no_grad(), autocast:
                try:
                    model(torch.from_numpy(x).to(device))
                except Done:
                    pass
            for site in sites:
                acts = captured[site]
                if site.startswith("attn_z"):
                    acts = acts.unflatten(-1, (c.n_heads, c.head_dim))
                acts = acts.to(dtype).cpu()
                for row, (offset, start, end, lo, hi) in enumerate(batch):
                    buffers[site][offset + lo - r0:offset + hi - r0] = acts[row, lo - start:hi - start]
            rows = sum(hi - lo for *_, lo, hi in batch)
            filled += rows
            bar.update(rows)
        assert filled == r1 - r0, (filled, r0, r1)  # every row once
        rows = np.arange(r0, r1)
        story = np.searchsorted(offsets, rows, "right") - 1
        tensors = {s: buffers[s][:r1 - r0] for s in sites}
        if dtype == torch.float16:
            for s, t in tensors.items():
                if not torch.isfinite(t).all():
                    raise ValueError(f"site {s} has values beyond float16's range (65504) or NaN; give --dtype=bfloat16")
        tensors.update({"tokens": torch.from_numpy(tokens[r0:r1].astype(np.int32)),
                        "story": torch.from_numpy(story.astype(np.int32)),
                        "position": torch.from_numpy((rows - offsets[story]).astype(np.int32))})
        name = f"shard_{len(shards):05d}.safetensors"
        with atomic_write(os.path.join(act_dir, name)) as f:
            f.write(save(tensors))
        shards.append((name, r1 - r0))
    bar.close()
    for handle in handles:
        handle.remove()
    return shards


def iter_activations(act_dir, site):
    """Yield (acts, tokens, story, position) for each shard of act_dir, in row order: acts (rows, *per token) in
    the dtype written, the others int32 (rows,); story is the row's story index in the split (stories.parquet
    gives its id and labels), position its place in the story (0 = BOS). ValueError for an unfinished folder or a
    site it does not hold."""
    from safetensors.torch import safe_open

    path = os.path.join(act_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist: activations.py did not finish there; run it again with --overwrite=True")
    with open(path) as f:
        manifest = json.load(f)
    if site not in manifest["sites"]:
        raise ValueError(f"{act_dir} holds no site {site!r}; it holds {', '.join(manifest['sites'])}")
    for shard in manifest["shards"]:
        with safe_open(os.path.join(act_dir, shard["file"]), "pt") as f:
            yield tuple(f.get_tensor(name) for name in (site, "tokens", "story", "position"))


def parse_args(argv=None):
    p = Parser(__doc__, "activations.py")
    p.add_argument("--out_dir", default="", type=run_folder, help="training run folder holding ckpt.pt")
    p.add_argument("--hf_dir", default="", help="a Hugging Face model folder instead (export.py's, or a published one)")
    p.add_argument("--step", type=int, default=None, help="the snapshot of this step of --out_dir (train.py --keep_checkpoints)")
    p.add_argument("--dataset", default="", help="run on data/<dataset> ('': the dataset the model trained on)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="the bins' split to run over")
    p.add_argument("--sites", default="", help="comma-separated sites, e.g. resid_post.3,mlp_out.2 (see above)")
    p.add_argument("--n_tokens", type=int, default=None,
                   help="rows to write, the first tokens of the split (None: all of it)")
    p.add_argument("--act_dir", default="", help="where the shards go ('': <out_dir>/activations/<split>, or out/<name>/activations_hf/<split> for --hf_dir=hf/<name>)")
    p.add_argument("--dtype", default="float16", choices=DTYPES, help="of the activations written")
    p.add_argument("--shard_tokens", type=int, default=2**18, help="rows in a shard (and in memory)")
    p.add_argument("--batch_size", type=int, default=32, help="windows run at a time")
    p.add_argument("--stride", type=int, default=0,
                   help="tokens a window moves along a story longer than n_ctx (0: n_ctx/2)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
    p.add_argument("--overwrite", type=boolean, nargs="?", const=True, default=False,
                   help="replace what activations.py wrote in --act_dir")
    args = p.parse_args(argv)
    if bool(args.out_dir) == bool(args.hf_dir):
        die("give --out_dir=RUN or --hf_dir=FOLDER, one of the two; `python activations.py --help` lists the flags")
    if args.step is not None and (args.step < 0 or not args.out_dir):
        die(f"--step={args.step} picks a snapshot of --out_dir's run: give --out_dir and a step of 0 or more")
    for name in ("n_tokens", "shard_tokens", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            die(f"--{name}={getattr(args, name)} must be at least 1")
    if args.stride < 0:
        die(f"--stride={args.stride} must not be negative")
    try:
        parse_sites(args.sites)  # the names now; the layers once the model is loaded
    except ValueError as e:
        die(str(e))
    if not args.act_dir:
        if args.hf_dir:  # beside, not over, the activations of a run of the same name (as evaluate.py's eval_hf)
            args.act_dir = os.path.join("out", os.path.basename(os.path.normpath(args.hf_dir)), "activations_hf", args.split)
        else:
            step = [f"step_{args.step:07d}"] if args.step is not None else []  # a snapshot's beside the final model's
            args.act_dir = os.path.join(args.out_dir, "activations", *step, args.split)
    problem = folder_problem(args.act_dir)
    if problem:
        die(f"--act_dir={args.act_dir} cannot be written: {problem}")
    names = os.listdir(args.act_dir) if os.path.isdir(args.act_dir) else []
    if names and not args.overwrite:
        unfinished = MANIFEST not in names and all(written_by_us(n) for n in names)
        die(f"--act_dir={args.act_dir} " + (f"holds a run that did not finish (no {MANIFEST})" if unfinished else "is not empty")
            + "; give --overwrite=True to replace it, or another --act_dir")
    foreign = [n for n in names if not written_by_us(n)]
    if foreign:
        die(f"--act_dir={args.act_dir} holds {foreign[0]!r}, which activations.py did not write; give another --act_dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    touched = False  # whether act_dir has changed: what Ctrl-C leaves there
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from evaluate import load_run, model_files

        model, tok, device, data_dir, meta, index = load_run(args)
        sites = parse_sites(args.sites, model.config.n_layers)
        n_ctx = model.config.n_ctx
        stride = args.stride or max(1, n_ctx // 2)
        if stride > n_ctx:
            raise ValueError(f"--stride={stride} is more than the model's context n_ctx={n_ctx}")
        tokens = np.memmap(os.path.join(data_dir, f"{args.split}.bin"), dtype=np.uint16, mode="r")
        offsets = index["offset"].to_numpy().astype(np.int64)
        lengths = index["length"].to_numpy().astype(np.int64)
        if not np.array_equal(offsets, np.cumsum(lengths) - lengths) or offsets[-1] + lengths[-1] != len(tokens):
            raise ValueError(f"the story index of {data_dir} does not match {args.split}.bin; run prepare.py again")
        n_tokens = min(args.n_tokens or len(tokens), len(tokens))
        n_stories = int(np.searchsorted(offsets, n_tokens - 1, "right"))

        touched = True
        for name in os.listdir(args.act_dir) if os.path.isdir(args.act_dir) else []:
            os.remove(os.path.join(args.act_dir, name))  # --overwrite: only this script's files (parse_args checked)
        os.makedirs(args.act_dir, exist_ok=True)
        stories = index.slice(0, n_stories)
        with atomic_write(os.path.join(args.act_dir, "stories.parquet")) as f:
            pq.write_table(stories.add_column(0, "story", pa.array(np.arange(n_stories, dtype=np.int32))), f)
        start = time.time()
        shards = record(model, tokens, offsets, lengths, n_tokens, sites, getattr(torch, args.dtype), stride,
                        args.batch_size, args.shard_tokens, device, args.act_dir)
        seconds = time.time() - start
        c = model.config
        manifest = {
            "checkpoint": {path: sha256_of(path) for path in model_files(args)},
            "model_config": asdict(c),  # norm among them: 'none' for a model whose norms were removed
            "data_dir": data_dir, "split": args.split, "tokenizer_sha256": meta["tokenizer_sha256"],
            "sites": {s: {"hook": SITES[s.split(".")[0]][0].format(L=s.split(".")[1]),
                          "shape": list(site_shape(s, c))} for s in sites},
            "dtype": args.dtype, "n_ctx": n_ctx, "stride": stride, "n_tokens": n_tokens, "n_stories": n_stories,
            "shard_tokens": args.shard_tokens,
            "shards": [{"file": name, "rows": rows} for name, rows in shards],
            "rows": f"row k is token k of {data_dir}/{args.split}.bin (stories in bin order, BOS story EOS); each "
                    f"story from its BOS, one longer than n_ctx in windows moving by stride, each token once with at "
                    f"least n_ctx - stride tokens of its story before it",
        }
        with atomic_write(os.path.join(args.act_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
    except ValueError as e:
        die(str(e))
    except OSError as e:
        die(f"{e}; check --act_dir")
    except KeyboardInterrupt:  # the shards so far stay, without the manifest that would make them a finished run
        die(f"interrupted: {args.act_dir} holds a run that did not finish; run again with --overwrite=True" if touched
            else f"interrupted before anything was written to {args.act_dir}")
    print(f"wrote {n_tokens:,} rows ({n_stories:,} {'story' if n_stories == 1 else 'stories'}) of {', '.join(sites)} in "
          f"{len(shards)} {'shard' if len(shards) == 1 else 'shards'} to "
          f"{args.act_dir} in {seconds:.1f} s ({n_tokens / seconds:,.0f} tokens/s)")


if __name__ == "__main__":
    main()
