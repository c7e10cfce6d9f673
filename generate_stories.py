"""
Generate a SimpleStories-style dataset: short stories in very simple words, each labelled with the
prompt it was written for, through the OpenAI API or any OpenAI-compatible server.

Prompt k is sampled from the axes in axes.json (theme, topic, style, narrative feature, grammar
point, narrator persona, opening word type and letter, paragraph count) by a generator seeded with
(seed, k) alone, each axis on its own, so a prompt never depends on the ones before it and shards
never overlap. A prompt asks for --stories_per_prompt stories separated by a marker line; the answer
is split, cleaned (typography to ASCII, titles, length, failed separators, exact duplicates) and
appended to --out, one JSON record per story, flushed and fsynced after each completion. A prompt whose
answer gives no usable story gets a line in <out>.dropped.jsonl instead (prompt_id, completion_id,
finish_reason, removed: the count of each removal reason, prompt_tokens, completion_tokens), written
with the same care, so that it is done too and not paid for again.

A run that stops (killed, crashed, Ctrl-C) and is started again with the same arguments skips the
prompts found in either file and ends with exactly --n_stories stories; a second run on the same --out
meanwhile is refused. The arguments that make the prompts and the answers (--model, --temperature,
--top_p, --stories_per_prompt, --max_tokens, --seed, --shard and the axes file's SHA-256) are kept in
<out>.run.json, and a run with other ones on the same --out is refused, naming what differs. With
--batch, the batches in flight are listed in <out>.batches.json, so a rerun polls them again instead of
paying twice. A run that writes no story leaves none of these files, unless batches are in flight.

A run stops by itself, non-zero, with one line that names the cause and what to do:
- the server cannot be reached: one GET {base_url}/models, 10 s at most, before anything is sent;
- --max_unusable answers in a row give no usable story (stories run together without the separator
  line, cut at --max_tokens, not ASCII with --ascii, too short...), or, once 100 answers are in, the
  usable stories are fewer than --min_yield of those asked for. A Batch run counts the requests that a
  batch answers with an error too, and while --out holds no story it sends one probe batch of at most
  32 requests at a time, so that a setup that gives nothing costs a few tens of requests;
- max(--concurrency, 10) prompts in a row get no answer after all their retries, or fewer where the run
  needs fewer prompts. While requests are retried a note on stderr says why, each time the reason changes.

A record: id (the story's SHA-1, as tokenizer.py derives it), story (paragraphs separated by a blank
line), the labels theme, topic, style, feature, grammar ("" if none), persona ("" if none),
initial_word_type, initial_letter, num_paragraphs; and how it was made: prompt_id, prompt, seed,
completion_id, story_index (its place in the answer), model (as the API reports it), temperature,
top_p, max_tokens, finish_reason, prompt_tokens and completion_tokens (of the whole completion).

Usage:
  python generate_stories.py --dry_run --n_stories=2000000     # example prompts, axis counts, independence, cost
  export OPENAI_API_KEY=...
  python generate_stories.py --n_stories=2000000 --out=data/mystories/stories.jsonl
  python generate_stories.py --batch --n_stories=2000000 --out=data/mystories/stories.jsonl  # half price, <= 24 h
  python generate_stories.py --base_url=http://localhost:8000/v1 --model=Qwen/Qwen2.5-7B-Instruct  # vLLM, Ollama...
  python generate_stories.py --shard=0/4 --out=data/mystories/stories.0.jsonl  # machine 0 of 4; cat the files after
"""

import argparse
import asyncio
import fcntl
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
from collections import Counter

import numpy as np
import openai
import tiktoken
from tqdm import tqdm

from tokenizer import story_id  # a record's id: the story's SHA-1 in 16 hex digits

# USD per million tokens (input, output), OpenAI's list prices as of 2025-08; --price_in/--price_out override.
PRICES = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5": (1.25, 10.00),
}
BATCH_DISCOUNT = 0.5  # the Batch API costs half
MAX_BATCH_REQUESTS = 50_000  # Batch API limits on one input file
MAX_BATCH_BYTES = 200 * 1000 * 1000
MAX_BACKOFF = 60.0  # seconds; the longest wait between two tries of a request
RETRIED_4XX = (408, 409, 429)  # request timeout, conflict, rate limit: worth another try; other 4xx answers are not
MIN_GIVE_UPS = 10  # prompts in a row that get no answer before a live run stops (at least --concurrency of them)
PREFLIGHT_TIMEOUT = 10.0  # seconds the server has to answer the GET /models that starts a run
MIN_ANSWERS = 100  # answers in before a run's yield is judged against --min_yield
PROBE_BATCH_SIZE = 32  # requests in the one batch in flight while --out holds no story: what a useless setup costs
MAX_BATCH_FAILURES = 5  # batches in a row that fail for the same reason before a Batch run stops
TOKENS_PER_PARAGRAPH = 75  # dry-run guess at output length: ~55 simple words a paragraph, ~1.3 tokens a word
SEPARATOR = "###"  # the line the model puts between two stories
HINTS = {  # why the stories of an answer were removed -> what to do when it happens to (nearly) all of them
    "separator_failed": f"the model does not put a line with only {SEPARATOR} between stories; try"
                        f" --stories_per_prompt=1 or another --model",
    "truncated": "the answers are cut at --max_tokens; raise it",
    "content_filter": "a content filter cuts the answers; try another --model or other --axes",
    "non_ascii": "the stories are not in ASCII; --ascii=False for another language",
    "too_short": "the stories are shorter than --min_words; lower it",
    "too_long": "the stories are longer than --max_words; raise it",
    "wrong_paragraphs": "the model does not write the paragraph count asked for; try another --model",
    "empty": "the answers are empty or refusals; try another --model",
    "duplicate": "the model writes the same stories again; raise --temperature",
}

# record label -> key in axes.json
AXES = {"theme": "themes", "topic": "topics", "style": "styles", "feature": "features", "grammar": "grammar",
        "persona": "personas", "initial_word_type": "initial_word_types", "initial_letter": "initial_letters",
        "num_paragraphs": "num_paragraphs"}
