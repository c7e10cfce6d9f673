"""Train the SimpleStories tokenizer, and the Tokenizer class every other script uses.

A sentencepiece BPE model (4096 pieces by default) trained on the stories themselves, set up to be
lossless: no normalization, whitespace kept as it is, byte fallback for any character outside the
vocab, and a paragraph break ("\\n\\n") as a single piece. So decode(encode(s)) == s for any string.

    python tokenizer.py --input=data/sample/stories.jsonl              # -> tokenizers/sample.model
    python tokenizer.py --input=hf:SimpleStories/SimpleStories        # -> tokenizers/simplestories.model

Input is our stories.jsonl, the published SimpleStories parquet shards (column `story`), or plain
text with stories separated by a line `<|endoftext|>` (the TinyStories text format); see read_stories.
`hf:OWNER/NAME` is a dataset on the Hugging Face hub: its parquet shards are downloaded once into the
hub's local cache, and its train split is read (`hf:OWNER/NAME:test` reads another split).
"""

import glob
import hashlib
import io
import json
import os
import re

import sentencepiece as spm

from configurator import Parser, atomic_write, die, folder_problem

PARAGRAPH_BREAK = "\n\n"
TEXT_SEPARATOR = "<|endoftext|>"
NOT_STORIES = (".stories.parquet", ".dropped.jsonl")  # files a folder of stories holds beside them: prepare.py's, the generator's
SP_SPACE = "\u2581"  # sentencepiece's whitespace symbol; a literal one in the text is encoded as bytes


HUB = "hf:"  # the prefix of an input on the Hugging Face hub
VAL_SPLITS = ("test", "validation", "valid", "dev")  # the hub split that goes to val.bin: the first a dataset has


def hub_splits(repo_id, flag="--input"):
    """{split: [parquet files]} of a dataset on the Hugging Face hub, downloaded once into the hub's cache; flag is
    the script's flag for an input, which the errors name.
    A file's split is the first part of its path named like one: data/train-00000-of-00004.parquet is in
    train, default/test/0000.parquet in test."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet"])
    except Exception as e:  # offline, not found, gated: huggingface_hub has many error types, all end here
        raise ValueError(f"cannot get dataset {repo_id} from the Hugging Face hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'}); check the name and the network, "
                         f"or download it and give {flag} a local folder") from None
    splits = {}
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)):
        parts = [re.split(r"[-_.]", part)[0] for part in os.path.relpath(path, folder).split(os.sep)]
        split = next((p for p in parts if p in ("train", *VAL_SPLITS)), "train")
        splits.setdefault(split, []).append(path)
    if not splits:
        raise ValueError(f"dataset {repo_id} on the Hugging Face hub has no parquet files; give {flag} a local copy")
    return splits


def parse_hub(spec):
    """(repo_id, split) of an input 'hf:OWNER/NAME' or 'hf:OWNER/NAME:SPLIT' (split None when not given)."""
    repo_id, _, split = spec[len(HUB):].partition(":")
    return repo_id, split or None


def input_name(spec):
    """A short name for an input: the hub dataset's name, or the folder the input files are in."""
    if spec.startswith(HUB):
        return parse_hub(spec)[0].split("/")[-1].lower()
    return os.path.basename(os.path.dirname(os.path.abspath(input_files(spec)[0])))


