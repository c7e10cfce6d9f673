"""The Batch API for generate_stories.py (--batch): half the price of live requests, answers within 24 hours.

Request files of up to 50,000 requests are uploaded and run as batches, several in flight; finished
batches are parsed into the same output as a live run, and the requests that failed are sent again.
The batches in flight are listed in <out>.batches.json, so a command started again polls them instead
of paying twice (or cancels them, when the output holds the stories asked for already), and a create
tried again (its answer lost) first looks for the batch it may have made, and cancels one made only after
it looked. Any status other than DONE's is a batch still running, polled until an hour past its
completion window.
While the output holds no story, one probe batch of at most PROBE_REQUESTS requests is all that is in
flight: a setup whose answers are all unusable costs that much, not batches of 50,000.
"""

import asyncio
import json
import math
import os
import sys
import time
from collections import Counter

import openai

from api_client import RETRIED_4XX, FatalError, refusal, request_body, with_retries
from configurator import atomic_write
from stories import iter_prompts, prompts_for

MAX_BATCH_REQUESTS = 50_000  # the Batch API's limits on one input file
MAX_BATCH_BYTES = 200 * 1000 * 1000
PROBE_REQUESTS = 32  # requests in the one batch in flight while the output holds no story
MAX_BATCH_FAILURES = 5  # batches in a row that fail for the same reason before a Batch run stops
DONE = ("completed", "expired", "cancelled", "failed")  # a batch in any other status is still running
PAST_WINDOW_S = 3600  # a batch still running this long after its completion window ends stops the run