N_NAMES = 3  # character names offered in each prompt


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows this module's docstring as written, and each flag's default."""


def parse_args(argv=None):
    def boolean(s):
        if s.lower() not in ("true", "false", "1", "0"):
            raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")
        return s.lower() in ("true", "1")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--n_stories", type=int, default=1000, help="stories wanted in all shards together")
    p.add_argument("--out", default="data/stories/stories.jsonl", help="output file, appended to and resumed")
    p.add_argument("--axes", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "axes.json"))
    p.add_argument("--seed", type=int, default=0, help="prompt k is a function of (seed, k) only")
    p.add_argument("--shard", default="0/1", help="i/n: this machine does prompts k with k %% n == i")
    p.add_argument("--stories_per_prompt", type=int, default=4, help="stories asked for in one completion")
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--base_url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--max_tokens", type=int, default=4096, help="per completion; a story cut by it is dropped")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    p.add_argument("--rpm", type=float, default=0, help="requests per minute at most (0: no limit)")
    p.add_argument("--tpm", type=float, default=0, help="tokens per minute at most (0: no limit)")
    p.add_argument("--timeout", type=float, default=120, help="seconds a request may take before it is tried again")
    p.add_argument("--max_retries", type=int, default=10,
                   help="retries of a request before its prompt is left for a later run")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled each time")
    p.add_argument("--min_words", type=int, default=30, help="shorter stories are dropped")
    p.add_argument("--max_words", type=int, default=1200, help="longer stories are dropped")
    p.add_argument("--ascii", type=boolean, default=True,
                   help="transliterate stories to ASCII and drop what cannot be; False for other scripts")
    p.add_argument("--max_unusable", type=int, default=20,
                   help="answers in a row that give no usable story before the run stops")
    p.add_argument("--min_yield", type=float, default=0.1,
                   help=f"the run stops when, after {MIN_ANSWERS} answers, the usable stories are fewer than this"
                        f" share of the stories asked for")
    p.add_argument("--batch", type=boolean, nargs="?", const=True, default=False, help="use the Batch API")
    p.add_argument("--batch_size", type=int, default=MAX_BATCH_REQUESTS, help="requests in one batch")
    p.add_argument("--batches_in_flight", type=int, default=4)
    p.add_argument("--poll_interval", type=float, default=60, help="longest wait in seconds between batch polls")
    p.add_argument("--dry_run", type=boolean, nargs="?", const=True, default=False,
                   help="print example prompts, axis counts, independence check and cost; send nothing")
    p.add_argument("--n_examples", type=int, default=3, help="prompts the dry run prints")
    p.add_argument("--price_in", type=float, default=None, help="USD per million input tokens")
    p.add_argument("--price_out", type=float, default=None, help="USD per million output tokens")
    args = p.parse_args(argv)
    m = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if not m or not int(m.group(1)) < int(m.group(2)):
        sys.exit(f"error: --shard={args.shard}: expected i/n with 0 <= i < n, e.g. --shard=0/4")
    args.shard_index, args.n_shards = int(m.group(1)), int(m.group(2))
    for name in ("n_stories", "stories_per_prompt", "max_tokens", "concurrency", "batch_size", "batches_in_flight",
                 "max_unusable"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name}={getattr(args, name)}: must be at least 1")
    if not 0 <= args.min_yield <= 1:
        sys.exit(f"error: --min_yield={args.min_yield}: must be between 0 and 1")
    if args.seed < 0:
        sys.exit(f"error: --seed={args.seed}: must be >= 0")
    args.batch_size = min(args.batch_size, MAX_BATCH_REQUESTS)
    # this shard's part of the job
    args.target = args.n_stories // args.n_shards + (args.shard_index < args.n_stories % args.n_shards)
    return args

# -----------------------------------------------------------------------------
# axes and sampler


def load_axes(path):
    """{label: (values, cumulative probabilities)} for each axis of an axes file, and its names."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot read the axes file {path}: {e}")
    if not isinstance(raw, dict):
        sys.exit(f"error: {path} holds a JSON {type(raw).__name__}, not an object of axes at the top level;"
                 f" copy the layout of the repo's axes.json")
    optional = raw.get("optional", {})  # label: probability that the axis is present
    if not isinstance(optional, dict):
        sys.exit(f"error: 'optional' in {path} must be an object of label: probability, e.g. {{\"grammar\": 0.5}}")

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    axes = {}
    for label, key in AXES.items():
        entry = raw.get(key)
        if isinstance(entry, dict):  # value: weight; keys starting with _ are notes
            values = [v for v in entry if not v.startswith("_")]
            weights = [entry[v] for v in values]
        elif isinstance(entry, list):
            values, weights = entry, [1.0] * len(entry)
        else:
            sys.exit(f"error: {path} has no list '{key}'; copy the layout of the repo's axes.json")
        if not values or not all(number(w) and w > 0 for w in weights):
            sys.exit(f"error: '{key}' in {path} must be non-empty, with positive weights")
        if label == "num_paragraphs":  # counts: numbers in a list, strings as the keys of a dict
            if not all(str(v).isdigit() and int(v) >= 1 for v in values):
                sys.exit(f"error: '{key}' in {path} must be whole numbers >= 1, got {values}")
            values = [int(v) for v in values]
        elif not all(isinstance(v, str) and v.strip() for v in values):
            sys.exit(f"error: '{key}' in {path} must be non-empty strings, got"
                     f" {next(v for v in values if not isinstance(v, str) or not v.strip())!r}")
        weights = np.array(weights, dtype=np.float64) / sum(weights)
        if label in optional:  # present with this probability, else ""
            present = optional[label]
            if not number(present) or not 0 < present <= 1:
                sys.exit(f"error: optional '{label}' in {path} must be a probability in (0, 1], got {present!r}")
            values, weights = [""] + values, np.concatenate([[1 - present], present * weights])
        axes[label] = (values, np.cumsum(weights))
    names = raw.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        sys.exit(f"error: {path} has no list 'names' of character names (non-empty strings)")
    return axes, names


GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment


def mix64(x):
    """splitmix64's output function on a uint64 array: a bijection whose outputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_prompts(axes, names, seed, ks):
    """Value indices of each axis, and of N_NAMES names, for prompt ids ks (an int array).
    Prompt k's draws are the splitmix64 stream started at mix64(seed key ^ k): a function of (seed, k)
    only, so vectorised sampling of a million prompts is as reproducible as one at a time."""
    key = mix64(np.array([(seed + GOLDEN) % 2**64], dtype=np.uint64))
    state = mix64(np.asarray(ks, dtype=np.uint64) ^ key)

    def uniform(stream):  # the stream-th draw of each prompt, in [0, 1)
        return (mix64(state + np.uint64(stream * GOLDEN % 2**64)) >> np.uint64(11)) * 2.0 ** -53

    idx = {}
    for stream, (label, (values, cdf)) in enumerate(axes.items(), start=1):
        idx[label] = np.minimum(np.searchsorted(cdf, uniform(stream), side="right"), len(values) - 1)
    idx["names"] = np.stack([(uniform(100 + j) * len(names)).astype(np.int64) for j in range(N_NAMES)], axis=1)
    return idx


def prompt_at(axes, names, idx, j):
    """The labels and the names of the j-th prompt of a sample."""
    labels = {label: values[idx[label][j]] for label, (values, _) in axes.items()}
    return labels, list(dict.fromkeys(names[i] for i in idx["names"][j]))


def prompts_for(axes, names, args, ks):
    """(k, labels, prompt) for each prompt id in ks."""
    idx = sample_prompts(axes, names, args.seed, ks)
    for j, k in enumerate(ks):
        labels, prompt_names = prompt_at(axes, names, idx, j)
        yield k, labels, prompt_text(labels, prompt_names, args.stories_per_prompt)


def iter_prompts(axes, names, args, skip=()):
    """(k, labels, prompt) for this shard's prompts in order, leaving out the ids in skip."""
    for start in itertools.count(0, 4096):
        ks = args.shard_index + args.n_shards * np.arange(start, start + 4096)
        yield from prompts_for(axes, names, args, [k for k in ks.tolist() if k not in skip])

