"""
A local OpenAI-compatible HTTP server for the tests and benchmarks of generate_stories.py and of the judge of
evaluate.py.

It speaks the parts of the API that generate_stories.py uses, through the real `openai` client:
    GET /v1/models, POST /v1/chat/completions, POST /v1/files, GET /v1/files/{id}, GET /v1/files/{id}/content,
    POST /v1/batches, GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
and writes plausible simple stories, deterministically from the prompt: as many as it asks for
("Write 4 short stories" / "Write a short story"), each with the paragraph count it asks for,
separated by the marker line it names. `max_tokens` is honoured (4 characters a token): an answer
that does not fit is cut, with finish_reason "length", as a real server does. Like OpenAI, it refuses
`max_tokens` (400) for the models that want `max_completion_tokens` (gpt-5*, o1, o3, o4-mini...), and any
temperature but 1 for them.
A judge request (judge.py's prompt, "Grade the story", or a json_schema response format) is answered with a
grade, a JSON object of an explanation and four scores from 0 to 100 that depend only on the story graded;
with json_schema=False a json_schema response format is refused (400), as by servers that do not take one.

Faults, injected at random with probability `fault_rate` or queued with `inject(kind, n)`:
    429         rate limited, asking to wait `retry_after` seconds (retry-after-ms and Retry-After headers,
                or, with retry_after_ms=False, Retry-After alone in whole seconds, as most other servers)
    500         internal server error
    stall       answers only after `stall` seconds, past the client's timeout
    disconnect  closes the connection without answering
    malformed   status 200 with a body that is not JSON
    truncated   the last story cut off mid-sentence, finish_reason "length"
    fewer       one story fewer than asked for
    merged      the stories without separator lines
and, only when queued, answers that end a run: 400 and 403, and quota (429 insufficient_quota).
With `answer_fault` one of truncated, fewer or merged, every answer has it, live and in batches, as a
model that always makes that mistake (or a --max_tokens always too small) would.
Answers of the wrong shape (SHAPE_FAULTS), a story's or a grade, in every answer with answer_fault=kind:
    content_parts   the content as a list of parts, [{"type": "text", "text": ...}], not a string
    usage_text      usage "n/a", not an object
    usage_strings   the token counts as strings
Faults of a judge's answer (JUDGE_FAULTS), queued with inject(kind, n), drawn with faults=..., or in every
judge answer with answer_fault=kind; a story request ignores them:
    not_json        a grade in words, not JSON
    out_of_range    a score of 150
    missing_score   the grammar score left out

A batch goes through validating, in_progress and finalizing to completed in `batch_delay` seconds.
In it, a request fails with probability `batch_fault_rate`: alternately an error-file line and a
request that is missing from the output. Faults of a whole batch, queued with `inject_batch(kind, n)`
and taken by the batches created next, one each:
    failed      fails in validation with token_limit_exceeded, as when the organisation's queue is full
    expired     the completion window ends with half of the requests done, the rest batch_expired
    garbled     a line of the output file is cut short, not JSON
    refused     one request answered 400 in the error file
    slow        takes 100 times batch_delay
    queued      says "queued" (a status of its own, not OpenAI's) before it goes on as any other
    timeout     is created, but the answer comes after `stall` seconds, past the client's timeout
    late        is created only after `stall` seconds, then answered: past the client's timeout, and past
                the lookup a client makes before it tries again

In a test:
    with OpenAIServer(latency=0.01, fault_rate=0.2) as server:
        client = openai.OpenAI(base_url=server.url, api_key=server.api_key)
Standalone (bench.py runs it this way, in its own process):
    python tests/openai_server.py --port=8000 --latency=0.1 --fault_rate=0.2
"""

import argparse
import hashlib
import json
import math
import random
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "stall", "disconnect", "malformed", "truncated", "fewer", "merged")
FATAL_FAULTS = ("400", "403", "quota")
ANSWER_FAULTS = ("truncated", "fewer", "merged")  # faults of the answer's text, which may be a model's habit
JUDGE_FAULTS = ("not_json", "out_of_range", "missing_score")
SHAPE_FAULTS = ("content_parts", "usage_text", "usage_strings")  # answers of the wrong shape, stories and grades alike
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-nano", "gpt-5-nano")  # what GET /v1/models lists
BATCH_FAULTS = ("failed", "expired", "garbled", "refused", "slow", "queued", "timeout", "late")
RUNNING = ("queued", "validating", "in_progress", "finalizing")  # a batch's statuses before it is done
ERRORS = {  # status, and the error object of the answer
    "400": (400, {"message": "Invalid value for 'temperature'.", "type": "invalid_request_error", "code": None}),
    "403": (403, {"message": "Project does not have access to model.", "type": "invalid_request_error",
                  "code": "model_not_found"}),
    "quota": (429, {"message": "You exceeded your current quota, please check your plan and billing details.",
                    "type": "insufficient_quota", "code": "insufficient_quota"}),
}

