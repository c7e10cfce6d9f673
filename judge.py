"""The LLM judge of `python evaluate.py --out_dir=RUN --judge`: a model's completions of held-out story
beginnings, graded by a chat model, as the published SimpleStories evaluation does it.

    python evaluate.py --out_dir=out/5m --judge --dry_run      # a judge prompt, the tokens and the cost
    export OPENAI_API_KEY=...
    python evaluate.py --out_dir=out/5m --judge                # gpt-4o-mini grades 100 completions
    python evaluate.py --out_dir=out/5m --judge --n_prompts=1000 --judge_model=gpt-4.1 --eval_dir=out/5m/eval-4.1
    python evaluate.py --out_dir=out/5m --judge --base_url=http://localhost:8000/v1 --judge_model=Qwen/Qwen2.5-72B-Instruct

Prompts are the beginnings of the first --n_prompts stories of the val split in bin order (the published
test split, when prepare.py kept it): their first --prompt_words words (18, as published), or with
--prompt_words=0 their first sentence. The model completes each with temperature 0.7 and top-k 40, up to 300
new tokens, stopping at EOS. Prompts of equal token length are sampled together in batches of --batch_size,
each batch seeded by --seed and its first story, so a rerun samples the same completions. The judge
(--judge_model, temperature 0; 1 for OpenAI's reasoning models, which take no other) reads the whole
story, beginning and completion, and grades it from 0 to 100 on originality, coherence, grammar and
quality after a short explanation, in JSON: --response_format=
json_schema (the default) holds the server to a JSON schema, json_object asks for any JSON object, none
relies on the prompt alone. An answer is a grade only if it holds the four scores, each a whole number from
0 to 100; any other (not JSON, a score missing or out of range) is counted as failed and never scored. The
report gives each metric's mean over the graded completions with the half-width of a 95% t-interval, the
number graded and the number that failed.

judge.jsonl in --eval_dir gets a line for each prompt the judge has answered, flushed and fsynced as it comes:
id, prompt, completion, scores and explanation (or error: why the answer is not a grade, and the answer),
and the judge's token usage. A rerun grades only the prompts without a line, so a killed run goes on without
paying for an answer twice, and a larger --n_prompts adds to it. judge.run.json keeps what makes the lines
(the checkpoint's sha256, the bins, the prompt and sampling settings, the judge model, format and prompt);
a rerun with others is refused, naming what differs.

A run stops by itself, non-zero, with one line naming the cause, as generate_stories.py does and with its
code (api_client.py): the server cannot be reached (one GET /models before anything else), the key or a
request is refused, --max_unusable answers in a row are not grades, or max(--concurrency, 10) prompts in a
row get no answer after --max_retries retries. So a setup that gives nothing pays for at most --max_unusable
+ --concurrency answers.
"""

import asyncio
import fcntl
import hashlib
import json
import math
import os
import re
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np

from api_client import (MIN_GIVE_UPS, FatalError, GaveUp, RateLimiter, check_server, max_tokens_key, message_tokens,
                        price_per_token, reasoning_model, with_retries)
from configurator import atomic_write, autocast_for, die
from evaluate import interval, load_run, markdown_table, model_files, plus_minus, write_report
from stories import parse_completion, token_counts  # how the generator reads a chat completion

METRICS = ("originality", "coherence", "grammar", "quality")
JUDGE_MAX_TOKENS = 400  # an explanation of a few sentences and four numbers fit with room to spare
ANSWER_TOKENS = 90  # a judge answer's usual length, for the dry run's cost (a guess)

# the published evaluation's four criteria and scale (simple_stories_train, evaluate.py), in our words
JUDGE_PROMPT = """Here is a short story in simple English. Its first words were given: "{prompt}". \
A small language model wrote the rest.

<story>
{story}
</story>

Grade the story as a whole with a score from 0 to 100 for each of:
- originality: how creative and surprising it is;
- coherence: whether it makes sense and holds together, following on from its first words;
- grammar: whether its sentences are grammatical (ignore spacing and capital letters);
- quality: how good a story it is overall.

First explain your judgment in one or two sentences, then give the scores. Answer with a JSON object only, \
in this form, each score a whole number from 0 to 100:
{{"explanation": "...", "originality": 0, "coherence": 0, "grammar": 0, "quality": 0}}"""
GRADE_SCHEMA = {"name": "story_grade", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["explanation", *METRICS],
    "properties": {"explanation": {"type": "string"}, **{m: {"type": "integer"} for m in METRICS}}}}
