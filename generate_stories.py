"""Generate a SimpleStories-style dataset: short stories in very simple words, each labelled with the
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
paying twice; a rerun without --batch is refused while they are. A run that writes no story leaves none
of these files, unless batches are in flight.

A run stops by itself, non-zero, with one line that names the cause and what to do:
- the server cannot be reached: one GET {base_url}/models, 10 s at most, before anything is sent;
- --max_unusable answers in a row give no usable story (stories run together without the separator
  line, cut at --max_tokens, not ASCII with --ascii, too short...), or, once 100 answers are in, the
  usable stories are fewer than --min_yield of those asked for. A Batch run counts the requests that a
  batch answers with an error too, and while --out holds no story it sends one probe batch of at most
  32 requests at a time, so that a setup that gives nothing costs a few tens of requests;
- max(--concurrency, 10) prompts in a row get no answer after all their retries, or fewer where the run
  needs fewer prompts (in Batch mode: --max_retries + 1 batches each that came back without its answer,
  expired or with no output). While requests are retried a note on stderr says why, each time the reason changes.

The story side (axes, sampler, prompt text, cleaning rules, records, dry run) is in stories.py, the
retries, rate limits and prices in api_client.py, and the Batch API in batch_api.py.

Usage:
  python generate_stories.py --dry_run --n_stories=2000000     # example prompts, axis counts, independence, cost
  export OPENAI_API_KEY=...
  python generate_stories.py --n_stories=2000000 --out=data/mystories/stories.jsonl
  python generate_stories.py --batch --n_stories=2000000 --out=data/mystories/stories.jsonl  # half price, <= 24 h
  python generate_stories.py --base_url=http://localhost:8000/v1 --model=Qwen/Qwen2.5-7B-Instruct  # vLLM, Ollama...
  python generate_stories.py --shard=0/4 --out=data/mystories/stories.0.jsonl  # machine 0 of 4; cat the files after
"""

import asyncio
import fcntl
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter

import openai
from tqdm import tqdm

from api_client import (MIN_GIVE_UPS, FatalError, GaveUp, RateLimiter, check_server, price_per_token, request_body,
                        with_retries)
from configurator import Parser, atomic_write, boolean, die
from stories import (HINTS, TOKENS_PER_PARAGRAPH, duplicate_key, dry_run, iter_prompts, load_axes, make_records,
                     parse_completion, prompts_for, token_counts)

MIN_ANSWERS = 100  # answers in before a run's yield is judged against --min_yield