# the prompt wording these parse is stories.py's; the defaults cover anything else
STORIES_PER_PROMPT_RE = re.compile(r"Write (\d+) short stories")
N_PARAGRAPHS_RE = re.compile(r"exactly (\d+|one) paragraph")
SEPARATOR_RE = re.compile(r'line with only "([^"]+)"')
JUDGE_RE = re.compile(r"Grade the story")  # judge.py's prompt
STORY_RE = re.compile(r"<story>\n(.*)\n</story>", re.S)

SUBJECTS = ["Mia", "Leo", "Ava", "Sam", "Lily", "Max", "Zoe", "Ben", "The cat", "The dog",
            "A little bird", "The old man", "A small fox", "The girl", "The boy", "Grandma"]
VERBS = ["ran to", "looked at", "played with", "found", "sat by", "smiled at", "jumped over",
         "walked past", "sang to", "waved at", "hid behind", "drew", "picked up", "hugged"]
OBJECTS = ["the big tree", "a red ball", "the old house", "the small pond", "a shiny stone",
           "the green hill", "a soft hat", "the blue boat", "a warm cake", "the tall tower",
           "a tiny frog", "the yellow door", "a kind friend", "the quiet road", "a bright star"]
ENDINGS = ["", " in the morning", " after lunch", " with a big smile", " one more time",
           " very slowly", " in the rain", " at night", " with joy", " near the river"]


def story_text(prompt, index, n_paragraphs):
    """A story that depends only on the prompt and its place in the answer."""
    seed = hashlib.blake2b(f"{index}\n{prompt}".encode(), digest_size=8).digest()
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
                     f"{rng.choice(ENDINGS)}{rng.choice('..!')}" for _ in range(rng.randint(5, 7))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