HINTS = {  # why answers were not grades -> what to do when all of them are not
    "not_json": "the judge does not answer in JSON; use --response_format=json_schema (or json_object) with a "
                "server that takes it, or another --judge_model",
    "missing_score": "the judge leaves scores out; use --response_format=json_schema or another --judge_model",
    "not_a_whole_number": "the judge's scores are not whole numbers; use --response_format=json_schema or another "
                          "--judge_model",
    "out_of_range": "the judge's scores are not between 0 and 100; try another --judge_model",
    "empty": "the judge answers nothing or refuses; try another --judge_model",
    "not_a_completion": "the server's answers are not chat completions; check --base_url and --judge_model",
}


class NotAGrade(ValueError):
    def __init__(self, kind, detail):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def parse_grade(text):
    """({metric: score}, explanation) of a judge's answer: a JSON object (perhaps in a code fence or after some
    words) with the four scores, each a whole number from 0 to 100. NotAGrade says why an answer is not one."""
    if not text.strip():
        raise NotAGrade("empty", "an empty answer")
    match = re.search(r"\{.*\}", text, re.S)
    try:
        grade = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        grade = None
    if not isinstance(grade, dict):
        raise NotAGrade("not_json", f"no JSON object in {text[:80]!r}")
    grade = {str(k).lower(): v for k, v in grade.items()}
    missing = [m for m in METRICS if m not in grade]
    if missing:
        raise NotAGrade("missing_score", f"no {', '.join(missing)} in {text[:120]!r}")
    scores = {}
    for m in METRICS:
        value = grade[m]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
            raise NotAGrade("not_a_whole_number", f"{m} is {value!r}")
        if not 0 <= value <= 100:
            raise NotAGrade("out_of_range", f"{m} is {value!r}, not between 0 and 100")
        scores[m] = int(value)
    explanation = grade.get("explanation")
    return scores, explanation if isinstance(explanation, str) else ""


def beginning(story, prompt_words):
    """The prompt a story gives: its first prompt_words words, joined by single spaces (as published), or with
    0 its first sentence (up to the first . ! or ?, with a closing quote, followed by a space or the end)."""
    if prompt_words:
        return " ".join(story.split()[:prompt_words])
    match = re.match(r"\s*(.+?[.!?]['\")]*)(?=\s|$)", story, re.S)
    return " ".join((match.group(1) if match else story).split())


def judge_prompt(prompt, story):
    return JUDGE_PROMPT.format(prompt=prompt, story=story)


def request_body(args, text):
    body = {"model": args.judge_model, "messages": [{"role": "user", "content": text}],
            max_tokens_key(args.judge_model): JUDGE_MAX_TOKENS}
    if not reasoning_model(args.judge_model):  # which sample at temperature 1 only
        body["temperature"] = 0
    if args.response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": GRADE_SCHEMA}
    elif args.response_format == "json_object":
        body["response_format"] = {"type": "json_object"}
    return body


# ----------------------------------------------------------------------------------------------
# prompts and the model's completions


def held_out_prompts(tok, data_dir, index, args):
    """[(id, prompt)] of the first --n_prompts stories of the split, in bin order."""
    tokens = np.memmap(os.path.join(data_dir, f"{args.split}.bin"), dtype=np.uint16, mode="r")
    n = min(args.n_prompts, index.num_rows)
    ids = index["id"].slice(0, n).to_pylist()
    offsets, lengths = (index[c].slice(0, n).to_numpy().astype(np.int64) for c in ("offset", "length"))
    prompts = {}  # a story that is in the split twice (same id: same text) is one prompt
    for i, o, n_tokens in zip(ids, offsets, lengths):
        prompts.setdefault(i, beginning(tok.decode(tokens[o + 1:o + n_tokens - 1].tolist()), args.prompt_words))
    return [(i, p) for i, p in prompts.items() if p]