# -----------------------------------------------------------------------------
# prompt


def prompt_text(labels, names, n_stories):
    """The user message asking for n_stories stories with these labels."""
    word_type, p = labels["initial_word_type"], labels["num_paragraphs"]
    names = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))  # "Mia, Leo or Ava"
    rules = [f"Theme: {labels['theme']}. Topic: {labels['topic']}. Style: {labels['style']}.",
             f"Include {labels['feature']}."]
    if labels["grammar"]:
        rules.append(f"Use {labels['grammar']}.")
    if labels["persona"]:
        rules.append(f"Tell it in the first person, as {labels['persona']}.")
    rules += ["Write exactly one paragraph." if p == 1 else f"Write exactly {p} paragraphs, separated by a blank line.",
              f'Start with {"an" if word_type[0] in "aeiou" else "a"} {word_type} that begins with the letter '
              f'"{labels["initial_letter"]}".',
              f"If a character needs a name, you may use {names}.",
              "No title, no numbering, no comments."]
    simple = "in very simple words that a three-year-old understands"
    if n_stories == 1:
        head, tail = f"Write a short story for young children, {simple}. Follow these rules:", ""
    else:
        head = f"Write {n_stories} short stories for young children, {simple}. Every story follows these rules:"
        tail = f'\nStart each story differently. Put a line with only "{SEPARATOR}" between two stories.'
    return head + "\n" + "\n".join(f"- {r}" for r in rules) + tail

# -----------------------------------------------------------------------------
# cleaning


TYPOGRAPHY = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": " - ", "\u2015": " - ",
    "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u202f": " ", "\t": " ", "\r": "",
})
SEPARATOR_LINE = re.compile(rf"^[ \t]*{re.escape(SEPARATOR)}.*$", re.M)  # '### Story 2' counts as a separator
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")
NUMBERING = re.compile(r"^[*#\s]*(story\s*)?\d+\s*[.):]\s*(\*\*)?\s*", re.I)


def clean_story(text, num_paragraphs, args):
    """(story, None, fixes) with the story as plain paragraphs separated by a blank line, or
    (None, rule, fixes) with the name of the rule that drops it."""
    fixes = []
    fixed = text.translate(TYPOGRAPHY)
    if fixed != text:
        fixes.append("typography")
    if args.ascii and not fixed.isascii():
        # NFKD splits accented letters (and ligatures, full-width forms) into ASCII plus combining marks
        fixed = "".join(c for c in unicodedata.normalize("NFKD", fixed) if not unicodedata.combining(c))
        if not fixed.isascii():
            return None, "non_ascii", fixes
        fixes.append("transliterated")
    fixed = CONTROL.sub("", fixed)
    # paragraphs are separated by blank lines; a model that uses single line breaks throughout means the same
    blocks = re.split(r"\n\s*\n", fixed.strip()) if re.search(r"\n\s*\n", fixed) else fixed.strip().split("\n")
    paragraphs = ["\n".join(" ".join(line.split()) for line in b.strip().split("\n")) for b in blocks if b.strip()]
    if paragraphs and len(paragraphs[0].split()) <= 12 and "\n" not in paragraphs[0] and (
            paragraphs[0][0] in "#*" or paragraphs[0].lower().startswith("title") or paragraphs[0][-1] not in ".!?\"'"):
        paragraphs = paragraphs[1:]  # a title, or a preamble such as "Here are your stories:"
        fixes.append("title")
    if paragraphs and NUMBERING.match(paragraphs[0]):
        paragraphs[0] = NUMBERING.sub("", paragraphs[0], count=1)
        fixes.append("numbering")
    story = "\n\n".join(p for p in paragraphs if p)
    n_words = len(story.split())
    if abs(story.count("\n\n") + 1 - num_paragraphs) > 1:
        return None, "wrong_paragraphs", fixes
    if n_words < args.min_words:
        return None, "too_short", fixes
    if n_words > args.max_words:
        return None, "too_long", fixes
    return story, None, fixes


def duplicate_key(story):
    """64-bit hash of the story with case and spacing normalized: stories with the same key are duplicates."""
    return hashlib.blake2b(" ".join(story.lower().split()).encode(), digest_size=8).digest()


def parse_completion(body):
    """(text, finish_reason, id, model) of a chat completion as JSON; ValueError if it is not one."""
    try:
        choice = body["choices"][0]
        text = choice["message"]["content"] or ""
        return text, choice.get("finish_reason"), body.get("id", ""), body.get("model", "")
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not a chat completion: {e!r}") from None


def token_counts(body):
    """(prompt_tokens, completion_tokens) of a chat completion; 0 for what a server leaves out or sends as null."""
    usage = body.get("usage") or {}
    return usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0


def make_records(k, labels, prompt, body, args, out, removed, fixed):
    """The records of the stories in one completion that pass the cleaning rules (counted in removed/fixed)."""
    text, finish_reason, completion_id, model = parse_completion(body)
    prompt_tokens, completion_tokens = token_counts(body)
    chunks = [c for c in SEPARATOR_LINE.split(text) if c.strip()]
    if not chunks:  # a refusal, or nothing at all
        removed["empty"] += 1
        return []
    if finish_reason in ("length", "content_filter"):  # cut at max_tokens or by a filter: the last story is unfinished
        chunks = chunks[:-1]
        removed["truncated" if finish_reason == "length" else "content_filter"] += 1
    elif args.stories_per_prompt > 1 and len(chunks) == 1:  # several stories run together, labels unsure
        removed["separator_failed"] += 1
        return []
    if len(chunks) > args.stories_per_prompt:
        removed["extra_stories"] += len(chunks) - args.stories_per_prompt
        chunks = chunks[:args.stories_per_prompt]
    records, keys = [], set()
    for i, chunk in enumerate(chunks):
        story, rule, fixes = clean_story(chunk, labels["num_paragraphs"], args)
        fixed.update(fixes)
        if story is not None:
            key = duplicate_key(story)
            rule = "duplicate" if key in out.keys or key in keys else None
        if rule:
            removed[rule] += 1
            continue
        keys.add(key)
        records.append({"id": story_id(story), "story": story, **labels, "prompt_id": k, "prompt": prompt,
                        "seed": args.seed, "completion_id": completion_id, "story_index": i, "model": model,
                        "temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                        "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens})
    return records

# -----------------------------------------------------------------------------
# output: crash-safe appends, resume