class OpenAIServer:
    """The server's state, and the server itself in a background thread (a context manager)."""

    def __init__(self, latency=0.0, fault_rate=0.0, faults=FAULTS, stall=2.0, retry_after=0.05, retry_after_ms=True,
                 api_key="sk-test-key", batch_delay=0.2, batch_fault_rate=0.0, answer_fault=None, seed=0, port=0,
                 json_schema=True):
        assert answer_fault in (None,) + ANSWER_FAULTS + JUDGE_FAULTS + SHAPE_FAULTS, answer_fault
        self.latency, self.fault_rate, self.faults, self.stall = latency, fault_rate, list(faults), stall
        self.answer_fault, self.json_schema = answer_fault, json_schema
        self.retry_after, self.retry_after_ms = retry_after, retry_after_ms
        self.api_key, self.batch_delay, self.batch_fault_rate = api_key, batch_delay, batch_fault_rate
        self.rng = random.Random(seed)
        self.lock, self.batch_lock = threading.Lock(), threading.Lock()
        self.queued = []  # faults from inject(), served before the random ones
        self.queued_batch = []  # faults from inject_batch(), one for each batch created
        self.stats = Counter()  # requests by endpoint, faults by kind
        self.files, self.batches = {}, {}
        self.log = []  # (time, path, status) of each request, for tests of the client's timing
        self.httpd = Server(("127.0.0.1", port), Handler)
        self.httpd.app = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        # polled for shutdown every 0.05 s, not the default 0.5 s that each test would wait at its end
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, kind, n=1):
        assert kind in FAULTS + FATAL_FAULTS + JUDGE_FAULTS, kind
        with self.lock:
            self.queued += [kind] * n

    def inject_batch(self, kind, n=1):
        assert kind in BATCH_FAULTS, kind
        with self.lock:
            self.queued_batch += [kind] * n

    def next_fault(self):
        with self.lock:
            if self.queued:
                return self.queued.pop(0)
            if self.faults and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.faults)
            return None

    def count(self, key):
        with self.lock:
            self.stats[key] += 1
            return self.stats[key]

    def new_id(self, prefix):
        return f"{prefix}-{self.count('ids')}"

    # chat completions

    def refusal(self, body):
        """The (status, error) with which OpenAI (or a server without JSON schemas) refuses a request body, or None."""
        if re.match(r"gpt-5|o\d", body.get("model", "")) and "max_tokens" in body:
            return 400, {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use"
                                    " 'max_completion_tokens' instead.", "type": "invalid_request_error",
                         "param": "max_tokens", "code": "unsupported_parameter"}
        if re.match(r"gpt-5|o\d", body.get("model", "")) and body.get("temperature", 1) != 1:
            return 400, {"message": f"Unsupported value: 'temperature' does not support {body['temperature']} with this"
                                    f" model. Only the default (1) value is supported.", "type": "invalid_request_error",
                         "param": "temperature", "code": "unsupported_value"}
        if not self.json_schema and (body.get("response_format") or {}).get("type") == "json_schema":
            return 400, {"message": "response_format of type 'json_schema' is not supported by this model.",
                         "type": "invalid_request_error", "param": "response_format", "code": None}
        return None

    @staticmethod
    def grade(prompt, fault):
        """A judge's answer: scores from 0 to 100 that depend only on the story in the prompt, as JSON."""
        m = STORY_RE.search(prompt)
        h = hashlib.blake2b((m.group(1) if m else prompt).encode(), digest_size=8).digest()
        grade = {"explanation": "A simple story that mostly holds together.",
                 **{k: 20 + h[j] % 71 for j, k in enumerate(("originality", "coherence", "grammar", "quality"))}}
        if fault == "out_of_range":
            grade["originality"] = 150
        if fault == "missing_score":
            del grade["grammar"]
        if fault == "not_json":
            return f"The story is fine. Originality: {grade['originality']} out of 100, quality: {grade['quality']}."
        return json.dumps(grade)

    def completion(self, body, fault=None):
        """A chat completion object for a request body; faults that change the answer applied."""
        answer = self.chat_completion(body, fault)
        message, usage = answer["choices"][0]["message"], answer["usage"]
        if self.answer_fault == "content_parts":
            message["content"] = [{"type": "text", "text": message["content"]}]
        elif self.answer_fault == "usage_text":
            answer["usage"] = "n/a"
        elif self.answer_fault == "usage_strings":
            answer["usage"] = {k: str(v) for k, v in usage.items()}
        return answer

    def chat_completion(self, body, fault=None):
        fault = fault or self.answer_fault
        prompt = body["messages"][-1]["content"]
        if JUDGE_RE.search(prompt) or (body.get("response_format") or {}).get("type") == "json_schema":
            text = self.grade(prompt, fault if fault in JUDGE_FAULTS else None)
            return {"id": self.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "gpt-4o-mini") + "-2024-07-18",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                              "total_tokens": len(prompt) // 4 + len(text) // 4}}
        fault = fault if fault in FAULTS + ANSWER_FAULTS else None
        m = STORIES_PER_PROMPT_RE.search(prompt)
        stories_per_prompt = int(m.group(1)) if m else 1
        m = N_PARAGRAPHS_RE.search(prompt)
        n_paragraphs = (1 if m.group(1) == "one" else int(m.group(1))) if m else 3
        m = SEPARATOR_RE.search(prompt)
        separator = m.group(1) if m else "###"
        stories = [story_text(prompt, i, n_paragraphs) for i in range(stories_per_prompt)]
        if fault == "fewer" and stories_per_prompt > 1:
            stories = stories[:-1]
        text = ("\n\n" if fault == "merged" else f"\n\n{separator}\n\n").join(stories)
        finish_reason = "stop"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if fault == "truncated":
            text, finish_reason = text[: len(text) - len(stories[-1]) // 2], "length"
        elif max_tokens and len(text) > 4 * max_tokens:
            text, finish_reason = text[: 4 * max_tokens], "length"
        return {
            "id": self.new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "gpt-4o-mini") + "-2024-07-18",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                      "total_tokens": len(prompt) // 4 + len(text) // 4},
        }

    # batches

    def batch_object(self, batch):
        """The batch as it is now: validating, in progress, finalizing, then done after batch_delay."""
        with self.batch_lock:
            age = (time.time() - batch["created_at"]) / (self.batch_delay * (100 if batch["fault"] == "slow" else 1))
            if batch["status"] == "cancelling":
                batch["status"], batch["cancelled_at"] = "cancelled", int(time.time())
            elif batch["status"] in RUNNING:
                if batch["fault"] == "failed" and age >= 1 / 3:
                    batch["status"], batch["failed_at"] = "failed", int(time.time())
                    batch["errors"] = {"object": "list", "data": [{
                        "code": "token_limit_exceeded", "line": None, "param": None,
                        "message": "Enqueued token limit reached for gpt-4o-mini in organization org-test. Limit:"
                                   " 2,000,000 enqueued tokens. Please try submitting fewer tasks or try again"
                                   " later."}]}
                elif age >= 1:
                    self.run_batch(batch)
                else:
                    first = "queued" if batch["fault"] == "queued" else "validating"
                    batch["status"] = (first, "in_progress", "finalizing")[int(3 * age)]
            return {k: v for k, v in batch.items() if k != "fault"}

    def run_batch(self, batch):
        output, errors = [], []
        requests = [json.loads(line) for line in self.files[batch["input_file_id"]]["content"].splitlines()]
        for i, request in enumerate(requests):
            with self.lock:
                failed = self.rng.random() < self.batch_fault_rate
            refusal = self.refusal(request["body"]) or (ERRORS["400"] if batch["fault"] == "refused" and i == 0
                                                        else None)
            if batch["fault"] == "expired" and i >= len(requests) // 2:
                errors.append({"id": self.new_id("batch_req"), "custom_id": request["custom_id"], "response": None,
                               "error": {"code": "batch_expired", "message": "This request could not be executed"
                                                                          " before the completion window expired."}})
            elif refusal:
                errors.append({"id": self.new_id("batch_req"), "custom_id": request["custom_id"],
                               "response": {"status_code": refusal[0], "body": {"error": refusal[1]}}, "error": None})
            elif failed:
                if self.count("batch_faults") % 2:
                    errors.append({"id": self.new_id("batch_req"), "custom_id": request["custom_id"],
                                   "response": {"status_code": 500, "body": {"error": {"message": "server error"}}},
                                   "error": None})
            else:
                output.append({"id": self.new_id("batch_req"), "custom_id": request["custom_id"],
                               "response": {"status_code": 200, "request_id": self.new_id("req"),
                                            "body": self.completion(request["body"])},
                               "error": None})
        output = [json.dumps(x) + "\n" for x in output]
        if batch["fault"] == "garbled" and output:
            output[0] = output[0][:40] + "\n"
        for key, lines in (("output_file_id", output), ("error_file_id", [json.dumps(x) + "\n" for x in errors])):
            if lines:
                batch[key] = self.add_file("".join(lines).encode(), "batch_output", f"{batch['id']}_{key}.jsonl")["id"]
        batch["request_counts"] = {"total": len(requests), "completed": len(output), "failed": len(errors)}
        batch["status"] = "expired" if batch["fault"] == "expired" else "completed"
        batch[f"{batch['status']}_at"] = int(time.time())

    def add_file(self, content, purpose, filename):
        file = {"id": self.new_id("file"), "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose, "status": "processed"}
        self.files[file["id"]] = {**file, "content": content}
        return file

    # routing: (status, payload, extra headers), where status may name a fault for the handler to act out

    def handle(self, method, path, headers, body):
        if headers.get("Authorization") != f"Bearer {self.api_key}":
            return 401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}}, {}
        path = path.split("?")[0].rstrip("/")
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 1721172741,
                                                     "owned_by": "system"} for m in MODELS]}, {}
        if method == "POST" and path == "/v1/chat/completions":
            self.count("chat")
            if self.latency:
                time.sleep(self.latency)
            request = json.loads(body)
            refusal = self.refusal(request)
            if refusal:
                return refusal[0], {"error": refusal[1]}, {}
            fault = self.next_fault()
            if fault:
                self.count(fault)
            if fault in ERRORS:
                return ERRORS[fault][0], {"error": ERRORS[fault][1]}, {}
            if fault == "429":
                wait = {"Retry-After": str(math.ceil(self.retry_after))}
                if self.retry_after_ms:
                    wait["retry-after-ms"] = str(round(self.retry_after * 1000))
                return 429, {"error": {"message": "Rate limit reached.", "type": "requests",
                                       "code": "rate_limit_exceeded"}}, wait
            if fault == "500":
                return 500, {"error": {"message": "The server had an error.", "type": "server_error"}}, {}
            if fault in ("stall", "disconnect", "malformed"):
                return fault, None, {}
            return 200, self.completion(request, fault), {}
        if method == "POST" and path == "/v1/files":
            fields = parse_multipart(headers.get("Content-Type", ""), body)
            return 200, self.add_file(fields["file"][1], fields["purpose"][1].decode(), fields["file"][0]), {}
        m = re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)
        if method == "GET" and m and m.group(1) in self.files:
            file = self.files[m.group(1)]
            if m.group(2):
                return 200, file["content"], {"Content-Type": "application/octet-stream"}
            return 200, {k: v for k, v in file.items() if k != "content"}, {}
        if method == "POST" and path == "/v1/batches":
            request = json.loads(body)
            if request.get("input_file_id") not in self.files:
                return 400, {"error": {"message": "No such input file.", "type": "invalid_request_error"}}, {}
            with self.lock:
                fault = self.queued_batch.pop(0) if self.queued_batch else None
            if fault == "late":
                time.sleep(self.stall)
            batch = {"id": self.new_id("batch"), "object": "batch", "endpoint": request["endpoint"],
                     "input_file_id": request["input_file_id"], "completion_window": request["completion_window"],
                     "status": "validating", "created_at": time.time(), "output_file_id": None,
                     "error_file_id": None, "metadata": request.get("metadata"), "fault": fault}
            self.batches[batch["id"]] = batch
            self.count("batches")
            if fault == "timeout":
                time.sleep(self.stall)
            return 200, self.batch_object(batch), {}
        if method == "GET" and path == "/v1/batches":
            data = [self.batch_object(b) for b in reversed(list(self.batches.values()))]
            return 200, {"object": "list", "data": data, "has_more": False}, {}
        m = re.fullmatch(r"/v1/batches/([\w-]+)(/cancel)?", path)
        if m and m.group(1) in self.batches and (method, bool(m.group(2))) in (("GET", False), ("POST", True)):
            batch = self.batches[m.group(1)]
            if m.group(2):
                with self.batch_lock:
                    if batch["status"] not in RUNNING:
                        return 400, {"error": {"message": f"Cannot cancel a batch with status {batch['status']}.",
                                               "type": "invalid_request_error"}}, {}
                    batch["status"] = "cancelling"
                    return 200, {k: v for k, v in batch.items() if k != "fault"}, {}
            return 200, self.batch_object(batch), {}
        return 404, {"error": {"message": f"No route {method} {path}.", "type": "invalid_request_error"}}, {}