def sample_completions(model, tok, device, prompts, args, skip=(), enough=None):
    """{id: completion} for the prompts, except those in skip (or only for the first batches that hold `enough`):
    what the model writes after each prompt, to EOS, the end of its context or max_new_tokens. Prompts of equal
    token length are sampled together; a batch is seeded by --seed and its first id, so its completions do not
    depend on the batches sampled before it."""
    import torch
    from tqdm import tqdm

    n_ctx = model.config.n_ctx
    encoded = {i: tok.encode(p, bos=True) for i, p in prompts}
    for i, p in prompts:
        if len(encoded[i]) >= n_ctx:
            raise ValueError(f"the prompt of story {i} is {len(encoded[i])} tokens, leaving no room in the model's "
                             f"context of {n_ctx}; lower --prompt_words")
    order = sorted(range(len(prompts)), key=lambda j: (len(encoded[prompts[j][0]]), j))
    batches = []
    for j in order:
        same = batches and len(encoded[prompts[batches[-1][0]][0]]) == len(encoded[prompts[j][0]])
        if same and len(batches[-1]) < args.batch_size:
            batches[-1].append(j)
        else:
            batches.append([j])
    batches = [b for b in batches if any(prompts[j][0] not in skip for j in b)]
    if enough:
        batches = batches[:int(np.searchsorted(np.cumsum([len(b) for b in batches]), enough)) + 1]
    out = {}
    bar = tqdm(total=sum(len(b) for b in batches), unit=" completions", desc="sampling", dynamic_ncols=True, delay=1)
    for batch in batches:
        ids = [prompts[j][0] for j in batch]
        seed = int.from_bytes(hashlib.sha256(f"{args.seed} {ids[0]}".encode()).digest()[:8], "little") >> 1
        generator = torch.Generator(device=device).manual_seed(seed)
        idx = torch.tensor([encoded[i] for i in ids], device=device)
        with autocast_for(device):
            rows = model.generate(idx, min(args.max_new_tokens, n_ctx - idx.size(1)), args.temperature, args.top_k,
                                  1.0, tok.eos_id, generator).tolist()
        for i, row in zip(ids, rows):
            new = row[idx.size(1):]
            new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
            out[i] = tok.continuation(row[:idx.size(1)], new)
        bar.update(len(batch))
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# judge.jsonl


def read_log(path):
    """{id: record} of the lines of judge.jsonl (none if there is no file); a torn last line is left out."""
    records = {}
    if not os.path.exists(path):
        return records
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # a write that a crash cut: JudgeLog cuts it off
            try:
                record = json.loads(line)
                records[record["id"]] = record
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"line {n} of {path} is not a judge record: remove it, or use another --eval_dir") from None
    return records