def fingerprint(args):
    """What makes the prompts and the answers: stories made with other values would be mixed in one output, and
    the answers to batches sent with other values would be labelled with the wrong prompts."""
    with open(args.axes, "rb") as f:
        axes_sha256 = hashlib.sha256(f.read()).hexdigest()
    return {"seed": args.seed, "axes_sha256": axes_sha256, "stories_per_prompt": args.stories_per_prompt,
            "model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "shard": args.shard}


def write_atomically(path, obj):
    """Write obj as JSON: a crash leaves the old file or the new one, never a part."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def complete_lines(file, path):
    """(line number, line) of a file opened with "ab+"; a torn last line, the write a crash cut, is cut off."""
    file.seek(0)
    end = 0
    for n, line in enumerate(tqdm(file, desc=f"reading {path}", unit=" lines", delay=2), start=1):
        if not line.endswith(b"\n"):
            print(f"note: cutting off a torn last line of {path}", file=sys.stderr)
            file.truncate(end)
            return
        yield n, line
        end += len(line)


class Output:
    """The stories file, locked against a second run, and beside it <out>.dropped.jsonl (the prompts whose answer
    gave no usable story) and <out>.run.json (the fingerprint of the arguments that made them): what they hold
    already (a torn last line is cut off), crash-safe appends, and the refusal of other arguments."""

    def __init__(self, path, args, axes, names):
        self.path = path = os.fspath(path)
        self.dropped_path, self.run_path = path + ".dropped.jsonl", path + ".run.json"
        self.keys, self.prompt_ids, self.count = set(), set(), 0  # duplicate keys, prompts done, stories
        self.n_writes, self.n_synced, self.unsynced, self.sync_lock = 0, 0, set(), asyncio.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "ab+")  # appends go to the end, whatever the reading below does
        except OSError as e:
            sys.exit(f"error: cannot write --out={path}: {e}")
        try:  # two runs appending to one file would each write the prompts the other does
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the process ends, however it ends
            busy = os.fstat(self.file.fileno()).st_nlink == 0  # removed by a run that ended, empty, as we opened it
        except BlockingIOError:
            busy = True
        if busy:
            sys.exit(f"error: another run is writing {path}: let it finish, or use another --out")
        try:
            self.dropped = open(self.dropped_path, "ab+")
            with open(self.run_path) as f:
                made_with = json.load(f)
            if not isinstance(made_with, dict):
                raise ValueError(f"a JSON {type(made_with).__name__}, not an object")
        except FileNotFoundError:
            made_with = None
        except (OSError, ValueError) as e:
            sys.exit(f"error: {self.run_path} is damaged ({e}): restore or remove it, or use another --out")
        wanted = fingerprint(args)
        # what another fingerprint would be mixed with: stories, dropped prompts, batches in flight
        held = any(os.fstat(f.fileno()).st_size for f in (self.file, self.dropped)) or os.path.exists(
            path + ".batches.json")
        if made_with is not None and held:
            other = [f"another --axes file (sha256 {str(made_with.get(key))[:12]}, not {v[:12]})"
                     if key == "axes_sha256" else f"--{key}={made_with.get(key)}, not {v}"
                     for key, v in wanted.items() if made_with.get(key) != v]
            if other:
                sys.exit(f"error: {path} was made with {', '.join(other)}: use the same arguments, or another --out")
        for n, line in complete_lines(self.file, path):
            try:
                record = json.loads(line)
                k, key = record["prompt_id"], duplicate_key(record["story"])
            except (ValueError, KeyError, TypeError, AttributeError):
                sys.exit(f"error: line {n} of {path} is not a story record: fix or remove it, or use another"
                         f" --out")
            if k % args.n_shards != args.shard_index:
                sys.exit(f"error: {path} holds prompt {k}, not of shard {args.shard}: give each shard its own"
                         f" --out")
            # without the run file (deleted, or an output of an older version) the first record is the check
            if n == 1 and made_with is None and record.get("prompt") != next(prompts_for(axes, names, args, [k]))[2]:
                sys.exit(f"error: {path} was made with another --seed, --axes or --stories_per_prompt:"
                         f" use those, or another --out")
            self.keys.add(key)
            self.prompt_ids.add(k)
            self.count += 1
        for n, line in complete_lines(self.dropped, self.dropped_path):
            try:
                self.prompt_ids.add(json.loads(line)["prompt_id"])
            except (ValueError, KeyError, TypeError):
                sys.exit(f"error: line {n} of {self.dropped_path} is not a dropped prompt: fix or remove it, or use"
                         f" another --out")
        if made_with != wanted:
            try:
                write_atomically(self.run_path, wanted)
            except OSError as e:
                sys.exit(f"error: cannot write {self.run_path}: {e}")

    def write(self, records, dropped=False):
        """Append records (stories, or with dropped=True the lines of prompts that gave none) as one write and
        flush it: a crash keeps all of them or a torn last line."""
        if not records:
            return
        file = self.dropped if dropped else self.file
        file.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records))
        file.flush()
        self.n_writes += 1
        self.unsynced.add(file)
        self.prompt_ids.update(r["prompt_id"] for r in records)
        if not dropped:
            self.keys.update(duplicate_key(r["story"]) for r in records)
            self.count += len(records)

    async def sync(self):
        """Return once all writes so far are on disk. An fsync takes milliseconds, so it runs in a thread
        while the event loop goes on, and one covers every write before it: completions that finish
        together share it (group commit)."""
        wanted = self.n_writes
        async with self.sync_lock:
            if self.n_synced < wanted:
                n_writes, files, self.unsynced = self.n_writes, self.unsynced, set()
                for file in files:
                    await asyncio.to_thread(os.fsync, file.fileno())
                self.n_synced = n_writes

    def close(self):
        """Sync and close: the last writes may belong to requests cancelled while they waited for sync().
        Empty files are removed, and a run that wrote no story leaves nothing but what a rerun needs to find
        its batches in flight; the stories file goes last, as its lock keeps a second run out until then."""
        sizes = [os.fstat(file.fileno()).st_size for file in (self.dropped, self.file)]
        for file in (self.dropped, self.file):
            os.fsync(file.fileno())
        kept = sizes[1] > 0 or os.path.exists(self.path + ".batches.json")
        for path, keep in ((self.dropped_path, kept and sizes[0]), (self.run_path, kept), (self.path, sizes[1])):
            if not keep and os.path.exists(path):
                os.remove(path)
        self.dropped.close()
        self.file.close()

# -----------------------------------------------------------------------------
# client: retries, rate limits, the live loop


class FatalError(Exception):
    """An answer that retrying cannot fix (bad key, bad request): the run stops with its message."""


class GaveUp(FatalError):
    """A request that failed on each of its tries: fatal in Batch mode, the loss of one prompt in a live run."""


def refusal(status, message):
    """The error for a request that the API refuses as it is: a 4xx answer not in RETRIED_4XX."""
    return FatalError(f"the API refused the request ({status}): {message}; check --model, --base_url and the"
                      f" other settings")


def bad_key(args):
    """The error for a 401 answer."""
    return FatalError(f"the API rejected the key (401 Unauthorized): set OPENAI_API_KEY to a valid key for"
                      f" {args.base_url or 'the OpenAI API'}")


async def check_server(client, args):
    """One GET /models, untried again, before the run: a wrong --base_url or a server that is down ends the
    run in seconds, not after minutes of backoff. Any answer but a 401 means the server is there (some
    servers list no models)."""
    try:
        await client.get("/models", cast_to=str, options={"timeout": PREFLIGHT_TIMEOUT})
    except openai.APIStatusError as e:
        if e.status_code == 401:
            raise bad_key(args) from None
    except openai.APIConnectionError as e:  # a timeout is one too
        cause = f"no answer in {PREFLIGHT_TIMEOUT:g} s" if isinstance(e, openai.APITimeoutError) else e.__cause__ or e
        raise FatalError(f"cannot reach {str(client.base_url).rstrip('/')} ({cause}): check --base_url and that the"
                         f" server is running") from None


def retry_after(headers):
    """Seconds the server asked us to wait (retry-after-ms or Retry-After), or None."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers.get(name)) * scale
        except (TypeError, ValueError):
            pass
    return None


async def with_retries(call, args, progress):
    """await call() until it succeeds; retries rate limits, server errors, timeouts, dropped connections
    and answers that are not valid JSON, with exponential backoff and jitter (or as long as Retry-After
    says). Other 4xx answers raise FatalError, and so does a 429 for an account out of credit. Raises
    GaveUp, naming the last error, when the args.max_retries retries failed too."""
    for attempt in itertools.count():
        wait = None
        try:
            return await call()
        except openai.APIStatusError as e:
            message = (e.body.get("message") if isinstance(e.body, dict) else None) or e.message
            if e.status_code == 401:
                raise bad_key(args) from None
            if e.code == "insufficient_quota":  # a 429 that no wait cures
                raise FatalError(f"the account has no quota left (429 insufficient_quota): {message}") from None
            if e.status_code < 500 and e.status_code not in RETRIED_4XX:
                raise refusal(e.status_code, message) from None
            reason, error, wait = str(e.status_code), f"{e.status_code} {message}", retry_after(e.response.headers)
        except openai.APITimeoutError:
            reason, error = "timeout", f"no answer in {args.timeout:g} s"
        except openai.APIConnectionError as e:
            reason, error = "connection", f"no connection ({e.__cause__ or e})"
        except ValueError:  # a 200 whose body is not a chat completion
            reason, error = "bad_answer", "an answer that is not a chat completion"
        if attempt == args.max_retries:
            raise GaveUp(f"{attempt + 1} {'try' if attempt == 0 else 'tries'} failed, the last with {error}: check that"
                         f" {args.base_url or 'the OpenAI API'} answers, then run the same command again")
        progress.retrying(reason, error)
        # a server's wait within reason, spread so that the requests it stopped do not all come back at once
        await asyncio.sleep(min(wait, MAX_BACKOFF) * random.uniform(1.0, 1.2) if wait is not None else
                            random.uniform(0.5, 1.0) * min(MAX_BACKOFF, args.backoff * 2 ** attempt))


class RateLimiter:
    """Requests and tokens per minute as two buckets that refill continuously; a limit of 0 is none.
    A request waits until its bucket holds what it needs (at most a full bucket), then takes all it
    needs: a request larger than a second's worth leaves the level below zero, and those after it wait
    until that is paid back."""

    def __init__(self, rpm, tpm):
        self.rate = [rpm / 60, tpm / 60]  # per second
        self.capacity = [max(1.0, r) for r in self.rate]  # a second's worth: smooth, not bursty
        self.level, self.time = list(self.capacity), time.monotonic()

    async def acquire(self, tokens):
        while True:
            now = time.monotonic()
            self.level = [min(c, lv + r * (now - self.time)) for c, lv, r in zip(self.capacity, self.level, self.rate)]
            self.time = now
            need = [1.0, tokens]
            ready = [min(n, c) for n, c in zip(need, self.capacity)]
            waits = [(n - lv) / r for n, lv, r in zip(ready, self.level, self.rate) if r and lv < n]
            if not waits:
                self.level = [lv - n for n, lv in zip(need, self.level)]
                return
            await asyncio.sleep(max(waits))

    def refund(self, tokens):
        """Correct the token bucket once a request's real usage is known (negative: it used more)."""
        self.level[1] = min(self.capacity[1], self.level[1] + tokens)


def request_body(args, prompt):
    # OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...) refuse max_tokens and want max_completion_tokens;
    # other servers (older llama.cpp, some proxies) know only max_tokens, so only those models get the new name
    max_key = "max_completion_tokens" if re.match(r"gpt-5|o\d", args.model) else "max_tokens"
    return {"model": args.model, "messages": [{"role": "user", "content": prompt}],
            max_key: args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}


def expected_tokens(prompt, labels, args):
    """A request's tokens before it is sent, for the rate limiter: ~4 characters a token in, and the answer's
    likely length out. OpenAI's limiter counts max_tokens out instead; counting it here would hold a run far
    below --tpm where max_tokens is a loose cap (4096 against ~1000), and the 429s that may come of the
    difference wait as the server asks. The limiter is settled with the real usage once the answer is in."""
    out = args.stories_per_prompt * labels["num_paragraphs"] * TOKENS_PER_PARAGRAPH
    return len(prompt) // 4 + min(args.max_tokens, out)


class Progress:
    """The progress bar and the run's counters, shared by the live loop and Batch mode, and the rules that end a
    run whose answers give (nearly) no usable story."""

    def __init__(self, args, out):
        self.args, self.out = args, out
        self.stats, self.removed, self.fixed = Counter(), Counter(), Counter()
        self.answers, self.usable = 0, 0  # answers in this run, and the stories in them that pass the cleaning
        self.unusable, self.unusable_reasons = 0, Counter()  # answers in a row with no usable story, and why
        self.error = None  # the last error that a batch answered a request with
        self.retries, self.waiting_for = 0, None  # retries in all, and the reason of the last one
        self.price = price_per_token(args)
        self.bar = tqdm(total=args.target, initial=out.count, unit=" stories", delay=1, dynamic_ncols=True)

    def add(self, k, labels, prompt, body):
        """Write the cleaned stories of one completion, as many as the target still needs, or, when it has none,
        the prompt's line in the dropped file: either way the prompt is done and a rerun does not pay for it."""
        removed = Counter()
        records = make_records(k, labels, prompt, body, self.args, self.out, removed, self.fixed)
        self.removed.update(removed)
        keep = max(0, self.args.target - self.out.count)
        self.stats["surplus"] += max(0, len(records) - keep)
        prompt_tokens, completion_tokens = token_counts(body)
        if records:
            self.out.write(records[:keep])
        else:
            _, finish_reason, completion_id, _ = parse_completion(body)
            self.out.write([{"prompt_id": k, "completion_id": completion_id, "finish_reason": finish_reason,
                             "removed": dict(removed), "prompt_tokens": prompt_tokens,
                             "completion_tokens": completion_tokens}], dropped=True)
        self.tally(len(records), removed)
        self.stats["prompt_tokens"] += prompt_tokens
        self.stats["completion_tokens"] += completion_tokens
        self.stats["completions"] += 1
        self.bar.update(len(records[:keep]))
        tokens = self.stats["prompt_tokens"] + self.stats["completion_tokens"]
        self.bar.set_postfix_str(f"{tokens:,} tokens" + (f", ${self.cost():,.2f}" if self.price else "")
                                 + (f", {self.retries:,} retries" if self.retries else ""), refresh=False)

    def failed(self, error):
        """Count a batch request answered with an error: paid for, and no story."""
        self.stats["batch request errors"] += 1
        self.error = error
        self.tally(0, {"request_failed": 1})

    def tally(self, n_usable, reasons):
        """Count one answer, and why it gave no usable story, for check_yield."""
        self.answers += 1
        self.usable += n_usable
        if n_usable:
            self.unusable, self.unusable_reasons = 0, Counter()
        else:
            self.unusable += 1
            self.unusable_reasons.update(reasons)

    def check_yield(self):
        """Raise FatalError when --max_unusable answers in a row gave no usable story, or when, once MIN_ANSWERS
        are in, the usable stories are under --min_yield of those asked for: the answers will not get better
        by asking again, and each costs money. The message names the main reason and what to do about it."""
        args, asked = self.args, self.answers * self.args.stories_per_prompt
        if self.unusable >= args.max_unusable:
            what, reasons = f"{self.unusable} answers in a row gave no usable story", self.unusable_reasons
        elif self.answers >= MIN_ANSWERS and self.usable < args.min_yield * asked:
            what = (f"{self.usable:,} usable stories in {self.answers:,} answers that asked for {asked:,}, under"
                    f" --min_yield={args.min_yield:g}")
            reasons = self.removed + Counter(request_failed=self.stats["batch request errors"])
        else:
            return
        main = max(reasons, key=reasons.get, default=None)
        hint = (f"the batch answers its requests with an error ({self.error}); run the same command again later"
                if main == "request_failed" else HINTS.get(main, f"the answers hold fewer stories than"
                                                                 f" --stories_per_prompt={args.stories_per_prompt}"))
        counts = ", ".join(f"{reason} {n:,}" for reason, n in reasons.most_common())
        raise FatalError(f"{what} ({counts or 'stories missing'}): {hint}")

    def retrying(self, reason, error):
        """Count a retry, and say on stderr what the run waits for each time the reason changes."""
        self.stats[f"retry {reason}"] += 1
        self.retries += 1
        if reason != self.waiting_for:
            self.waiting_for = reason
            self.bar.write(f"note: retrying requests that failed with {error} (retry {self.retries:,})",
                           file=sys.stderr)

    def cost(self):
        return self.stats["prompt_tokens"] * self.price[0] + self.stats["completion_tokens"] * self.price[1]


async def run_live(client, args, axes, names, out, progress):
    """Keep args.concurrency chat completions in flight until the target is written. A prompt is
    started only while the stories written plus those expected from requests in flight fall short,
    so a run that loses nothing asks for exactly the prompts it needs, in order."""
    prompts = iter_prompts(axes, names, args, skip=out.prompt_ids)
    limiter = RateLimiter(args.rpm, args.tpm)
    in_flight, fatal = 0, False
    give_ups = 0  # prompts in a row that got no answer
    changed = asyncio.Condition()

    def finished():
        return out.count >= args.target or fatal

    def needs_more():
        return out.count + in_flight * args.stories_per_prompt < args.target

    async def one(k, labels, prompt):
        nonlocal give_ups
        expected = expected_tokens(prompt, labels, args)

        async def call():
            await limiter.acquire(expected)
            progress.stats["requests"] += 1
            # the body of a Batch API line, posted as it is: the typed client.chat.completions.create would
            # re-validate each parameter and build a model of the answer, 0.2 ms a request (measured: 15% of
            # the CPU time here at 500 requests/s); both modes read the answer as plain JSON
            body = json.loads(await client.post("/chat/completions", body=request_body(args, prompt), cast_to=str))
            parse_completion(body)  # a malformed answer raises here, inside the retry loop
            return body

        try:
            body = await with_retries(call, args, progress)
        except GaveUp as e:  # the prompt is left for a later run
            progress.stats["gave up"] += 1
            give_ups += 1
            # a server that is down or refuses everything would have a run skip prompts forever. All those in
            # flight give up together, so at least --concurrency of them; at most the prompts the run still
            # needs, or a small run would never get there
            if give_ups >= min(max(args.concurrency, MIN_GIVE_UPS),
                               math.ceil((args.target - out.count) / args.stories_per_prompt)):
                raise FatalError(f"{give_ups} prompts in a row got no answer: {e}") from None
            return
        give_ups = 0
        limiter.refund(expected - sum(token_counts(body)))
        progress.add(k, labels, prompt, body)
        if not fatal:  # the answers that come in while the run stops are kept; the first to stop it names the cause
            progress.check_yield()
        await out.sync()

    async def worker():
        nonlocal in_flight, fatal
        while True:
            async with changed:
                await changed.wait_for(lambda: finished() or needs_more())
                if finished():
                    return
                k, labels, prompt = next(prompts)
                in_flight += 1
            try:
                await one(k, labels, prompt)
            except FatalError:
                fatal = True  # no new requests while the others are cancelled
                raise
            finally:
                async with changed:
                    in_flight -= 1
                    changed.notify_all()

    workers = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    done, pending = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:  # the target is met (the rest would only add surplus), or a fatal error
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    errors = [task.exception() for task in done if task.exception()]  # several workers may meet a bad key at once
    if errors:
        raise errors[0]

# -----------------------------------------------------------------------------
# Batch API


async def run_batch(client, args, axes, names, out, progress):
    """Submit request files to the Batch API, several in flight, poll them, parse what comes back into
    the same output and resubmit the requests that failed. The batches in flight are kept in a state
    file beside the output (its run file vouches for the arguments that made them), so a restarted
    command polls them again instead of paying twice. While the output holds no story, one probe batch
    of at most PROBE_BATCH_SIZE requests is all that is in flight: a setup whose answers are all unusable
    costs that much, not batches of 50,000."""
    state_path = args.out + ".batches.json"
    in_flight = []  # {"input_file_id", "batch_id", "prompt_ids"} for each batch not yet parsed
    if os.path.exists(state_path):
        try:
            with open(state_path) as f:
                in_flight = json.load(f)["batches"]
        except (ValueError, KeyError, TypeError) as e:
            raise FatalError(f"{state_path} is damaged ({e!r}): restore it, or use another --out") from None

    def save():  # atomically, so a crash leaves the old state or the new one; no file once none is in flight
        if in_flight:
            write_atomically(state_path, {"batches": in_flight})
        elif os.path.exists(state_path):
            os.remove(state_path)

    async def start(entry):
        batch = await with_retries(lambda: client.batches.create(
            input_file_id=entry["input_file_id"], endpoint="/v1/chat/completions", completion_window="24h"),
            args, progress)
        entry["batch_id"] = batch.id
        progress.stats["batches"] += 1
        save()

    for entry in in_flight:
        if entry["batch_id"] is None:  # stopped between upload and saving the batch's id: it may exist already
            recent = await with_retries(lambda: client.batches.list(limit=100), args, progress)
            found = [b.id for b in recent.data if b.input_file_id == entry["input_file_id"]]
            if found:
                entry["batch_id"] = found[0]
                save()
            else:
                await start(entry)

    submitted = {k for entry in in_flight for k in entry["prompt_ids"]}
    prompts = iter_prompts(axes, names, args, skip=out.prompt_ids | submitted)
    resubmit, tries = [], Counter()  # prompts whose request failed, and how often
    failures = Counter()  # batches failed in a row, by error code
    max_in_flight, hold_until = args.batches_in_flight, 0.0
    delay = min(1.0, args.poll_interval)
    while out.count < args.target:
        pending = sum(len(entry["prompt_ids"]) for entry in in_flight)
        need = math.ceil((args.target - out.count) / args.stories_per_prompt) - pending
        probing = out.count == 0  # one small batch at a time until stories come back
        if need > 0 and len(in_flight) < (1 if probing else max_in_flight) and time.monotonic() >= hold_until:
            lines, ids, size = [], [], 0
            while len(ids) < min(need, min(args.batch_size, PROBE_BATCH_SIZE) if probing else args.batch_size):
                k, labels, prompt = next(prompts_for(axes, names, args, [resubmit.pop(0)]) if resubmit else prompts)
                line = json.dumps({"custom_id": f"prompt-{k}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": request_body(args, prompt)}).encode() + b"\n"
                if size + len(line) > MAX_BATCH_BYTES:
                    resubmit.insert(0, k)
                    break
                lines.append(line)
                ids.append(k)
                size += len(line)
            file = await with_retries(lambda: client.files.create(file=("requests.jsonl", b"".join(lines)),
                                                                  purpose="batch"), args, progress)
            progress.stats["requests"] += len(ids)
            in_flight.append({"input_file_id": file.id, "batch_id": None, "prompt_ids": ids})
            save()
            await start(in_flight[-1])
            continue
        await asyncio.sleep(delay)
        delay = min(2 * delay, args.poll_interval)
        for entry in list(in_flight):
            batch = await with_retries(lambda: client.batches.retrieve(entry["batch_id"]), args, progress)
            if batch.status in ("validating", "in_progress", "finalizing", "cancelling"):
                continue
            todo = sorted(k for k in entry["prompt_ids"] if k not in out.prompt_ids)  # not written before a crash
            if batch.status == "failed":  # refused as a whole, nothing done or billed: submit its requests again
                error = (batch.errors.data or [None])[0] if batch.errors else None
                code = getattr(error, "code", None) or "unknown"
                in_flight.remove(entry)
                save()
                resubmit += todo
                progress.stats["batches failed"] += 1
                if code == "token_limit_exceeded" and in_flight:  # the batches in the queue fill it: wait for one
                    max_in_flight = len(in_flight)
                else:
                    failures[code] += 1
                if failures[code] == MAX_BATCH_FAILURES:
                    raise FatalError(f"{MAX_BATCH_FAILURES} batches in a row failed ({code}:"
                                     f" {getattr(error, 'message', None) or 'no reason given'}); run the same command"
                                     f" again later" + (f", it polls the batches still in flight, listed in"
                                                        f" {state_path}" if in_flight else ""))
                if code == "token_limit_exceeded":  # the organisation's queue of batch tokens is full: go smaller
                    args.batch_size = max(1, args.batch_size // 2)
                hold_until = time.monotonic() + args.poll_interval
                continue
            # completed, expired or cancelled: take what came back, resubmit the rest
            answers, errors, refused = {}, {}, None  # chat completions, and the errors that answered requests
            for file_id in (batch.output_file_id, batch.error_file_id):
                if not file_id:
                    continue
                content = await with_retries(lambda: client.files.content(file_id), args, progress)
                for line in content.content.splitlines():
                    try:
                        result = json.loads(line)
                        k = int(result["custom_id"].removeprefix("prompt-"))
                        response = result.get("response") or {}  # null for a request the batch never ran
                        status, body = response.get("status_code"), response.get("body")
                        if status == 200:
                            answers[k] = body
                        elif status is not None:  # billed; a request the batch never ran (expired) is not
                            message = ((body or {}).get("error") or {}).get("message")
                            errors[k] = f"{status} {message}"
                            if 400 <= status < 500 and status not in RETRIED_4XX:
                                refused = refusal(status, message)
                    except (ValueError, KeyError, TypeError, AttributeError):  # its request has no answer: failed
                        progress.stats["batch lines unreadable"] += 1
            for k, labels, prompt in prompts_for(axes, names, args, todo):
                error = errors.get(k)
                if k in answers:
                    try:
                        progress.add(k, labels, prompt, answers[k])
                        continue
                    except ValueError as e:  # not a chat completion
                        error = str(e)
                if error:
                    progress.failed(error)
                tries[k] += 1
                progress.stats["batch requests failed"] += 1
                if tries[k] <= args.max_retries:
                    resubmit.append(k)
            await out.sync()
            in_flight.remove(entry)
            save()
            if refused:  # the same request would be refused again: stop, as a live run does
                raise refused
            progress.check_yield()  # after the whole batch: its answers are paid for, whatever comes of them
            if batch.status != "completed":
                progress.stats[f"batches {batch.status}"] += 1
            failures.clear()
            delay = min(1.0, args.poll_interval)
    for entry in in_flight:  # no longer needed (a rerun with a smaller --n_stories): stop paying for them
        try:
            await with_retries(lambda: client.batches.cancel(entry["batch_id"]), args, progress)
            progress.stats["batches cancelled"] += 1
        except FatalError as e:
            print(f"note: could not cancel batch {entry['batch_id']}, no longer needed: {e}", file=sys.stderr)
    in_flight.clear()
    save()

# -----------------------------------------------------------------------------
# dry run: axis counts, independence, cost


def price_per_token(args):
    """(input, output) USD per token for args.model, or None when neither the table nor the flags know it."""
    known = [m for m in PRICES if args.model.startswith(m)]
    price = PRICES[max(known, key=len)] if known else (None, None)
    price = (args.price_in if args.price_in is not None else price[0],
             args.price_out if args.price_out is not None else price[1])
    if None in price:
        return None
    scale = 1e-6 * (BATCH_DISCOUNT if args.batch else 1.0)
    return price[0] * scale, price[1] * scale


def chi_square(table):
    """(chi2, df, p) of the test that the rows and columns of a contingency table are independent.
    p by the Wilson-Hilferty cube-root normal approximation, accurate here where df is in the tens or more."""
    table = table[table.sum(1) > 0][:, table.sum(0) > 0].astype(np.float64)
    expected = np.outer(table.sum(1), table.sum(0)) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    df = (table.shape[0] - 1) * (table.shape[1] - 1)
    if df == 0:
        return chi2, df, 1.0
    z = ((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return chi2, df, 0.5 * math.erfc(z / math.sqrt(2))


def dry_run(args, axes, names):
    """Print example prompts, the count of each axis value, the independence check and the cost."""
    n_prompts = math.ceil(args.target / args.stories_per_prompt)
    t0 = time.time()
    print(f"{n_prompts:,} prompts of {args.stories_per_prompt} stories for {args.target:,} stories"
          f" (shard {args.shard}, seed {args.seed}, axes {args.axes})\n")
    for k, labels, prompt in itertools.islice(iter_prompts(axes, names, args), args.n_examples):
        print(f"--- prompt {k} ---\n{prompt}\n")

    labels = list(axes)
    sizes = {label: len(axes[label][0]) for label in labels}
    counts = {label: np.zeros(sizes[label], dtype=np.int64) for label in labels}
    pairs = list(itertools.combinations(labels, 2))
    tables = {(a, b): np.zeros(sizes[a] * sizes[b], dtype=np.int64) for a, b in pairs}
    paragraphs = 0
    # the chi-square test needs some prompts in most cells of a table: a small job is checked on more
    n_checked = max(n_prompts, 100_000)
    bar = tqdm(total=n_checked, desc="sampling", unit=" prompts", unit_scale=True, delay=2)
    for start in range(0, n_checked, 1 << 20):  # in chunks of a million, to keep memory flat
        j = np.arange(start, min(start + (1 << 20), n_checked))
        idx = sample_prompts(axes, names, args.seed, args.shard_index + args.n_shards * j)
        for a, b in pairs:
            tables[a, b] += np.bincount(idx[a] * sizes[b] + idx[b], minlength=sizes[a] * sizes[b])
        job = j < n_prompts
        for label in labels:
            counts[label] += np.bincount(idx[label][job], minlength=sizes[label])
        paragraphs += int(np.asarray(axes["num_paragraphs"][0])[idx["num_paragraphs"][job]].sum())
        bar.update(len(j))
    bar.close()

    print("count of each axis value:")
    for label in labels:
        values = axes[label][0]
        line = ", ".join(f"{v if v != '' else '(none)'} {c:,}" for v, c in zip(values, counts[label]))
        print(f"  {label} ({len(values)} values): {line}")

    print(f"\nindependence of each pair of axes, in {n_checked:,} prompts (chi-square test; p should look uniform,"
          f" never tiny):")
    results = []
    for a, b in pairs:
        chi2, df, p = chi_square(tables[a, b].reshape(sizes[a], sizes[b]))
        results.append((p, a, b))
        print(f"  {a + ' x ' + b:36s} chi2 {chi2:12.1f}  df {df:6d}  p {p:.3f}")
    if axes["persona"][0][0] == "":  # the published dataset has personas only in 1-, 4- and 7-paragraph stories
        persona = tables["persona", "num_paragraphs"].reshape(sizes["persona"], sizes["num_paragraphs"])
        share = 1 - persona[0] / np.maximum(persona.sum(0), 1)
        print("  persona present, by num_paragraphs: "
              + "  ".join(f"{n}: {s:.0%}" for n, s in zip(axes["num_paragraphs"][0], share)))
    threshold = 0.01 / len(pairs)  # Bonferroni: a 1% chance that some pair of a fair sampler fails
    p_min, a, b = min(results)
    verdict = "passed" if p_min > threshold else "FAILED"
    print(f"independence check: {verdict} (smallest p {p_min:.2g} for {a} x {b}; threshold 0.01/{len(pairs)})")

    sample = [prompt for _, _, prompt in itertools.islice(iter_prompts(axes, names, args), 2000)]
    try:
        try:
            encoding = tiktoken.encoding_for_model(args.model)
        except KeyError:  # not an OpenAI model: its tokenizer is unknown, OpenAI's newest is a fair guess
            encoding = tiktoken.get_encoding("o200k_base")
        per_prompt, how = np.mean([len(t) for t in encoding.encode_batch(sample)]), f"tiktoken {encoding.name}"
    except Exception as e:  # tiktoken downloads its vocabularies on first use: offline, count characters
        per_prompt = np.mean([len(s) for s in sample]) / 4
        how = f"4 characters a token, as tiktoken could not load its vocabulary: {type(e).__name__}"
    per_prompt += 7  # the chat format's tokens around a message
    tokens_in, tokens_out = per_prompt * n_prompts, paragraphs * args.stories_per_prompt * TOKENS_PER_PARAGRAPH
    print(f"\ntokens: {tokens_in:,.0f} in ({per_prompt:.0f} a prompt, {how}),"
          f" {tokens_out:,.0f} out ({TOKENS_PER_PARAGRAPH} a paragraph, a rough guess)")
    price = price_per_token(args)
    if price:
        cost = tokens_in * price[0] + tokens_out * price[1]
        print(f"cost: ${cost:,.2f} for {args.model}" + (" with the Batch API" if args.batch else
                                                        f" (${cost * BATCH_DISCOUNT:,.2f} with --batch)")
              + ", prices of 2025-08 (--price_in/--price_out to change), plus a few % for stories the cleaning drops")
    else:
        print(f"cost: no price known for {args.model}; give --price_in and --price_out (USD per million tokens)")
    print(f"dry run took {time.time() - t0:.1f} s")

# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    axes, names = load_axes(args.axes)
    if args.dry_run:
        dry_run(args, axes, names)
        return
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        sys.exit("error: OPENAI_API_KEY is not set: export it (any non-empty value for a local server)")
    out = Output(args.out, args, axes, names)
    if out.count >= args.target:
        print(f"{args.out} holds {out.count:,} stories, {args.target:,} asked for: nothing to do")
        out.close()
        return
    progress = Progress(args, out)

    async def run():
        async with openai.AsyncOpenAI(api_key=api_key, base_url=args.base_url, max_retries=0,
                                      timeout=args.timeout) as client:
            await check_server(client, args)
            await (run_batch if args.batch else run_live)(client, args, axes, names, out, progress)

    t0, start_count = time.time(), out.count
    try:
        asyncio.run(run())
    except FatalError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the output or the state file cannot be written
        sys.exit(f"error: {e}; check --out")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {out.count:,} stories in {args.out}; run the same command to go on")
    finally:
        progress.bar.close()
        out.close()
    dt, s = time.time() - t0, progress.stats
    print(f"done: {out.count:,} stories in {args.out} ({out.count - start_count:,} new, {args.target:,} asked for)"
          f" in {dt:.1f} s, {(out.count - start_count) / dt:.1f} stories/s")
    print(f"requests: {s['completions']:,} answered of {s['requests']:,} sent"
          + (f" in {s['batches']} batches" if args.batch else "")
          + "".join(f", {key} {v:,}" for key, v in sorted(s.items())
                    if key.startswith(("retry", "gave", "batch ", "batches "))))
    cost = f", ${progress.cost():,.2f}" if progress.price else ""
    print(f"tokens: {s['prompt_tokens']:,} in, {s['completion_tokens']:,} out{cost}")
    print("removed: " + (", ".join(f"{k} {v:,}" for k, v in sorted(progress.removed.items())) or "none")
          + f"; surplus of the last completions not written: {s['surplus']:,}")
    print("fixed: " + (", ".join(f"{k} {v:,}" for k, v in sorted(progress.fixed.items())) or "none"))


if __name__ == "__main__":
    main()
