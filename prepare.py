"""Tokenize stories into the flat token files train.py reads.

    python prepare.py --input=data/sample/stories.jsonl --tokenizer=tokenizers/sample.model
    python prepare.py --input='data/simplestories/*.parquet' --tokenizer=tokenizers/simplestories.model

Writes to --out_dir (default: the input's folder):
    train.bin, val.bin   every story as BOS story EOS, concatenated; little-endian uint16 token ids
    train.idx, val.idx   token offset of each story's BOS; little-endian uint64
    meta.json            vocab size, special ids, tokenizer file and sha256, counts, the split rule

A story goes to val when the hash of its id falls under --val_fraction, so adding stories never
moves an old one across splits. Stories are streamed and encoded in chunks on all cores, so memory
stays flat whatever the corpus size. Everything is written under temporary names and renamed at
the end: an interrupted run leaves the previous output (or none), never bins that look complete.
"""

import argparse
import hashlib
import itertools
import json
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from tokenizer import Tokenizer, input_files, read_stories

SPLITS = ("train", "val")


def split_of(story_id, val_fraction):
    """'val' for a fixed val_fraction of ids, chosen by hash: stable as the corpus grows."""
    h = int.from_bytes(hashlib.sha256(story_id.encode("utf-8")).digest()[:8], "little")
    return "val" if h < val_fraction * 2**64 else "train"


def prepare(input_spec, tokenizer_file, out_dir, val_fraction=0.05, chunk_stories=4096):
    tok = Tokenizer(tokenizer_file)
    if tok.vocab_size >= 65536:
        raise ValueError(f"{tokenizer_file} has {tok.vocab_size} pieces, too many for uint16 token files; train a tokenizer with --vocab_size below 65536")
    os.makedirs(out_dir, exist_ok=True)
    paths = {f"{s}.{ext}": os.path.join(out_dir, f"{s}.{ext}") for s in SPLITS for ext in ("bin", "idx")}
    files = {name: open(path + ".tmp", "wb") for name, path in paths.items()}
    counts = {s: {"stories": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    unigram = np.zeros(tok.vocab_size, dtype=np.int64)  # token frequencies in train, for the unigram baseline
    try:
        bar = tqdm(unit=" stories", desc="tokenizing", dynamic_ncols=True)
        start = time.time()

        def write(chunk):
            encoded = tok.encode_many([text for _, text in chunk], bos=True, eos=True)
            split = [split_of(sid, val_fraction) for sid, _ in chunk]
            for s in SPLITS:
                rows = [(text, ids) for (_, text), ids, si in zip(chunk, encoded, split) if si == s]
                if not rows:
                    continue
                lengths = np.array([len(ids) for _, ids in rows], dtype="<u8")
                (counts[s]["tokens"] + np.cumsum(lengths) - lengths).tofile(files[f"{s}.idx"])
                tokens = np.fromiter(itertools.chain.from_iterable(ids for _, ids in rows), dtype="<u2")
                tokens.tofile(files[f"{s}.bin"])
                if s == "train":
                    unigram[:] += np.bincount(tokens, minlength=tok.vocab_size)
                counts[s]["stories"] += len(rows)
                counts[s]["tokens"] += int(lengths.sum())
                counts[s]["bytes"] += sum(len(text.encode("utf-8")) for text, _ in rows)
            bar.update(len(chunk))
            tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
            bar.set_postfix_str(f"{tokens / (time.time() - start):,.0f} tokens/s")

        chunk = []
        for item in read_stories(input_spec):
            chunk.append(item)
            if len(chunk) == chunk_stories:
                write(chunk)
                chunk = []
        if chunk:
            write(chunk)
        bar.close()
        for s in SPLITS:
            if counts[s]["stories"] == 0:
                raise ValueError(f"no stories went to {s} (val_fraction={val_fraction}, {counts['train']['stories'] + counts['val']['stories']} stories); give more stories or another --val_fraction")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    except BaseException:
        for name, f in files.items():
            f.close()
            os.remove(paths[name] + ".tmp")
        raise
    p = unigram[unigram > 0] / unigram.sum()
    meta = {
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "dtype": "uint16",
        "tokenizer": tokenizer_file, "tokenizer_sha256": tok.sha256(),
        "input": input_spec, "val_fraction": val_fraction,
        "split": "val if int.from_bytes(sha256(id)[:8], 'little') < val_fraction * 2**64, else train",
        **{s: counts[s] for s in SPLITS},
        # cross-entropy (nats per token) of predicting train tokens by their frequency alone: the loss to beat
        "unigram_entropy": float(-(p * np.log(p)).sum()),
    }
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # bins and an old meta.json never stand together
    for path in paths.values():
        os.replace(path + ".tmp", path)
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="data/sample/stories.jsonl", help="stories: .jsonl, .parquet or .txt file, folder or glob")
    parser.add_argument("--tokenizer", default="tokenizers/sample.model", help="sentencepiece model from tokenizer.py")
    parser.add_argument("--out_dir", default="", help="where the bins go (default: the input's folder)")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of stories that go to val.bin")
    parser.add_argument("--chunk_stories", type=int, default=4096, help="stories encoded and written at a time")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        sys.exit(f"error: --val_fraction={args.val_fraction} must be between 0 and 1")
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(input_files(args.input)[0]))
    meta = prepare(args.input, args.tokenizer, out_dir, args.val_fraction, args.chunk_stories)
    for s in SPLITS:
        print(f"{os.path.join(out_dir, s + '.bin')}: {meta[s]['stories']:,} stories, {meta[s]['tokens']:,} tokens")
    print(f"unigram entropy of train.bin: {meta['unigram_entropy']:.3f} nats per token (the loss of a model that ignores context)")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