class JudgeLog:
    """judge.jsonl, locked against a second run, its torn last line cut off, with judge.run.json beside it
    (what made its lines); appends written whole, flushed and fsynced, one line a prompt."""

    def __init__(self, path, made_with):
        self.path = path
        self.run_path = run_path = path[:-len(".jsonl")] + ".run.json"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(path, "ab+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # let go when the process ends, however it ends
        except BlockingIOError:
            raise ValueError(f"another run is writing {path}: let it finish, or use another --eval_dir") from None
        self.file.seek(0)
        data = self.file.read()
        if data and not data.endswith(b"\n"):
            print(f"note: cutting off a torn last line of {path}", file=sys.stderr)
            self.file.truncate(data.rfind(b"\n") + 1)
        self.records = read_log(path)
        try:
            with open(run_path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = None
        except (OSError, ValueError) as e:
            raise ValueError(f"{run_path} is damaged ({e}): restore or remove it, or use another --eval_dir") from None
        if self.records and saved != made_with:
            differs = [k for k in made_with if not isinstance(saved, dict) or saved.get(k) != made_with[k]]
            raise ValueError(f"{path} holds grades made with other settings ({', '.join(differs) or 'unknown'}): use the "
                             f"same ones, or another --eval_dir")
        if saved != made_with:
            with atomic_write(run_path, "w") as f:
                json.dump(made_with, f, indent=2)

    def write(self, record):
        self.file.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.records[record["id"]] = record

    def close(self):
        """Close; a log that got no line is removed with its run file, so a run that graded nothing leaves nothing."""
        if not self.records:
            for path in (self.path, self.run_path):
                if os.path.exists(path):
                    os.remove(path)
        self.file.close()


# ----------------------------------------------------------------------------------------------
# grading


class Progress:
    """The grading bar and its counters, and the retry note that with_retries asks for."""

    def __init__(self, total, price):
        from tqdm import tqdm

        self.price, self.tokens, self.retries, self.waiting_for = price, [0, 0], 0, None
        self.bar = tqdm(total=total, unit=" grades", desc="grading", dynamic_ncols=True)

    def add(self, prompt_tokens, completion_tokens):
        self.tokens[0] += prompt_tokens
        self.tokens[1] += completion_tokens
        cost = f", ${self.tokens[0] * self.price[0] + self.tokens[1] * self.price[1]:,.4f}" if self.price else ""
        self.bar.set_postfix_str(f"{sum(self.tokens):,} tokens{cost}"
                                 + (f", {self.retries:,} retries" if self.retries else ""), refresh=False)
        self.bar.update(1)

    def retrying(self, reason, error):
        self.retries += 1
        if reason != self.waiting_for:
            self.waiting_for = reason
            self.bar.write(f"note: retrying judge requests that failed with {error} (retry {self.retries:,})",
                           file=sys.stderr)


async def grade_all(client, api, args, todo, log, progress):
    """Ask the judge about each (id, prompt, completion) of todo, args.concurrency at a time, and write each
    answer to the log; raises the FatalError that stopped it."""
    limiter = RateLimiter(args.rpm, args.tpm)
    work = iter(todo)
    state = {"unusable": 0, "reasons": Counter(), "last": None, "give_ups": 0, "left": len(todo), "fatal": None}

    async def one(i, prompt, completion):
        text = judge_prompt(prompt, prompt + completion)
        body = request_body(args, text)
        expected = len(text) // 4 + ANSWER_TOKENS

        async def call():
            await limiter.acquire(expected)
            # an answer cut short in transfer is not JSON: ValueError, retried
            return json.loads(await client.post("/chat/completions", body=body, cast_to=str))

        try:
            answer = await with_retries(call, api, progress)
        except GaveUp as e:  # the prompt is left for a rerun
            state["give_ups"] += 1
            # all those in flight give up together on a dead server: at least --concurrency of them, at most the
            # prompts still to grade, or a small run would never stop
            limit = min(max(args.concurrency, MIN_GIVE_UPS), state["left"])
            if state["give_ups"] >= limit:
                raise FatalError(f"{limit} prompts in a row got no answer from the judge: {e}") from None
            return
        state["give_ups"] = 0
        state["left"] -= 1
        try:
            content, finish_reason, _, judge_model = parse_completion(answer)
            usage = token_counts(answer)
            shape_error = None
        except ValueError as e:  # JSON, but not a chat completion: paid for, and the server answers alike again
            content, finish_reason, judge_model, usage = answer, None, None, (0, 0)
            shape_error = NotAGrade("not_a_completion", str(e).removeprefix("not a chat completion: "))
        limiter.refund(expected - sum(usage))
        record = {"id": i, "prompt": prompt, "completion": completion, "scores": None, "explanation": None,
                  "error": None, "judge_model": judge_model, "finish_reason": finish_reason,
                  "prompt_tokens": usage[0], "completion_tokens": usage[1]}
        try:
            if shape_error:
                raise shape_error
            record["scores"], record["explanation"] = parse_grade(content)
            state["unusable"], state["reasons"] = 0, Counter()
        except NotAGrade as e:
            record["error"], record["answer"] = str(e), content
            state["unusable"] += 1
            state["reasons"][e.kind] += 1
            state["last"] = str(e)
        log.write(record)
        progress.add(*usage)
        if state["unusable"] >= args.max_unusable:
            main = max(state["reasons"], key=state["reasons"].get)
            counts = ", ".join(f"{k} {n}" for k, n in state["reasons"].most_common())
            raise FatalError(f"{state['unusable']} judge answers in a row were not grades ({counts}; the last: "
                             f"{state['last']}): {HINTS[main]}")

    async def worker():
        # a run that stops takes no new prompt, but the requests in flight finish and their answers, paid for
        # already, are written; the first error to stop it names the cause
        for item in work:
            if state["fatal"]:
                return
            try:
                await one(*item)
            except FatalError as e:
                state["fatal"] = state["fatal"] or e
                return

    await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(todo)))))
    if state["fatal"]:
        raise state["fatal"]