def input_files(spec, flag="--input"):
    """Files named by spec: a file, a folder (its .jsonl, .parquet and .txt files, less what the pipeline writes beside
    the stories: prepare.py's story index, the generator's dropped prompts), a glob pattern (less those too), or a
    dataset on the Hugging Face hub, 'hf:OWNER/NAME[:SPLIT]' (the train split unless another is named); flag is
    the script's flag for an input, which the errors name."""
    if spec.startswith(HUB):
        repo_id, split = parse_hub(spec)
        splits = hub_splits(repo_id, flag)
        if (split or "train") not in splits:
            raise ValueError(f"dataset {repo_id} has no split {split or 'train'!r} (it has {', '.join(splits)}); "
                             f"name one as {flag}=hf:{repo_id}:SPLIT")
        return splits[split or "train"]
    if os.path.isdir(spec):
        files = sorted(f for ext in ("jsonl", "parquet", "txt")
                       for f in glob.glob(os.path.join(glob.escape(spec), f"*.{ext}")) if not f.endswith(NOT_STORIES))
    elif os.path.isfile(spec) or not any(c in spec for c in "*?["):  # a file named my[v2].jsonl is that file
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec) if not f.endswith(NOT_STORIES))
    if not files:
        raise ValueError(f"no input files match {spec!r}; give a .jsonl, .parquet or .txt file, a folder of them, or a glob pattern")
    for f in files:
        if not os.path.isfile(f):
            raise ValueError(f"input file {f} does not exist; run generate_stories.py or point {flag} at your stories")
        if not f.endswith((".jsonl", ".parquet", ".txt")):
            raise ValueError(f"{f}: unknown input format; use .jsonl (one JSON record per line), .parquet (column 'story') or .txt")
    return files


def story_id(text):
    """Stable id for a story that comes without one: a hash of its text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


# the prompt labels a story record carries (stories.py writes them, the published dataset has the same columns);
# num_paragraphs is a whole number, the others text ("" for an axis the prompt left out)
LABELS = ("theme", "topic", "style", "feature", "grammar", "persona", "initial_word_type", "initial_letter",
          "num_paragraphs")


def is_text(s):
    """Whether the string s is text that UTF-8 can hold: JSON's escapes can make a lone surrogate, which is not."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def story_labels(values, where):
    """{label: value} of the LABELS present in values (a record, or a parquet row), each checked: num_paragraphs
    a whole number, the others text. A missing or null label is left out. ValueError names where."""
    labels = {}
    for key in LABELS:
        value = values.get(key)
        if value is None:
            continue
        wanted = int if key == "num_paragraphs" else str
        if wanted is int and type(value) is float and value.is_integer():  # pandas stores an int column with nulls as floats
            value = int(value)
        if type(value) is not wanted or not (is_text(value) if wanted is str else 0 <= value < 2**31):  # int32 column
            raise ValueError(f"{where}: label {key} is {value!r}, not "
                             f"{'a whole number from 0 to 2**31 - 1' if wanted is int else 'text'}")
        labels[key] = value
    return labels


def read_stories(spec, labels=False):
    """Yield (id, story) for every story in the input files, streaming, in file order; with labels=True,
    (id, story, labels), labels a {label: value} dict of the LABELS the record has (empty for text input).

    Bad input (a line that is not JSON, a record without a text 'story', bytes that are not UTF-8, a parquet
    'story' column that is not strings, with labels=True a label of the wrong type) raises ValueError naming the
    file and line. A story that is empty or only whitespace (or a parquet null) is skipped, in every format: it
    would train on BOS EOS alone. A UTF-8 byte order mark at the start of a file is skipped, and a .txt file's
    CRLF line ends read as LF.
    """
    for path in input_files(spec):
        try:
            yield from stories_in(path, labels)
        except OSError as e:  # a disk or network file system that fails while the file is read
            raise ValueError(f"{path}: cannot read it ({e.strerror or e}); check the file and run again") from None