async def run_batch(client, args, axes, names, out, progress):
    """Submit request files to the Batch API, several in flight, poll them, parse what comes back into
    the same output and resubmit the requests that failed, until the output holds args.target stories.
    The state file's batches were sent with the arguments that the output's run file holds: Output
    has checked them against this run's."""
    state_path = args.out + ".batches.json"
    in_flight = []  # {"input_file_id", "batch_id", "prompt_ids"} for each batch not yet parsed
    if os.path.exists(state_path):
        try:
            with open(state_path) as f:
                in_flight = json.load(f)["batches"]
            for entry in in_flight:
                if not (isinstance(entry["input_file_id"], str) and isinstance(entry["batch_id"], (str, type(None)))
                        and all(type(k) is int for k in entry["prompt_ids"])):
                    raise ValueError(f"a batch that is not one: {entry}")
        except (ValueError, KeyError, TypeError) as e:
            raise FatalError(f"{state_path} is damaged ({e!r}): restore it, or use another --out") from None

    def save():  # atomically, so a crash leaves the old state or the new one; no file once none is in flight
        if in_flight:
            with atomic_write(state_path, "w") as f:
                json.dump({"batches": in_flight}, f)
        elif os.path.exists(state_path):
            os.remove(state_path)

    async def made_from(entry):
        """The batches made from entry's request file, newest first."""
        recent = await client.batches.list(limit=100)
        return [b for b in recent.data if b.input_file_id == entry["input_file_id"]]

    unsure = set()  # request files whose create was tried again after a lookup: the lost one may be made late

    async def cancel_twins(entry):
        """Cancel the batches made from entry's request file other than entry's own. A create whose answer was
        lost can be made on the server after the lookup that preceded the next try; left running, it is paid twice."""
        for batch in await with_retries(lambda: made_from(entry), args, progress):
            if batch.id != entry["batch_id"] and batch.status not in (*DONE, "cancelling"):
                await with_retries(lambda: client.batches.cancel(batch.id), args, progress)
                progress.stats["batches made twice, cancelled"] += 1

    async def start(entry, maybe_made=False):
        """Create the batch of an uploaded request file and save its id. Before each try but the first (and before
        the first too with maybe_made), look for a batch made from that file: a create whose answer was lost (a
        timeout, a dropped connection, a run stopped before it saved the id) may have made one, and a second would
        be paid for twice."""
        async def create():
            nonlocal maybe_made
            if maybe_made:
                found = await made_from(entry)
                if found:
                    return found[0].id
                unsure.add(entry["input_file_id"])
            maybe_made = True
            batch = await client.batches.create(input_file_id=entry["input_file_id"], endpoint="/v1/chat/completions",
                                                completion_window="24h")
            return batch.id

        entry["batch_id"] = await with_retries(create, args, progress)
        progress.stats["batches"] += 1
        save()

    for entry in in_flight:
        if entry["batch_id"] is None and out.count < args.target:  # stopped between upload and saving the batch's
            await start(entry, maybe_made=True)  # id: it may exist already

    async def retrieve(entry):
        """The batch of entry as it is now; FatalError if the server does not know it, or it runs past its window."""
        try:
            batch = await client.batches.retrieve(entry["batch_id"])
        except openai.NotFoundError:
            raise FatalError(f"batch {entry['batch_id']}, listed in {state_path}, is unknown to "
                             f"{args.base_url or 'the OpenAI API'} (404): use the key and --base_url that made it, or "
                             f"remove its entry from {state_path} to ask its prompts again") from None
        end = batch.expires_at or (batch.created_at + 24 * 3600 if batch.created_at else None)
        if batch.status not in DONE and end and time.time() > end + PAST_WINDOW_S:
            raise FatalError(f"batch {entry['batch_id']} is still {batch.status} {PAST_WINDOW_S / 3600:g} h after its "
                             f"completion window ended; run the same command again later, it polls the batches "
                             f"listed in {state_path}")
        return batch

    submitted = {k for entry in in_flight for k in entry["prompt_ids"]}
    prompts = iter_prompts(axes, names, args, skip=out.prompt_ids | submitted)
    resubmit, tries = [], Counter()  # prompts whose request failed, and how often
    failures = Counter()  # batches failed in a row, by error code
    max_in_flight, hold_until = args.batches_in_flight, 0.0
    requests_per_batch = min(args.requests_per_batch or MAX_BATCH_REQUESTS, MAX_BATCH_REQUESTS)
    delay = min(1.0, args.poll_interval)
    while out.count < args.target:
        pending = sum(len(entry["prompt_ids"]) for entry in in_flight)
        need = math.ceil((args.target - out.count) / args.stories_per_prompt) - pending
        probing = out.count == 0  # one small batch at a time until stories come back
        if need > 0 and len(in_flight) < (1 if probing else max_in_flight) and time.monotonic() >= hold_until:
            lines, ids, size = [], [], 0
            while len(ids) < min(need, min(requests_per_batch, PROBE_REQUESTS) if probing else requests_per_batch):
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
            if entry["input_file_id"] in unsure:
                await cancel_twins(entry)
            batch = await with_retries(lambda: retrieve(entry), args, progress)
            if batch.status not in DONE:  # validating, in_progress, finalizing, cancelling, or a server's own
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
                    requests_per_batch = max(1, requests_per_batch // 2)
                hold_until = time.monotonic() + args.poll_interval
                continue
            # completed, expired or cancelled: take what came back, resubmit the rest
            answers, errors, refused = {}, {}, None  # chat completions, and the errors that answered requests
            unrun = {}  # why the batch never ran a request (batch_expired), where its error file says
            unanswered = None  # the error that ends a run whose prompts get no answer, raised once the batch is read
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
                        elif isinstance(result.get("error"), dict):
                            unrun[k] = f"{result['error'].get('code')}: {result['error'].get('message')}"
                    except (ValueError, KeyError, TypeError, AttributeError):  # its request has no answer: failed
                        progress.stats["batch lines unreadable"] += 1
            for k, labels, prompt in prompts_for(axes, names, args, todo):
                error = errors.get(k)
                if k in answers:
                    try:
                        progress.add(k, labels, prompt, answers[k])
                        continue
                    except ValueError as e:  # JSON, but not a chat completion: paid for
                        error = str(e)
                        progress.not_a_completion(error)
                elif error:
                    progress.failed(error)
                tries[k] += 1
                progress.stats["batch requests failed"] += 1
                if tries[k] <= args.max_retries:
                    resubmit.append(k)
                elif not error:  # never answered, not paid for: the answers' rules do not see it, this one does
                    why = unrun.get(k) or ("its line missing from the output" if batch.output_file_id else "no output")
                    try:
                        progress.gave_up(f"{tries[k]} batches left each unanswered, the last {batch.status} ({why});"
                                         f" run the same command again later")
                    except FatalError as e:
                        unanswered = unanswered or e
            await out.sync()
            in_flight.remove(entry)
            save()
            if refused or unanswered:  # a request the API refuses, or prompts no batch answers: stop, as live runs do
                raise refused or unanswered
            progress.check_yield()  # after the whole batch: its answers are paid for, whatever comes of them
            if batch.status != "completed":
                progress.stats[f"batches {batch.status}"] += 1
            failures.clear()
            delay = min(1.0, args.poll_interval)
    for entry in in_flight:  # no longer needed (a rerun with a smaller --n_stories): stop paying for those running
        try:
            if entry["batch_id"] is None or entry["input_file_id"] in unsure:  # its id lost, or a twin possible
                batches = await with_retries(lambda: made_from(entry), args, progress)
            else:
                batches = [await with_retries(lambda: client.batches.retrieve(entry["batch_id"]), args, progress)]
            for batch in batches:
                if batch.status not in DONE:
                    await with_retries(lambda: client.batches.cancel(batch.id), args, progress)
                    progress.stats["batches cancelled"] += 1
        except FatalError as e:
            print(f"note: could not cancel batch {entry['batch_id'] or entry['input_file_id']}, no longer needed: {e}",
                  file=sys.stderr)
    in_flight.clear()
    save()