def parse_multipart(content_type, body):
    """{name: (filename, bytes)} from a multipart/form-data body."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    fields = {}
    for part in body.split(b"--" + boundary)[1:-1]:
        head, _, content = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head).group(1).decode()
        filename = re.search(rb'filename="([^"]*)"', head)
        fields[name] = (filename.group(1).decode() if filename else None, content[:-2])  # drop the part's \r\n
    return fields


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default listen backlog of 5 resets connections opened in a burst

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no news
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body 40 ms

    def log_message(self, *args):
        pass

    def serve(self, method):
        app = self.server.app
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, payload, extra = app.handle(method, self.path, self.headers, body)
        app.log.append((time.time(), self.path, status))
        if status == "disconnect":
            self.close_connection = True
            return
        if status == "stall":
            time.sleep(app.stall)
            status, payload = 200, app.completion(json.loads(body))
        if status == "malformed":
            status, payload = 200, b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": [{"ind'
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **extra}.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a stalled request
            self.close_connection = True

    def do_GET(self):
        self.serve("GET")

    def do_POST(self):
        self.serve("POST")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Local OpenAI-compatible server for tests and benchmarks.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per chat completion")
    parser.add_argument("--fault_rate", type=float, default=0.0, help="probability of a fault per request")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated kinds to draw from")
    parser.add_argument("--stall", type=float, default=2.0, help="seconds a stalled request takes")
    parser.add_argument("--api_key", default="sk-test-key")
    parser.add_argument("--max_seconds", type=float, default=3600, help="stop by itself after this long")
    args = parser.parse_args()
    server = OpenAIServer(latency=args.latency, fault_rate=args.fault_rate, faults=args.faults.split(","),
                          stall=args.stall, api_key=args.api_key, port=args.port)
    print(f"listening on {server.url}", flush=True)
    with server:
        time.sleep(args.max_seconds)
