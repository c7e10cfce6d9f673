"""Tokenize stories into the flat token files train.py reads.

    python prepare.py --input=data/sample/stories.jsonl --tokenizer=tokenizers/sample.model
    python prepare.py --input=hf:SimpleStories/SimpleStories --tokenizer=tokenizers/simplestories.model
    python prepare.py --input='data/simplestories/data/train-*.parquet' --val_input='data/simplestories/data/test-*.parquet' \\
        --tokenizer=tokenizers/simplestories.model --data_dir=data/simplestories

Writes to --data_dir (default: the input's folder, or data/<name> for a hub dataset):
    train.bin, val.bin   every story as BOS story EOS, concatenated; little-endian uint16 token ids
    train.idx, val.idx   token offset of each story's BOS; little-endian uint64
    train.stories.parquet, val.stories.parquet
                         one row per story, in bin order: offset (of its BOS), length (in tokens, BOS and EOS
                         included), id, and its labels theme, topic, style, feature, grammar, persona,
                         initial_word_type, initial_letter (text) and num_paragraphs (a whole number); a label
                         the input does not have (text input has none) is null
    meta.json            vocab size, special ids, tokenizer file and sha256, counts, the split rule, the labels

The labels sit next to the tokens, so activations and losses can be grouped by label without
re-tokenizing: story_ranges gives the token ranges of the stories with given labels, read_index the table.
read_offsets, story_windows and window_tokens make the training windows that start at a story's BOS
(train.py --windows=story).

    from prepare import story_ranges
    tokens = np.memmap("data/sample/val.bin", dtype=np.uint16, mode="r")
    for start, end in story_ranges("data/sample", "val", theme="Celebration", num_paragraphs=[2, 3]):
        story = tokens[start:end]    # BOS story EOS

A story goes to val when the hash of its id falls under --val_fraction, so adding stories never
moves an old one across splits. A dataset with a split of its own (the published test split) keeps
it: --val_input goes to val.bin whole and --input to train.bin whole; a hub dataset
(--input=hf:OWNER/NAME) does this by itself with its train and test (or validation, valid, dev) splits. Stories are streamed and encoded in chunks on all cores, so memory
stays flat whatever the corpus size. Everything is written under temporary names and renamed at
the end: an interrupted run leaves the previous output (or none), never bins that look complete.
"""

import hashlib
import itertools
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from configurator import Parser, atomic_write, die
from tokenizer import HUB, LABELS, VAL_SPLITS, Tokenizer, hub_splits, input_files, input_name, parse_hub, read_stories

SPLITS = ("train", "val")
INDEX_SCHEMA = pa.schema([("offset", pa.uint64()), ("length", pa.uint32()), ("id", pa.string())]
                         + [(k, pa.int32() if k == "num_paragraphs" else pa.string()) for k in LABELS])


def split_of(story_id, val_fraction):
    """'val' for a fixed val_fraction of ids, chosen by hash: stable as the corpus grows."""
    h = int.from_bytes(hashlib.sha256(story_id.encode("utf-8")).digest()[:8], "little")
    return "val" if h < val_fraction * 2**64 else "train"


def hub_val_input(input_spec):
    """The val split of a hub dataset given as --input=hf:OWNER/NAME (no split named), or None."""
    if not input_spec.startswith(HUB) or parse_hub(input_spec)[1]:
        return None
    repo_id = parse_hub(input_spec)[0]
    splits = hub_splits(repo_id)
    return next((f"{HUB}{repo_id}:{s}" for s in VAL_SPLITS if s in splits), None)