def stories_in(path, labels):
    """read_stories for one file."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
                except UnicodeDecodeError:
                    raise ValueError(f"{path} line {line_no}: not UTF-8 text; re-encode the file as UTF-8") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg}); fix or delete that line") from None
                if not isinstance(record, dict) or not isinstance(record.get("story"), str):
                    raise ValueError(f"{path} line {line_no}: record has no text field 'story'; each line must be a JSON object with a 'story' string")
                if not record["story"].strip():
                    continue
                sid = "" if record.get("id") is None else str(record["id"])  # an id of 0 is an id
                if not is_text(record["story"]) or not is_text(sid):
                    raise ValueError(f"{path} line {line_no}: its story or id holds a lone surrogate (an escape in "
                                     f"\\ud800-\\udfff without its pair), which is not text; fix or delete that line")
                sid = sid or story_id(record["story"])
                if labels:
                    yield sid, record["story"], story_labels(record, f"{path} line {line_no}")
                else:
                    yield sid, record["story"]
    elif path.endswith(".parquet"):
        import pyarrow as pa  # only needed for the published parquet shards
        import pyarrow.parquet as pq

        try:  # a file cut short or not parquet at all is found on opening it or on reading a row group
            shard = pq.ParquetFile(path)
            names = shard.schema_arrow.names
            if "story" not in names:
                raise ValueError(f"{path}: no column 'story' (columns: {', '.join(names)})")
            story_type = shard.schema_arrow.field("story").type
            if not (pa.types.is_string(story_type) or pa.types.is_large_string(story_type)):
                raise ValueError(f"{path}: column 'story' holds {story_type}, not strings")
            columns = ["story"] + (["id"] if "id" in names else []) + ([k for k in LABELS if k in names] if labels else [])
            row = 0
            for batch in shard.iter_batches(columns=columns, batch_size=8192):
                data = batch.to_pydict()
                stories, ids = data["story"], data.get("id") or [None] * batch.num_rows
                for j, (i, text) in enumerate(zip(ids, stories)):
                    if text is None or not text.strip():
                        continue
                    sid = story_id(text) if i is None or i == "" else str(i)
                    if labels:
                        yield sid, text, story_labels({k: data[k][j] for k in LABELS if k in data}, f"{path} row {row + j}")
                    else:
                        yield sid, text
                row += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e}); replace it with a whole copy") from None
    else:
        with open(path, "rb") as f:
            lines = []
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path} line {line_no}: not UTF-8 text; re-encode the file as UTF-8") from None
                if line.endswith("\r\n"):
                    line = line[:-2] + "\n"
                if line.strip() == TEXT_SEPARATOR:
                    text = "".join(lines).strip("\n")
                    if text.strip():
                        yield (story_id(text), text, {}) if labels else (story_id(text), text)
                    lines = []
                else:
                    lines.append(line)
            text = "".join(lines).strip("\n")
            if text.strip():
                yield (story_id(text), text, {}) if labels else (story_id(text), text)


class Tokenizer:
    """A trained tokenizer: encode, encode_many, decode, bos_id, eos_id, vocab_size, token_bytes, sha256.

    Tokenizer(path) reads the model file; Tokenizer(path, proto) takes the file's bytes as they were saved
    elsewhere (a checkpoint keeps them), path then only naming where they came from. The file is our
    sentencepiece model, or a tokenizer.json of the `tokenizers` library: the published SimpleStories
    checkpoints carry a lowercasing WordPiece one ([UNK] 0, [EOS] 1, no BOS: a story starts after EOS,
    so EOS stands for BOS), and export.py writes one equal to ours."""

    def __init__(self, model_file, proto=None):
        if proto is None:
            if not os.path.isfile(model_file):
                raise ValueError(f"tokenizer {model_file} does not exist; train one with tokenizer.py")
            with open(model_file, "rb") as f:
                proto = f.read()
        self.model_file, self.proto = model_file, proto
        self.sp = self.fast = None
        if proto.lstrip()[:1] == b"{":
            self._load_fast(proto)
            return
        try:
            if not proto:  # sentencepiece takes empty bytes for a model with no pieces
                raise RuntimeError
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError:
            raise ValueError(f"{model_file} is not a sentencepiece model; train one with tokenizer.py") from None
        self.vocab_size = self.sp.vocab_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"{model_file} has no end-of-text piece (eos_id -1); train one with tokenizer.py")
        # a model without BOS starts a story after EOS, as the WordPiece tokenizers below do
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else self.eos_id
        # a literal U+2581 would come back as a space, so it is spelled as its three UTF-8 bytes
        self._sp_space_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode("utf-8")]

    def _load_fast(self, proto):
        from tokenizers import Tokenizer as FastTokenizer

        try:
            self.fast = FastTokenizer.from_str(proto.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ValueError(f"{self.model_file} is not a tokenizer.json of the tokenizers library ({e})") from None
        self.fast.encode_special_tokens = True  # "[EOS]" in a story is text, as "</s>" is for sentencepiece
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        vocab = self.fast.get_vocab(with_added_tokens=True)
        eos = [vocab[t] for t in ("</s>", "[EOS]", "<|endoftext|>", "<eos>") if t in vocab]
        if not eos:
            raise ValueError(f"{self.model_file} has no end-of-text token (</s>, [EOS], <|endoftext|> or <eos>)")
        self.eos_id = eos[0]
        self.bos_id = next((vocab[t] for t in ("<s>", "[BOS]", "<bos>") if t in vocab), self.eos_id)

    def encode(self, text, bos=False, eos=False):
        if self.fast is not None:
            ids = self.fast.encode(text, add_special_tokens=False).ids
        elif SP_SPACE in text:
            parts = text.split(SP_SPACE)
            ids = self.sp.encode(parts[0])
            for part in parts[1:]:
                ids += self._sp_space_bytes + self.sp.encode(part)
        else:
            ids = self.sp.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_many(self, texts, bos=False, eos=False, num_threads=-1):
        """Encode a list of strings on all cores (sentencepiece's own threads, which release the GIL)."""
        if self.fast is not None:
            out = [e.ids for e in self.fast.encode_batch(texts, add_special_tokens=False)]
        else:
            out = self.sp.encode(texts, num_threads=num_threads if num_threads > 0 else os.cpu_count())
            for i, text in enumerate(texts):
                if SP_SPACE in text:
                    out[i] = self.encode(text)
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in out]

    def decode(self, ids):
        ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        return self.fast.decode(ids, skip_special_tokens=True) if self.fast is not None else self.sp.decode(ids)

    def continuation(self, prompt_ids, new_ids):
        """The text new_ids add after prompt_ids. Decoded together, less the prompt's own text: WordPiece decodes a
        piece by the one before it (the space before a word, a '##' piece joined to its word), so new_ids decoded
        alone would glue the first word to the prompt or show its '##'."""
        before, whole = self.decode(prompt_ids), self.decode(list(prompt_ids) + list(new_ids))
        return whole[len(before):] if whole.startswith(before) else self.decode(new_ids)

    def token_bytes(self):
        """Number of UTF-8 bytes each token id stands for (0 for BOS, EOS and unknown): the denominator of bits
        per byte. Exact for our tokenizers; for a WordPiece one, which drops spaces and case, an estimate:
        a piece that starts a word counts the space before it."""
        if self.fast is not None:
            specials = {t.content for t in self.fast.get_added_tokens_decoder().values() if t.special}
            wordpiece = json.loads(self.proto)["model"]["type"] == "WordPiece"
            sizes = []
            for i in range(self.vocab_size):
                piece = self.fast.id_to_token(i) or ""
                if piece in specials:
                    sizes.append(0)
                elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
                    sizes.append(1)
                elif wordpiece:
                    sizes.append(len(piece[2:].encode("utf-8")) if piece.startswith("##") else len(piece.encode("utf-8")) + 1)
                else:
                    sizes.append(len(piece.encode("utf-8")))
            return sizes
        sizes = []
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_control(i) or self.sp.is_unknown(i):
                sizes.append(0)
            elif self.sp.is_byte(i):
                sizes.append(1)
            else:
                sizes.append(len(piece.replace(SP_SPACE, " ").encode("utf-8")))
        return sizes

    def sha256(self):
        return hashlib.sha256(self.proto).hexdigest()