def parse_args(argv=None):
    p = Parser(__doc__, "generate_stories.py")
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
    p.add_argument("--requests_per_batch", type=int, default=0, help="requests in one batch; 0: the most, 50,000")
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
        die(f"--shard={args.shard}: expected i/n with 0 <= i < n, e.g. --shard=0/4")
    args.shard_index, args.n_shards = int(m.group(1)), int(m.group(2))
    # before anything is sent: a bound out of range would retry forever, wait forever or pay for nothing
    for name in ("n_stories", "stories_per_prompt", "max_tokens", "concurrency", "batches_in_flight", "max_unusable",
                 "max_words"):
        if getattr(args, name) < 1:
            die(f"--{name}={getattr(args, name)} must be at least 1")
    for name in ("seed", "max_retries", "min_words", "n_examples"):
        if getattr(args, name) < 0:
            die(f"--{name}={getattr(args, name)} must not be negative")
    for name in ("temperature", "top_p", "rpm", "tpm", "backoff", "price_in", "price_out"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            die(f"--{name}={value} must be a finite number, 0 or more")
    for name in ("timeout", "poll_interval"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            die(f"--{name}={getattr(args, name)} must be more than 0")
    if args.min_words > args.max_words:
        die(f"--min_words={args.min_words} is more than --max_words={args.max_words}: every story would be dropped")
    if not 0 <= args.min_yield <= 1:
        die(f"--min_yield={args.min_yield} must be between 0 and 1")
    if args.top_p > 1:  # a probability mass; OpenAI also caps temperature at 2, other servers do not
        die(f"--top_p={args.top_p} must be between 0 and 1")
    if args.requests_per_batch < 0:
        die(f"--requests_per_batch={args.requests_per_batch} must be 0 (the most) or more")
    # this shard's part of the job
    args.target = args.n_stories // args.n_shards + (args.shard_index < args.n_stories % args.n_shards)
    return args


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


def differences(made_with, wanted):
    """The arguments of a fingerprint that differ from those an output was made with, as the flags to give."""
    return [f"another --axes file (sha256 {str(made_with.get(key))[:12]}, not {v[:12]})"
            if key == "axes_sha256" else f"--{key}={made_with.get(key)}, not {v}"
            for key, v in wanted.items() if made_with.get(key) != v]


def dry_run_notes(args):
    """What a dry run says of the output a run would go on from: the stories it holds, and arguments it refuses."""
    try:
        with open(args.out + ".run.json") as f:
            other = differences(json.load(f), fingerprint(args))
        with open(args.out, "rb") as f:
            count = sum(line.endswith(b"\n") for line in f)
    except (OSError, ValueError, AttributeError):  # no output yet; a damaged one is named by the run itself
        return
    if other:
        print(f"note: {args.out} was made with {', '.join(other)}: a run with these arguments is refused; use the "
              f"same ones, or another --out\n")
    elif count:
        print(f"note: {args.out} holds {count:,} stories: a run goes on from there, for the "
              f"{max(0, args.target - count):,} still to make; the figures below are for all {args.target:,}\n")


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
            die(f"cannot write --out={path}: {e}")
        try:  # two runs appending to one file would each write the prompts the other does
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the process ends, however it ends
            busy = os.fstat(self.file.fileno()).st_nlink == 0  # removed by a run that ended, empty, as we opened it
        except BlockingIOError:
            busy = True
        if busy:
            die(f"another run is writing {path}: let it finish, or use another --out")
        self.dropped = None
        try:
            self.read(args, axes, names)
        except SystemExit:  # refused: leave no empty file behind
            for file, file_path in ((self.file, path), (self.dropped, self.dropped_path)):
                if file is not None and os.fstat(file.fileno()).st_size == 0 and os.path.exists(file_path):
                    os.remove(file_path)
            raise

    def read(self, args, axes, names):
        """Open the dropped-prompt file, read what the files hold and check it was made with these arguments
        (ending the script in one line if not), then write the run file."""
        path = self.path
        try:
            self.dropped = open(self.dropped_path, "ab+")
            with open(self.run_path) as f:
                made_with = json.load(f)
            if not isinstance(made_with, dict):
                raise ValueError(f"a JSON {type(made_with).__name__}, not an object")
        except FileNotFoundError:
            made_with = None
        except (OSError, ValueError) as e:
            die(f"{self.run_path} is damaged ({e}): restore or remove it, or use another --out")
        wanted = fingerprint(args)
        # what another fingerprint would be mixed with: stories, dropped prompts, batches in flight
        held = any(os.fstat(f.fileno()).st_size for f in (self.file, self.dropped)) or os.path.exists(
            path + ".batches.json")
        if made_with is not None and held:
            other = differences(made_with, wanted)
            if other:
                die(f"{path} was made with {', '.join(other)}: use the same arguments, or another --out")
        for n, line in complete_lines(self.file, path):
            try:
                record = json.loads(line)
                k, key = record["prompt_id"], duplicate_key(record["story"])
                if type(k) is not int:
                    raise TypeError(f"prompt_id {k!r}")
            except (ValueError, KeyError, TypeError, AttributeError):
                die(f"line {n} of {path} is not a story record: fix or remove it, or use another"
                         f" --out")
            if k % args.n_shards != args.shard_index:
                die(f"{path} holds prompt {k}, not of shard {args.shard}: give each shard its own"
                         f" --out")
            # without the run file (deleted) the first record is the check
            if n == 1 and made_with is None and record.get("prompt") != next(prompts_for(axes, names, args, [k]))[2]:
                die(f"{path} was made with another --seed, --axes or --stories_per_prompt:"
                         f" use those, or another --out")
            self.keys.add(key)
            self.prompt_ids.add(k)
            self.count += 1
        for n, line in complete_lines(self.dropped, self.dropped_path):
            try:
                k = json.loads(line)["prompt_id"]
                if type(k) is not int:
                    raise TypeError(f"prompt_id {k!r}")
                self.prompt_ids.add(k)
            except (ValueError, KeyError, TypeError):
                die(f"line {n} of {self.dropped_path} is not a dropped prompt: fix or remove it, or use"
                         f" another --out")
        if made_with != wanted:
            try:
                with atomic_write(self.run_path, "w") as f:
                    json.dump(wanted, f)
            except OSError as e:
                die(f"cannot write {self.run_path}: {e}")

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
# the live loop


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
        self.error = None  # the last error a batch answered a request with, or the last answer not a chat completion
        self.give_ups = 0  # prompts in a row that got no answer after all their retries
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

    def not_a_completion(self, error):
        """Count an answer that is JSON but not a chat completion (a list of content parts, usage in words):
        paid for, and no story."""
        self.stats["not a chat completion"] += 1
        self.error = error
        self.tally(0, {"not_a_completion": 1})

    def tally(self, n_usable, reasons):
        """Count one answer, and why it gave no usable story, for check_yield."""
        self.answers += 1
        self.give_ups = 0
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
        if main == "request_failed":
            hint = f"the batch answers its requests with an error ({self.error}); run the same command again later"
        elif main == "not_a_completion":
            hint = f"the server's answers are not chat completions ({self.error}); check --base_url and --model"
        else:
            hint = HINTS.get(main, f"the answers hold fewer stories than --stories_per_prompt={args.stories_per_prompt}")
        counts = ", ".join(f"{reason} {n:,}" for reason, n in reasons.most_common())
        raise FatalError(f"{what} ({counts or 'stories missing'}): {hint}")

    def gave_up(self, error):
        """Count a prompt that got no answer after all its retries; it is left for a later run. Raise FatalError,
        naming the last error, once max(--concurrency, MIN_GIVE_UPS) prompts in a row got none, or fewer where the
        run needs fewer: a server that is down or answers nothing would have a run skip prompts forever. In a live
        run all those in flight give up together, so at least --concurrency of them."""
        args = self.args
        self.stats["gave up"] += 1
        self.give_ups += 1
        limit = min(max(args.concurrency, MIN_GIVE_UPS),
                    math.ceil((args.target - self.out.count) / args.stories_per_prompt))
        if self.give_ups >= limit:
            raise FatalError(f"{limit} prompts in a row got no answer: {error}")

    def retrying(self, reason, error):
        """Count a retry, and say on stderr what the run waits for each time the reason changes."""
        self.stats[f"retry {reason}"] += 1
        self.retries += 1
        if reason != self.waiting_for:
            self.waiting_for = reason
            self.bar.write(f"note: retrying requests that failed with {error} (retry {self.retries:,})",
                           file=sys.stderr)

    def close(self):
        """Close the progress bar and end its line, so that an error has a line of its own. A note draws the bar
        even before its delay is up, and tqdm's close ends only a line it drew itself."""
        drawn_by_a_note = self.waiting_for is not None and self.bar.last_print_t < self.bar.start_t + self.bar.delay
        self.bar.close()
        if drawn_by_a_note:
            print(file=sys.stderr)

    def cost(self):
        return self.stats["prompt_tokens"] * self.price[0] + self.stats["completion_tokens"] * self.price[1]


async def run_live(client, args, axes, names, out, progress):
    """Keep args.concurrency chat completions in flight until the target is written. A prompt is
    started only while the stories written plus those expected from requests in flight fall short,
    so a run that loses nothing asks for exactly the prompts it needs, in order."""
    prompts = iter_prompts(axes, names, args, skip=out.prompt_ids)
    limiter = RateLimiter(args.rpm, args.tpm)
    in_flight, fatal = 0, False
    changed = asyncio.Condition()

    def finished():
        return out.count >= args.target or fatal

    def needs_more():
        return out.count + in_flight * args.stories_per_prompt < args.target

    async def one(k, labels, prompt):
        expected = expected_tokens(prompt, labels, args)

        async def call():
            await limiter.acquire(expected)
            progress.stats["requests"] += 1
            # the body of a Batch API line, posted as it is: the typed client.chat.completions.create would
            # re-validate each parameter and build a model of the answer, 0.2 ms a request (measured: 15% of
            # the CPU time here at 500 requests/s); both modes read the answer as plain JSON (an answer cut
            # short in transfer is not JSON: ValueError, retried)
            return json.loads(await client.post("/chat/completions", body=request_body(args, prompt), cast_to=str))

        try:
            body = await with_retries(call, args, progress)
        except GaveUp as e:  # the prompt is left for a later run
            progress.gave_up(e)
            return
        try:
            parse_completion(body)
        except ValueError as e:  # JSON, but not a chat completion: the server's way, so not asked again
            progress.not_a_completion(e)  # the prompt is left for a later run
        else:
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
    try:
        done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the target is met (the rest would only add surplus), a fatal error, or Ctrl-C, which closes the client:
        for task in workers:  # the requests in flight would fail and be retried on it
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    errors = [task.exception() for task in done if task.exception()]  # several workers may meet a bad key at once
    if errors:
        raise errors[0]


# -----------------------------------------------------------------------------
# main


def main(argv=None):
    args = parse_args(argv)
    axes, names = load_axes(args.axes)
    if args.dry_run:
        dry_run_notes(args)
        dry_run(args, axes, names)
        return
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        die("OPENAI_API_KEY is not set: export it (any non-empty value for a local server)")
    if not args.batch and os.path.exists(args.out + ".batches.json"):  # a live run would ask their prompts again
        die(f"batches are in flight for {args.out}, listed in {args.out}.batches.json: rerun with --batch to collect"
            f" them, or use another --out")
    out = Output(args.out, args, axes, names)
    if out.count >= args.target and not os.path.exists(args.out + ".batches.json"):  # else: cancel those batches
        print(f"{args.out} holds {out.count:,} stories, {args.target:,} asked for: nothing to do")
        out.close()
        return
    progress = Progress(args, out)

    async def run():
        async with openai.AsyncOpenAI(api_key=api_key, base_url=args.base_url, max_retries=0,
                                      timeout=args.timeout) as client:
            await check_server(client, args)
            if args.batch:
                from batch_api import run_batch  # only Batch runs need it
                await run_batch(client, args, axes, names, out, progress)
            else:
                await run_live(client, args, axes, names, out, progress)

    t0, start_count = time.time(), out.count
    try:
        asyncio.run(run())
    except FatalError as e:
        die(str(e))
    except OSError as e:  # the output or the state file cannot be written
        die(f"{e}; check --out")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {out.count:,} stories in {args.out}; run the same command to go on")
    finally:  # before the line that sys.exit prints
        progress.close()
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