def prepare(input_spec, tokenizer_file, data_dir, val_fraction=0.05, chunk_stories=4096, val_input=None):
    """Tokenize the stories into data_dir; returns meta. With val_input, its stories make val.bin and
    input_spec's make train.bin; without, each story's split comes from the hash of its id."""
    if val_input is not None:
        both = {os.path.realpath(f) for f in input_files(input_spec)} & {os.path.realpath(f) for f in input_files(val_input)}
        if both:  # its stories would go to train.bin as well as val.bin
            raise ValueError(f"{sorted(both)[0]} is in both --input={input_spec} and --val_input={val_input}: move the "
                             f"val stories out of the train input, or give it as a file or glob of the train files alone")
    tok = Tokenizer(tokenizer_file)
    if tok.vocab_size >= 65536:
        raise ValueError(f"{tokenizer_file} has {tok.vocab_size} pieces, too many for uint16 token files; train a tokenizer with --vocab_size below 65536")
    paths = {f"{s}.{ext}": os.path.join(data_dir, f"{s}.{ext}") for s in SPLITS for ext in ("bin", "idx", "stories.parquet")}
    files, index = {}, {}  # open files, and the parquet writer of each split's story index
    counts = {s: {"stories": 0, "tokens": 0, "bytes": 0} for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}  # of each bin as written: a resume checks it is the same
    labelled = set()  # the labels some story has
    unigram = np.zeros(tok.vocab_size, dtype=np.int64)  # token frequencies in train, for the unigram baseline
    made_data_dir = not os.path.isdir(data_dir)
    try:
        try:
            os.makedirs(data_dir, exist_ok=True)
            for name, path in paths.items():
                files[name] = open(path + ".tmp", "wb")
            for s in SPLITS:
                index[s] = pq.ParquetWriter(files[f"{s}.stories.parquet"], INDEX_SCHEMA)
        except OSError as e:
            raise ValueError(f"cannot write to --data_dir={data_dir}: {e.strerror}") from None
        bar = tqdm(unit=" stories", desc="tokenizing", dynamic_ncols=True)
        start = time.time()

        def stories():  # (split, id, story, labels)
            if val_input is None:
                for sid, text, labels in read_stories(input_spec, labels=True):
                    yield split_of(sid, val_fraction), sid, text, labels
            else:
                for split, spec in (("train", input_spec), ("val", val_input)):
                    for sid, text, labels in read_stories(spec, labels=True):
                        yield split, sid, text, labels

        def write(chunk):
            encoded = tok.encode_many([text for _, _, text, _ in chunk], bos=True, eos=True)
            for s in SPLITS:
                rows = [(sid, text, labels, ids) for (si, sid, text, labels), ids in zip(chunk, encoded) if si == s]
                if not rows:
                    continue
                lengths = np.array([len(ids) for *_, ids in rows], dtype="<u8")
                offsets = counts[s]["tokens"] + np.cumsum(lengths) - lengths
                offsets.tofile(files[f"{s}.idx"])
                columns = {"offset": offsets, "length": lengths.astype(np.uint32), "id": [sid for sid, *_ in rows]}
                for k in LABELS:
                    columns[k] = [labels.get(k) for _, _, labels, _ in rows]
                    if any(v is not None for v in columns[k]):
                        labelled.add(k)
                index[s].write_table(pa.table(columns, schema=INDEX_SCHEMA))
                tokens = np.fromiter(itertools.chain.from_iterable(ids for *_, ids in rows), dtype="<u2")
                tokens.tofile(files[f"{s}.bin"])
                digests[s].update(tokens.tobytes())
                if s == "train":
                    unigram[:] += np.bincount(tokens, minlength=tok.vocab_size)
                counts[s]["stories"] += len(rows)
                counts[s]["tokens"] += int(lengths.sum())
                counts[s]["bytes"] += sum(len(text.encode("utf-8")) for _, text, _, _ in rows)
            bar.update(len(chunk))
            tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
            bar.set_postfix_str(f"{tokens / (time.time() - start):,.0f} tokens/s")

        chunk = []
        for item in stories():
            chunk.append(item)
            if len(chunk) == chunk_stories:
                write(chunk)
                chunk = []
        if chunk:
            write(chunk)
        bar.close()
        for s in SPLITS:
            if counts[s]["stories"] == 0:
                if val_input is not None:
                    raise ValueError(f"{val_input if s == 'val' else input_spec} holds no stories for {s}.bin")
                raise ValueError(f"no stories went to {s} (val_fraction={val_fraction}, {counts['train']['stories'] + counts['val']['stories']} stories); give more stories or another --val_fraction")
        for writer in index.values():
            writer.close()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
    except BaseException:
        for writer in index.values():
            try:
                writer.close()
            except Exception:  # an error while the last row group was written: the file goes anyway
                pass
        for name, f in files.items():
            f.close()
            os.remove(paths[name] + ".tmp")
        if made_data_dir and os.path.isdir(data_dir) and not os.listdir(data_dir):
            os.rmdir(data_dir)
        raise
    p = unigram[unigram > 0] / unigram.sum()
    meta = {
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "dtype": "uint16",
        "tokenizer": tokenizer_file, "tokenizer_sha256": tok.sha256(),
        "input": input_spec, "val_input": val_input, "val_fraction": None if val_input else val_fraction,
        "split": "train.bin from input, val.bin from val_input" if val_input else
                 "val if int.from_bytes(sha256(id)[:8], 'little') < val_fraction * 2**64, else train",
        **{s: {**counts[s], "sha256": digests[s].hexdigest()} for s in SPLITS},
        # cross-entropy (nats per token) of predicting train tokens by their frequency alone: the loss to beat
        "unigram_entropy": float(-(p * np.log(p)).sum()),
        "labels": [k for k in LABELS if k in labelled],  # the label columns of the story index that hold values
        "stories_index": "{split}.stories.parquet: offset, length, id and labels of each story in bin order; "
                         "prepare.story_ranges(data_dir, split, label=value, ...) gives token ranges",
    }
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # bins and an old meta.json never stand together
    for path in paths.values():
        os.replace(path + ".tmp", path)
    with atomic_write(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def open_bins(data_dir, splits=SPLITS):
    """(meta, {split: token ids}) of the bins in data_dir, memmapped, checked against their meta.json: ValueError in
    one line naming the file, for a meta.json that is missing, not JSON or without what this script writes in it,
    and for a bin of another size than meta.json gives or holding an id past vocab_size (damaged). The scripts that
    read bins (train.py, evaluate.py, activations.py, remove_norms.py, judge.py) check them through this first."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{meta_path} is missing; run prepare.py to make the bins of {data_dir}")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError:  # not JSON, or not UTF-8
        raise ValueError(f"{meta_path} is not valid JSON; run prepare.py again") from None
    if not isinstance(meta, dict) or not {"vocab_size", "bos_id", "eos_id", "dtype", "tokenizer", "tokenizer_sha256",
                                          "unigram_entropy", *SPLITS} <= set(meta) or not all(
            isinstance(meta[split], dict) and type(meta[split].get("tokens")) is int for split in SPLITS):
        raise ValueError(f"{meta_path} lacks keys that prepare.py writes; run prepare.py again")
    if meta["dtype"] != "uint16":
        raise ValueError(f"{meta_path} says the bins hold {meta['dtype']}, not uint16 token ids; run prepare.py again")
    bins = {}
    for split in splits:
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size != 2 * meta[split]["tokens"]:
            raise ValueError(f"{path} is missing or does not match {meta_path} ({size} bytes, expected "
                             f"{2 * meta[split]['tokens']}); run prepare.py again")
        bins[split] = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, dtype=np.uint16)
        largest = int(bins[split].max(initial=0))  # 0.06 s for 500M tokens in the page cache
        if largest >= meta["vocab_size"]:
            raise ValueError(f"{path} holds token id {largest}, not below vocab_size {meta['vocab_size']}: it is "
                             f"damaged; run prepare.py again")
    return meta, bins


def read_index(data_dir, split="val", columns=None):
    """The story index of a split as a pyarrow Table (offset, length, id and the labels, in bin order), checked
    against meta.json; label columns come dictionary-encoded. ValueError if it is missing or does not match."""
    path, meta_path = os.path.join(data_dir, f"{split}.stories.parquet"), os.path.join(data_dir, "meta.json")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if not os.path.isfile(path) or not os.path.isfile(meta_path):
        raise ValueError(f"{path} does not exist; run prepare.py for {data_dir} again")
    try:
        with open(meta_path) as f:
            expected = json.load(f)[split]["stories"]
        table = pq.read_table(path, columns=columns, read_dictionary=[k for k in LABELS if k != "num_paragraphs"])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as e:
        raise ValueError(f"cannot read {path} or {meta_path} ({type(e).__name__}); run prepare.py again") from None
    if table.num_rows != expected:
        raise ValueError(f"{path} has {table.num_rows} stories, {meta_path} says {expected}; run prepare.py again")
    return table


def read_offsets(data_dir, split="train"):
    """The token offset of each story's BOS in {split}.bin, from {split}.idx, as int64, in bin order. ValueError if
    the file is missing or does not fit meta.json."""
    path, meta_path = os.path.join(data_dir, f"{split}.idx"), os.path.join(data_dir, "meta.json")
    try:
        with open(meta_path) as f:
            counts = json.load(f)[split]
        offsets = np.fromfile(path, dtype="<u8").astype(np.int64)
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"cannot read {path} or {meta_path}; run prepare.py for {data_dir} again") from None
    if len(offsets) != counts["stories"] or offsets[0] != 0 or (np.diff(offsets) < 2).any() or offsets[-1] > counts["tokens"] - 2:
        raise ValueError(f"{path} does not fit {meta_path} ({len(offsets)} stories); run prepare.py again")
    return offsets


def story_windows(offsets, n_tokens, width, count, rng, lookahead=32):
    """count windows of width tokens that each start at a story's BOS: stories drawn at random (rng.integers over
    the stories of offsets, in a bin of n_tokens tokens) and packed whole, first fit. A window takes the first of
    the stories waiting, then any of the next that still fit (up to lookahead stories wait); a story longer than
    width is cut to width. Returns, per window, its stories as (start, length) token ranges in order; the rest of
    a window is padding. The same rng state gives the same windows."""
    lengths = np.minimum(np.diff(offsets, append=n_tokens), width)
    waiting, packed = [], []
    while len(packed) < count:
        window, free, i = [], width, 0
        while free > 0:
            if i == len(waiting):
                if len(waiting) == lookahead:
                    break
                waiting.append(int(rng.integers(len(offsets))))
            story = waiting[i]
            if lengths[story] <= free:  # the first story waiting always fits an empty window
                window.append((int(offsets[story]), int(lengths[story])))
                free -= int(lengths[story])
                waiting.pop(i)
            else:
                i += 1
        packed.append(window)
    return packed


def window_tokens(tokens, packed, width):
    """The (len(packed), width) int64 tokens of story_windows' windows, read from tokens (the bin): each window's
    stories one after another, then -1 (padding, a target the loss ignores)."""
    rows = np.full((len(packed), width), -1, dtype=np.int64)
    for row, stories in enumerate(packed):
        at = 0
        for start, length in stories:
            rows[row, at:at + length] = tokens[start:start + length]
            at += length
    return rows


def story_ranges(data_dir, split="val", **labels):
    """Token ranges [start, end) in {split}.bin of the stories whose labels match, in bin order, as an (n, 2) int64
    array; tokens[start:end] is BOS story EOS. Each keyword is a label and its value one value or a list of
    values (any of them); several keywords must all match; none: every story.

        story_ranges("data/sample", "val", theme="Celebration")
        story_ranges("data/sample", "train", theme=["Friendship", "Courage"], num_paragraphs=3)

    read_index(data_dir, split)[label].unique() lists a label's values."""
    unknown = [k for k in labels if k not in LABELS]
    if unknown:
        raise ValueError(f"no label {unknown[0]!r}; the labels are {', '.join(LABELS)}")
    table = read_index(data_dir, split, columns=["offset", "length", *labels])
    mask = pa.array(np.ones(table.num_rows, dtype=bool))
    for key, wanted in labels.items():
        wanted = wanted if isinstance(wanted, (list, tuple, set)) else [wanted]
        column = table[key]
        value_type = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
        try:
            if pa.types.is_integer(value_type) and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                           for v in wanted):
                raise TypeError("not whole numbers")  # pyarrow would cut 2.5 down to 2
            values = pa.array(list(wanted), type=value_type)
        except (pa.ArrowException, TypeError, ValueError):
            raise ValueError(f"label {key} holds {value_type} values, not {list(wanted)!r}") from None
        if pa.types.is_string(value_type):  # a value the split lacks is fine, one it holds in other case is a typo
            held = {v.casefold(): v for v in pc.unique(column).to_pylist() if v is not None}
            for v in set(wanted) - set(held.values()):
                if v.casefold() in held:
                    raise ValueError(f"label {key} has no value {v!r}; the {split} split holds {held[v.casefold()]!r}")
        mask = pc.and_(mask, pc.fill_null(pc.is_in(column, value_set=values), False))
    chosen = table.filter(mask)
    start = chosen["offset"].to_numpy().astype(np.int64)
    return np.stack([start, start + chosen["length"].to_numpy().astype(np.int64)], axis=1)