def summary(records, prompts, price):
    """The report over the prompts' lines: per metric the mean, 95% interval and median of the grades."""
    rows = [records[i] for i, _ in prompts if i in records]
    graded = [r for r in rows if r["scores"]]
    failed = Counter(r["error"].split(":")[0] for r in rows if not r["scores"])
    metrics = {}
    for m in METRICS:
        values = [r["scores"][m] for r in graded]
        mean, half = interval(values)
        metrics[m] = {"mean": mean, "ci": half, "median": float(np.median(values)) if values else None}
    tokens = [sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows)]
    return {"prompts": len(prompts), "graded": len(graded), "failed_to_parse": sum(failed.values()),
            "failed_by_reason": dict(failed), "not_answered": len(prompts) - len(rows), "metrics": metrics,
            "judge_tokens": {"in": tokens[0], "out": tokens[1]},
            "cost_usd": tokens[0] * price[0] + tokens[1] * price[1] if price else None}


def judge_mode(args):
    model, tok, device, data_dir, meta, index = load_run(args)
    prompts = held_out_prompts(tok, data_dir, index, args)
    checkpoint_sha256 = hashlib.sha256()
    for path in model_files(args):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                checkpoint_sha256.update(block)
    made_with = {"checkpoint_sha256": checkpoint_sha256.hexdigest(), "data_dir": data_dir, "split": args.split,
                 "tokenizer_sha256": meta["tokenizer_sha256"], "prompt_words": args.prompt_words,
                 "temperature": args.temperature, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
                 "seed": args.seed, "judge_model": args.judge_model, "response_format": args.response_format,
                 "judge_prompt_sha256": hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()}
    api = SimpleNamespace(model=args.judge_model, model_flag="--judge_model", base_url=args.base_url, batch=False,
                          timeout=args.timeout, max_retries=args.max_retries, backoff=args.backoff,
                          price_in=args.price_in, price_out=args.price_out)
    price = price_per_token(api)
    path = os.path.join(args.eval_dir, "judge.jsonl")
    if args.dry_run:
        return dry_run(model, tok, device, prompts, args, read_log(path), price, path)
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise ValueError("OPENAI_API_KEY is not set: export it (any non-empty value for a local server)")
    log = JudgeLog(path, made_with)
    todo_ids = {i for i, _ in prompts if i not in log.records}
    print(f"{len(prompts)} prompts from {data_dir} {args.split}: {len(prompts) - len(todo_ids)} graded before, "
          f"{len(todo_ids)} to grade by {args.judge_model}")
    progress = None

    async def run():
        nonlocal progress
        import openai

        async with openai.AsyncOpenAI(api_key=api_key, base_url=args.base_url, max_retries=0,
                                      timeout=args.timeout) as client:
            if todo_ids:
                await check_server(client, api)  # before minutes of sampling
            completions = sample_completions(model, tok, device, prompts, args, skip=set(log.records))
            todo = [(i, p, completions[i]) for i, p in prompts if i in todo_ids]
            progress = Progress(len(todo), price)
            await grade_all(client, api, args, todo, log, progress)

    try:
        asyncio.run(run())
    except FatalError as e:
        hint = ""
        if args.response_format == "json_schema" and re.search(r"response_format|json_schema", str(e)):
            hint = "; a server that takes no JSON schema may take --response_format=json_object (or none)"
        die(f"{e}{hint}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {len(log.records):,} answers in {path}; run the same command to go on")
    finally:
        if progress is not None:
            progress.bar.close()
        log.close()
    result = summary(log.records, prompts, price)
    report = {"checkpoint": args.hf_dir or model_files(args)[0], **result, "settings": made_with,
              "method": "per metric: mean of the judge's 0-100 grades over the graded completions, with the "
                        "half-width of a 95% t-interval; answers that are not grades are counted, never scored"}
    rows = [(m, plus_minus(result["metrics"][m]["mean"], result["metrics"][m]["ci"], 1),
             "-" if result["metrics"][m]["median"] is None else f"{result['metrics'][m]['median']:g}") for m in METRICS]
    table = markdown_table(["metric (0-100)", "mean ± 95% CI", "median"], rows)
    cost = f", ${result['cost_usd']:,.4f}" if result["cost_usd"] is not None else ""
    counts = (f"{result['graded']} graded, {result['failed_to_parse']} failed to parse"
              + (f" ({', '.join(f'{k} {n}' for k, n in result['failed_by_reason'].items())})" if result["failed_by_reason"] else "")
              + f", {result['not_answered']} not answered; judge tokens {result['judge_tokens']['in']:,} in, "
                f"{result['judge_tokens']['out']:,} out{cost}")
    markdown = (f"# LLM judge: {args.hf_dir or args.out_dir} graded by {args.judge_model}\n\n{len(prompts)} prompts: the first "
                f"{args.prompt_words or 'sentence'}{' words' if args.prompt_words else ''} of the first {len(prompts)} "
                f"{args.split} stories of {data_dir}; completions sampled with temperature {args.temperature:g}, top-k "
                f"{args.top_k}, up to {args.max_new_tokens} tokens. {counts}.\n\n{table}\n")
    paths = write_report(args.eval_dir, "judge", report, markdown)
    print(table)
    print(counts)
    if result["not_answered"]:
        print(f"{result['not_answered']} prompts got no answer: run the same command again to grade them")
    print("wrote " + ", ".join(paths + [path]))


