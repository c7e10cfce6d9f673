"""Talking to an OpenAI-compatible API: what the live loop and the Batch API of generate_stories.py, and judge.py, share.

- with_retries: a call tried again on rate limits, server errors, timeouts, dropped connections and
  answers that are not JSON, with exponential backoff and jitter, or as long as Retry-After asks (at
  most MAX_BACKOFF); answers that no retry cures (a bad key, an account out of credit, a refused
  request) raise FatalError, and a call whose tries all failed raises GaveUp. The openai client's
  own retries are off: they would hide from the run why it waits and what each retry was for.
- check_server: one GET /models before a run, so an unreachable --base_url ends it in seconds.
- RateLimiter: requests and tokens per minute.
- the request body, the list prices that give a run's cost, and a count of a prompt's tokens.

The generator passes its args; evaluate.py's judge passes an object with the same fields (model, base_url,
timeout, max_retries, backoff, price_in, price_out, batch), and model_flag, the flag that names its model.
"""

import asyncio
import itertools
import math
import random
import re
import time

import openai

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
MAX_BACKOFF = 60.0  # seconds; the longest wait between two tries of a request
RETRIED_4XX = (408, 409, 429)  # request timeout, conflict, rate limit: worth another try; other 4xx answers are not
MIN_GIVE_UPS = 10  # prompts in a row that get no answer before a run stops (at least --concurrency of them)
PREFLIGHT_TIMEOUT = 10.0  # seconds the server has to answer the GET /models that starts a run


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


class FatalError(Exception):
    """An answer that retrying cannot fix (bad key, bad request): the run stops with its message."""


class GaveUp(FatalError):
    """A request that failed on each of its tries: fatal in Batch mode, the loss of one prompt in a live run."""


def refusal(status, message, model_flag="--model"):
    """The error for a request that the API refuses as it is: a 4xx answer not in RETRIED_4XX."""
    return FatalError(f"the API refused the request ({status}): {message}; check {model_flag}, --base_url and the"
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
    """Seconds the server asked us to wait (retry-after-ms or Retry-After), or None (also for a wait that is not
    a number of seconds: a date, nan, inf or below 0)."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            wait = float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(wait) and wait >= 0:
            return wait
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
                raise refusal(e.status_code, message, getattr(args, "model_flag", "--model")) from None
            reason, error, wait = str(e.status_code), f"{e.status_code} {message}", retry_after(e.response.headers)
        except openai.APITimeoutError:
            reason, error = "timeout", f"no answer in {args.timeout:g} s"
        except openai.APIConnectionError as e:
            reason, error = "connection", f"no connection ({e.__cause__ or e})"
        except ValueError:  # a 200 whose body is not JSON (cut short in transfer)
            reason, error = "bad_answer", "an answer that is not JSON"
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


def reasoning_model(model):
    """One of OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...): they refuse max_tokens, wanting
    max_completion_tokens, and any temperature but 1."""
    return re.match(r"gpt-5|o\d", model) is not None


def max_tokens_key(model):
    # other servers (older llama.cpp, some proxies) know only max_tokens, so only reasoning models get the new name
    return "max_completion_tokens" if reasoning_model(model) else "max_tokens"


def request_body(args, prompt):
    return {"model": args.model, "messages": [{"role": "user", "content": prompt}],
            max_tokens_key(args.model): args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}


def message_tokens(texts, model):
    """(mean tokens of a chat message holding each text, how they were counted): tiktoken's encoding of model,
    or OpenAI's newest for a model it does not know; 4 characters a token when tiktoken cannot load its
    vocabulary (it downloads it on first use, so offline it cannot)."""
    import tiktoken

    try:
        try:
            encoding = tiktoken.encoding_for_model(model)
        except KeyError:
            encoding = tiktoken.get_encoding("o200k_base")
        counts, how = [len(t) for t in encoding.encode_batch(texts)], f"tiktoken {encoding.name}"
    except Exception as e:  # no vocabulary offline: tiktoken raises whatever its download raised
        counts = [len(t) / 4 for t in texts]
        how = f"4 characters a token, as tiktoken could not load its vocabulary: {type(e).__name__}"
    return sum(counts) / max(1, len(counts)) + 7, how  # + the chat format's tokens around a message