def main():
    parser = Parser(__doc__, "prepare.py")
    parser.add_argument("--input", default="data/sample/stories.jsonl",
                        help="stories: .jsonl, .parquet or .txt file, folder or glob, or hf:OWNER/NAME on the hub")
    parser.add_argument("--val_input", default="", help="stories that make val.bin whole (then --input makes train.bin)")
    parser.add_argument("--tokenizer", default="tokenizers/sample.model", help="sentencepiece model from tokenizer.py, or a Hugging Face tokenizer.json")
    parser.add_argument("--data_dir", default="", help="where the bins go (default: the input's folder, data/<name> for hf:)")
    parser.add_argument("--val_fraction", type=float, default=0.05, help="share of stories that go to val.bin")
    parser.add_argument("--chunk_stories", type=int, default=4096, help="stories encoded and written at a time")
    args = parser.parse_args()
    if not 0 < args.val_fraction < 1:
        die(f"--val_fraction={args.val_fraction} must be between 0 and 1")
    if args.chunk_stories < 1:
        die(f"--chunk_stories={args.chunk_stories} must be at least 1")
    Tokenizer(args.tokenizer)  # a bad --tokenizer is reported before any download
    val_input = args.val_input or hub_val_input(args.input)
    if args.data_dir:
        data_dir = args.data_dir
    elif args.input.startswith(HUB):
        data_dir = os.path.join("data", input_name(args.input))
    else:
        data_dir = os.path.dirname(input_files(args.input)[0]) or os.curdir
    meta = prepare(args.input, args.tokenizer, data_dir, args.val_fraction, args.chunk_stories, val_input)
    for s in SPLITS:
        print(f"{os.path.join(data_dir, s + '.bin')}: {meta[s]['stories']:,} stories, {meta[s]['tokens']:,} tokens")
    print(f"unigram entropy of train.bin: {meta['unigram_entropy']:.3f} nats per token (the loss of a model that ignores context)")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        die(str(e))
    except OSError as e:  # reading is checked in read_stories: a write failed (a full disk), and nothing was written
        die(f"cannot write the bins: {e.strerror or e}; free some space, or choose another --data_dir")
    except KeyboardInterrupt:  # each file is written whole and then renamed into place, or not at all
        die("interrupted: run the same command again (no half-written bins are left for train.py to read)")