MAX_PARAGRAPH_BYTES = 1 << 16  # the longest paragraph (UTF-8) the tokenizer trains on: a longer one is left out


def train(input_spec, model_file, vocab_size=4096, max_paragraphs=2_000_000):
    """Train a BPE model on the paragraphs of the input stories and write it to model_file."""

    problem = folder_problem(os.path.dirname(os.path.abspath(model_file)))  # found before the training, which may be long
    if problem:
        raise ValueError(f"cannot write {model_file}: {problem}")
    bad_input = []  # an error in the input, kept: sentencepiece would wrap it in its own multi-line one
    n_paragraphs = n_too_long = 0

    def paragraphs():
        nonlocal n_paragraphs, n_too_long
        try:
            for _, text in read_stories(input_spec):
                for paragraph in text.split(PARAGRAPH_BREAK):
                    if len(paragraph.encode()) > MAX_PARAGRAPH_BYTES:  # sentencepiece's trainer would skip it
                        n_too_long += 1
                    elif paragraph.strip():
                        n_paragraphs += 1
                        yield paragraph
        except ValueError as e:
            bad_input.append(e)
            raise

    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=paragraphs(), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9999,
            user_defined_symbols=[PARAGRAPH_BREAK], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            input_sentence_size=max_paragraphs, shuffle_input_sentence=True, max_sentence_length=MAX_PARAGRAPH_BYTES,
            num_threads=os.cpu_count(), minloglevel=2)
    except RuntimeError as e:
        if bad_input:
            raise bad_input[0] from None
        if n_paragraphs == 0 and n_too_long:
            raise ValueError(f"every paragraph of {input_spec} is longer than {MAX_PARAGRAPH_BYTES:,} bytes, the longest "
                             f"the tokenizer trains on; separate its paragraphs with blank lines") from None
        if n_paragraphs == 0:
            raise ValueError(f"{input_spec} holds no stories to train a tokenizer on") from None
        smallest = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if smallest:  # the special pieces, 256 byte pieces and every character of the input
            raise ValueError(f"vocab_size={vocab_size} is too small: this input needs at least {smallest.group(1)} "
                             f"pieces for its characters, bytes and special tokens; pass a larger --vocab_size "
                             f"(4096 is the default)") from None
        largest = re.search(r"value <= (\d+)", str(e))
        if largest:
            raise ValueError(f"the input is too small for vocab_size={vocab_size}: the largest vocab it supports is "
                             f"{largest.group(1)}; pass --vocab_size={largest.group(1)} or less, or give more stories") from None
        raise ValueError(f"sentencepiece could not train on {input_spec}: {e}") from None
    try:
        os.makedirs(os.path.dirname(model_file) or ".", exist_ok=True)
        with atomic_write(model_file) as f:
            f.write(proto.getvalue())
    except OSError as e:
        raise ValueError(f"cannot write {model_file}: {e.strerror}") from None