def dry_run(model, tok, device, prompts, args, done, price, path):
    """Print a judge prompt with a real completion, the requests still to send, their tokens and cost."""
    todo = [(i, p) for i, p in prompts if i not in done]
    example = sample_completions(model, tok, device, todo or prompts, args, enough=16)  # for an example and the tokens
    texts = [judge_prompt(p, p + example[i]) for i, p in todo or prompts if i in example]
    temperature = 1 if reasoning_model(args.judge_model) else 0
    print(f"--- judge prompt (model {args.judge_model}, temperature {temperature}, response format {args.response_format}) ---")
    print(texts[0])
    if args.response_format == "json_schema":
        print(f"--- response_format ---\n{json.dumps({'type': 'json_schema', 'json_schema': GRADE_SCHEMA})}")
    per_prompt, how = message_tokens(texts, args.judge_model)
    if args.response_format == "json_schema":
        per_prompt += message_tokens([json.dumps(GRADE_SCHEMA)], args.judge_model)[0] - 7
    tokens_in, tokens_out = per_prompt * len(todo), ANSWER_TOKENS * len(todo)
    print(f"\n{len(prompts)} prompts, {len(prompts) - len(todo)} graded already in {path}: {len(todo)} requests to send")
    print(f"tokens: {tokens_in:,.0f} in ({per_prompt:.0f} a request, {how}, from {len(texts)} sampled completions), "
          f"{tokens_out:,.0f} out ({ANSWER_TOKENS} an answer, a guess)")
    if price:
        print(f"cost: ${tokens_in * price[0] + tokens_out * price[1]:,.4f} for {args.judge_model}, prices of 2025-08 "
              f"(--price_in/--price_out to change)")
    else:
        print(f"cost: no price known for {args.judge_model}; give --price_in and --price_out (USD per million tokens)")