def main():
    parser = Parser(__doc__, "tokenizer.py")
    parser.add_argument("--input", default="data/sample/stories.jsonl",
                        help="stories: .jsonl, .parquet or .txt file, folder or glob, or hf:OWNER/NAME on the hub")
    parser.add_argument("--vocab_size", type=int, default=4096, help="number of pieces, special and byte pieces included")
    parser.add_argument("--name", default="", help="writes tokenizers/<name>.model (default: the input's folder or hub dataset name)")
    parser.add_argument("--max_paragraphs", type=int, default=2_000_000, help="train on a random sample of this many paragraphs at most")
    args = parser.parse_args()
    if args.vocab_size >= 65536:
        die(f"vocab_size={args.vocab_size} does not fit the uint16 token bins; use a vocab below 65536")
    if args.vocab_size < 1 or args.max_paragraphs < 1:
        die("--vocab_size and --max_paragraphs must be at least 1")
    name = args.name or input_name(args.input)
    model_file = os.path.join("tokenizers", f"{name}.model")
    train(args.input, model_file, args.vocab_size, args.max_paragraphs)
    tok = Tokenizer(model_file)
    n_stories, n_tokens, n_bytes = 0, 0, 0
    for _, text in read_stories(args.input):
        n_stories += 1
        n_tokens += len(tok.encode(text))
        n_bytes += len(text.encode("utf-8"))
        if n_stories == 10_000:
            break
    print(f"wrote {model_file}: {tok.vocab_size} pieces, {n_bytes / max(n_tokens, 1):.2f} bytes per token on {n_stories:,} stories")


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        die(str(e))
    except KeyboardInterrupt:  # each file is written whole and then renamed into place, or not at all
        die("interrupted: run the same command again (the tokenizer file is written whole or not at all)")
