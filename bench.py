"""
Benchmarks: one function per benchmark, named on the command line. Numbers go in BENCHMARKS.md.

Usage (arguments of a benchmark's function may follow: python bench.py sampling device=cuda rounds=5):
  python bench.py generate     # generate_stories.py against a local server: requests/s against the ideal, memory
  python bench.py train_step   # a CPU training step of the 1.25M and 5M models against transformers' Llama
  python bench.py data_wait    # a training step on the bins against one on synthetic tokens, and its wait for batches
  python bench.py kv_cache     # sampling 256 tokens with the KV cache against recomputing the sequence
  python bench.py optimizers   # steps to the AdamW-cosine run's final val loss: AdamW or Muon, cosine or warmup-stable-decay
  python bench.py mlp_width    # a training step with d_mlp = int(8 d_model / 3) against it rounded up to a multiple of 64
  python bench.py openers      # tokens per word at story and paragraph starts against elsewhere (no timing)
  python bench.py sampling     # generate() against transformers' generate, batch 1 and 32, 400 new tokens
  python bench.py profile      # the ops a compiled training step spends its time in (e.g. config=35m device=cuda batch_size=256)
  python bench.py gpu          # on a GPU: train.py on every suite config (tokens/s, MFU, memory, start-up, data wait),
                               # torchrun, CUDA graphs, MLP width, Muon, synthetic data, then sampling on the GPU
"""

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.abspath(__file__))


def generate(n_requests=2000):
    """n_requests chat completions through generate_stories.py at concurrency 64 against the local test
    server answering in 100 ms, in its own process: client and server share the machine's cores, as a
    client and the API would not. The ideal rate is concurrency / latency = 640 requests/s; the target
    is 80% of it. Memory (resident set) is sampled along the way: it should stay flat."""
    import generate_stories

    concurrency, latency, stories_per_prompt = 64, 0.1, 4
    server = subprocess.Popen([sys.executable, "tests/openai_server.py", f"--latency={latency}", "--max_seconds=300"],
                              stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().split()[-1]
    samples = []  # (seconds, resident MB)
    running = True

    def sample_memory():
        page = os.sysconf("SC_PAGE_SIZE")
        while running:
            with open("/proc/self/statm") as f:
                samples.append((time.time(), int(f.read().split()[1]) * page / 2**20))
            time.sleep(0.05)

    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["OPENAI_API_KEY"] = "sk-test-key"
            argv = [f"--base_url={url}", f"--n_stories={n_requests * stories_per_prompt}",
                    f"--stories_per_prompt={stories_per_prompt}", f"--concurrency={concurrency}",
                    f"--out={tmp}/stories.jsonl"]
            threading.Thread(target=sample_memory, daemon=True).start()
            t0 = time.time()
            generate_stories.main(argv)
            dt = time.time() - t0
            running = False
    finally:
        server.terminate()
    rate, ideal = n_requests / dt, concurrency / latency
    mb = [m for t, m in samples if t >= t0]
    quarter = mb[len(mb) // 4]
    print(f"generate: {n_requests:,} requests in {dt:.2f} s = {rate:.0f} requests/s, {rate / ideal:.0%} of the ideal"
          f" {ideal:.0f}/s (concurrency {concurrency}, {latency * 1000:.0f} ms a request)")
    print(f"generate: resident memory {quarter:.0f} MB a quarter of the way, {mb[-1]:.0f} MB at the end,"
          f" {max(mb):.0f} MB at most")


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def suite_config(name):
    from configurator import read_config
    from model import GPTConfig

    path = os.path.join(REPO, "configs", f"{name}.py")
    settings = {key: value for key, value, _ in read_config(path)}
    return GPTConfig(**{k: settings[k] for k in ("n_layers", "d_model", "n_heads") if k in settings})


def train_step(compile=None, rounds=5):
    """One AdamW training step (forward, backward, update) on CPU, batch 8 x 512, of our GPT and of transformers'
    LlamaForCausalLM (SDPA attention) of the same shape, timed in turns in one process so that drift hits both: in
    each of `rounds` rounds every step's median of three; the best round of each, and the range of the ratio over the
    rounds (how far this machine's noise moves it). Pairings: ours as train.py runs it here (compiled, in bfloat16
    autocast where dtype='auto' picks it: a CPU with AMX or AVX512_BF16) against transformers as its users run it (eager,
    float32); both eager in float32; both compiled in float32; and, on such a CPU, both eager in bfloat16 autocast (without
    bf16 units it is 10x slower than float32 and train.py never runs it). compile=True or False: only the float32
    pair, both compiled or both eager."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    from contextlib import nullcontext

    import torch

    from configurator import bf16_is_fast
    from export import llama_of
    from model import GPT

    auto = "bfloat16" if bf16_is_fast("cpu") else "float32"
    pairs = {None: [((True, auto), (False, "float32")), ((False, "float32"), (False, "float32")),
                    ((True, "float32"), (True, "float32"))],
             True: [((True, "float32"), (True, "float32"))], False: [((False, "float32"), (False, "float32"))]}[compile]
    if compile is None and auto == "bfloat16":
        pairs.append(((False, "bfloat16"), (False, "bfloat16")))
    for name in ("1.25m", "5m"):
        c = suite_config(name)
        torch.manual_seed(0)
        ours = GPT(c)
        llama = llama_of(ours, attn_implementation="sdpa")  # the same weights
        x, y = torch.randint(0, c.d_vocab, (8, 512)), torch.randint(0, c.d_vocab, (8, 512))

        def step_of(model, loss_of, compiled, dtype):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            forward = torch.compile(model) if compiled else model

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext():
                    loss = loss_of(forward)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step

        steps = {}
        for ours_way, llama_way in pairs:
            steps.setdefault(("ours", *ours_way), step_of(ours, lambda m: m(x, y)[1], *ours_way))
            steps.setdefault(("llama", *llama_way), step_of(llama, lambda m: m(input_ids=x, labels=y).loss, *llama_way))
        times = {k: [] for k in steps}
        for _ in range(rounds):
            for k, step in steps.items():
                times[k].append(median_seconds(step, 3))
        best = {k: min(v) for k, v in times.items()}

        def way(compiled, dtype):
            return f"{'compiled' if compiled else 'eager'} {dtype}"
        for ours_way, llama_way in pairs:
            a, b = best[("ours", *ours_way)], best[("llama", *llama_way)]
            ratios = [t / o for o, t in zip(times[("ours", *ours_way)], times[("llama", *llama_way)])]
            print(f"train_step {name}: ours {way(*ours_way)} {a * 1000:.0f} ms, transformers Llama {way(*llama_way)} "
                  f"{b * 1000:.0f} ms, ours is {b / a:.2f}x as fast ({min(ratios):.2f}x-{max(ratios):.2f}x over "
                  f"{rounds} rounds)", flush=True)


def data_wait(config="1.25m", max_iters=40, rounds=3, device="cpu"):
    """train.py on the sample bins (data/sample here) against train.py on synthetic tokens already on the device
    (--synthetic_data=True), in turns, rounds times each: config's shape, a step of 8,192 tokens in two micro-steps of
    8 x 512, eager (the data path is the same compiled). Per run, from log.jsonl, the median over its log lines after
    the first: the step time and the share of it the loop waited for its next batch. Real bins cost what their step
    takes over the synthetic one; a reader thread that held the GIL or a core while the step ran shows there, though
    not in the wait."""
    import json

    import numpy as np

    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    if max_iters < 10:
        raise ValueError(f"max_iters={max_iters} must be at least 10: two log lines of 5 steps, the first left out")

    def run(synthetic):
        with tempfile.TemporaryDirectory() as out_dir:
            result = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), os.path.join(REPO, "configs", f"{config}.py"),
                                     "--dataset=sample", f"--out_dir={out_dir}", f"--max_iters={max_iters}", "--tokens_per_step=8192",
                                     "--batch_size=8", f"--eval_interval={max_iters}", "--eval_seqs=8", "--log_interval=5",
                                     "--sample_tokens=0", "--compile=False", f"--device={device}", f"--synthetic_data={synthetic}"],
                                    capture_output=True, text=True)
            if result.returncode:
                why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit status {result.returncode}"
                sys.exit(f"bench.py data_wait: train.py failed: {why}")
            records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
        steps = [r for r in records if "data_wait" in r][1:]  # the first interval warms up
        return np.median([r["ms_per_step"] for r in steps]), np.median([r["data_wait"] for r in steps])

    print(f"data_wait: {config}, {max_iters} steps of 8,192 tokens a run on {device}, medians of steps 6-{max_iters}")
    print("| round | real bins | synthetic tokens | real / synthetic | waiting for batches (real bins) |")
    print("|---|---|---|---|---|")
    ratios = []
    for i in range(rounds):  # in turns, each round's first run alternating, so a machine's drift falls on both
        results = {synthetic: run(synthetic) for synthetic in ((False, True) if i % 2 == 0 else (True, False))}
        (real, wait), (synthetic, _) = results[False], results[True]
        ratios.append(real / synthetic)
        print(f"| {i + 1} | {real:.0f} ms | {synthetic:.0f} ms | {real / synthetic:.3f}x | {100 * wait:.2f}% |")
    print(f"real bins: {statistics.median(ratios):.3f}x the synthetic step (median of {rounds} rounds, "
          f"{min(ratios):.3f}x-{max(ratios):.3f}x)")


def kv_cache(n_tokens=256):
    """Greedy sampling of n_tokens from BOS with the 5M model on CPU: with the KV cache, and recomputing the
    whole sequence at each step."""
    import torch

    from model import GPT

    torch.manual_seed(0)
    model = GPT(suite_config("5m")).eval()
    idx = torch.ones(1, 1, dtype=torch.long)
    cached = median_seconds(lambda: model.generate(idx, n_tokens, temperature=0), 5)
    recompute = median_seconds(lambda: model.generate(idx, n_tokens, temperature=0, use_cache=False), 3)
    print(f"kv_cache 5m, {n_tokens} tokens: {cached * 1000:.0f} ms with the cache, {recompute * 1000:.0f} ms recomputing, "
          f"{recompute / cached:.1f}x faster")


OPTIMIZER_RUNS = {"adamw cosine": [], "adamw wsd": ["--lr_schedule=wsd"], "muon cosine": ["--optimizer=muon"],
                  "muon wsd": ["--optimizer=muon", "--lr_schedule=wsd"]}


def steps_to(curve, target):
    """The first step at which a val loss curve [(step, loss), ...] reaches target, interpolated linearly between
    evaluations; None if it never does."""
    for (s0, l0), (s1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            return s1 if l0 == l1 else s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def optimizers(seeds=(1, 2), max_iters=200, workers=2):
    """train.py on the sample bins, the quickstart model (1.25M shape, context 256) at 2,048 tokens a step for
    max_iters steps, eager on CPU, one thread a run (workers runs at a time): AdamW with the cosine schedule (the
    baseline, the quickstart's learning rate 4e-3 and weight decay 0.3), AdamW with warmup-stable-decay, Muon
    (at the same learning rate, on AdamW's scale) with each; the same seeds, so each seed's runs see the same
    weights at step 0 and the same batches. The val loss is taken every 20 steps; for each run, the steps it
    takes to reach the baseline's final val loss of its seed (a cosine run is measured mid-schedule: its
    learning rate is still high there, so this understates what a shorter run of it would reach)."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    def train(name, seed, out_dir):
        args = [sys.executable, "train.py", "configs/quickstart.py", f"--out_dir={out_dir}", f"--seed={seed}",
                f"--max_iters={max_iters}", "--tokens_per_step=2048", "--batch_size=8", "--eval_interval=20",
                "--log_interval=20", "--sample_tokens=0", "--device=cpu", *OPTIMIZER_RUNS[name]]
        t0 = time.time()
        result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            sys.exit(result.stderr)
        records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
        ms = np.median([r["ms_per_step"] for r in records if "ms_per_step" in r][1:])
        print(f"optimizers: {name}, seed {seed} done in {time.time() - t0:.0f} s, {ms:.0f} ms a step", flush=True)
        return [(r["step"], r["val_loss"]) for r in records if "val_loss" in r], ms

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(workers) as pool:
        jobs = {(name, seed): pool.submit(train, name, seed, os.path.join(tmp, f"{name.replace(' ', '_')}_{seed}"))
                for seed in seeds for name in OPTIMIZER_RUNS}
        results = {key: job.result() for key, job in jobs.items()}
    curves = {key: curve for key, (curve, _) in results.items()}
    print("optimizers: val loss every 20 steps, " + json.dumps({f"{n} {s}": [round(v, 4) for _, v in c] for (n, s), c in curves.items()}))
    for name in OPTIMIZER_RUNS:
        needed = [steps_to(curves[name, seed], curves["adamw cosine", seed][-1][1]) for seed in seeds]
        final = [curves[name, seed][-1][1] for seed in seeds]
        ms = np.median([results[name, seed][1] for seed in seeds])
        shown = ", ".join("never" if n is None else f"{n:.0f}" for n in needed)
        speedup = "" if None in needed else f", {max_iters / np.mean(needed):.2f}x fewer steps"
        print(f"optimizers {name}: final val loss {np.mean(final):.4f} (seeds {', '.join(f'{v:.4f}' for v in final)}); steps to "
              f"the baseline's final val loss: {shown} (seeds){speedup}; {ms:.0f} ms a step (loaded machine)")


def mlp_width(names=("1.25m", "5m")):
    """One AdamW training step (forward, backward, update) in float32 on CPU, batch 4 x 512, eager, of the suite's
    shape with d_mlp = int(8 d_model / 3) and with it rounded up to a multiple of 64, timed in turns in one
    process; the best of three rounds of medians. The rounding is for GPU tensor cores, whose matmul tiles are
    multiples of 64: a CPU shows what the wider MLP costs, not what the whole tiles gain."""
    import torch

    from model import GPT, GPTConfig

    for name in names:
        c = suite_config(name)
        steps, widths, counts = {}, {}, {}
        x, y = torch.randint(0, c.d_vocab, (4, 512)), torch.randint(0, c.d_vocab, (4, 512))
        for multiple in (1, 64):
            torch.manual_seed(0)
            model = GPT(GPTConfig(n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_mlp_multiple=multiple))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer):
                model(x, y)[1].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps[multiple], widths[multiple], counts[multiple] = step, model.config.d_mlp, model.num_params()
        times = {k: [] for k in steps}
        for _ in range(3):
            for k, step in steps.items():
                times[k].append(median_seconds(step, 3))
        a, b = min(times[1]), min(times[64])
        print(f"mlp_width {name}: d_mlp {widths[1]} ({counts[1]:,} parameters) {a * 1000:.0f} ms a step, d_mlp {widths[64]} "
              f"({counts[64]:,} parameters) {b * 1000:.0f} ms; rounded up is {a / b:.2f}x as fast")


def openers(stories="data/sample/stories.jsonl", tokenizer_file="tokenizers/sample.model"):
    """Tokens per word at a story's start, at a paragraph's start (after a blank line) and elsewhere, in the stories
    as the tokenizer encodes them whole. A word there has no space before it, so its pieces are not the "▁So" of
    the same word after a space: the same words are also counted as they are spelled after a space (" " + word,
    encoded alone), and the share of the corpus's tokens that each word's first piece makes (how rare it is). A
    word is a run of letters (with an apostrophe inside); a token counts for each word its bytes overlap."""
    import json
    import re
    from collections import Counter

    import numpy as np

    from tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_file)
    sizes = np.array(tok.token_bytes())
    texts = [json.loads(line)["story"] for line in open(stories)]
    encoded = tok.encode_many(texts)
    frequency = Counter(i for ids in encoded for i in ids)
    total = sum(frequency.values())
    counts = {"story start": [], "paragraph start": [], "elsewhere": []}  # (word, tokens, first piece's id)
    for text, ids in zip(texts, encoded):
        ends = np.cumsum(sizes[ids])
        starts = ends - sizes[ids]
        for m in re.finditer(r"[A-Za-z]+(?:'[A-Za-z]+)*", text):
            overlap = np.nonzero((starts < m.end()) & (ends > m.start()))[0]
            where = ("story start" if m.start() == 0 else "paragraph start" if text[:m.start()].endswith("\n\n")
                     else "elsewhere")
            counts[where].append((m.group(), len(overlap), ids[overlap[0]]))
    print(f"openers: {len(texts)} stories of {stories}, {tokenizer_file}")
    print("| where | words | tokens per word | the same words after a space | first piece's share of tokens (median) |")
    print("|---|---|---|---|---|")
    for where, rows in counts.items():
        tokens = np.mean([n for _, n, _ in rows])
        share = np.median([frequency[first] / total for *_, first in rows])
        if where == "elsewhere":
            print(f"| {where} | {len(rows):,} | {tokens:.3f} | - | {100 * share:.3f}% |")
            continue
        spaced = [tok.encode(" " + word) for word, _, _ in rows]
        spaced_share = np.median([frequency[ids[0]] / total for ids in spaced])
        print(f"| {where} | {len(rows):,} | {tokens:.3f} | {np.mean([len(ids) for ids in spaced]):.3f} "
              f"| {100 * share:.3f}% (after a space {100 * spaced_share:.3f}%) |")
    common = Counter(word for word, _, _ in counts["story start"] + counts["paragraph start"]).most_common(5)
    print("most common openers, tokens at the start / after a space: " + ", ".join(
        f"{word} {len(tok.encode(word))}/{len(tok.encode(' ' + word))}" for word, _ in common))


def llama_twin(model):
    """transformers' LlamaForCausalLM with model's weights (export.py's mapping), SDPA attention, in eval mode."""
    from transformers import GenerationConfig

    from export import llama_of

    llama = llama_of(model, attn_implementation="sdpa")
    llama.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    return llama.to(next(model.parameters()).device).eval()


def sampling(n_tokens=400, batch_sizes=(1, 32), rounds=3, device="cpu"):
    """Greedy generation of n_tokens after an 8-token prompt with the 5M model (random weights, no EOS, so
    that every run makes all n_tokens), batch 1 and batch 32: our generate(), eager and compiled, against
    transformers' generate() on the same weights (its default dynamic cache, SDPA), timed in turns in one
    process; the best of `rounds` runs each, after one warm-up run (for compile=True, the compilation: its
    time is printed). Also the share of generated tokens on which ours and transformers agree (greedy
    decoding diverges for good at the first near-tie that float noise flips)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    import torch

    from model import GPT

    torch.manual_seed(0)
    model = GPT(suite_config("5m")).to(device).eval()
    llama = llama_twin(model)
    for batch_size in batch_sizes:
        idx = torch.randint(0, model.config.d_vocab, (batch_size, 8), generator=torch.Generator().manual_seed(1)).to(device)
        runs = {
            "ours eager": lambda: model.generate(idx, n_tokens, temperature=0),
            "ours compiled": lambda: model.generate(idx, n_tokens, temperature=0, compile=True),
            "transformers": lambda: llama.generate(idx, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False),
        }

        def timed(fn):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device != "cpu":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        outputs, times, warmup = {}, {name: [] for name in runs}, {}
        for name, fn in runs.items():
            outputs[name], warmup[name] = timed(fn)
            assert outputs[name].shape == (batch_size, 8 + n_tokens), (name, outputs[name].shape)
        for _ in range(rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn)[1])
        rate = {name: batch_size * n_tokens / min(t) for name, t in times.items()}
        head = f"sampling 5m {device}, batch {batch_size}, {n_tokens} tokens:"
        print(f"{head} " + ", ".join(f"{name} {rate[name]:.0f} tokens/s" for name in runs))
        for name in ("ours eager", "ours compiled"):
            print(f"{head} {name} is {rate[name] / rate['transformers']:.2f}x as fast as transformers")
        print(f"{head} first compiled call {warmup['ours compiled']:.1f} s, a compiled run after it {min(times['ours compiled']):.2f} s")
        ours, eager, theirs = outputs["ours compiled"][:, 8:], outputs["ours eager"][:, 8:], outputs["transformers"][:, 8:]
        same = (ours == theirs).float().mean().item()
        diverged = (ours != theirs).cumsum(dim=1).bool().float().mean().item()
        print(f"{head} compiled and eager agree on {(ours == eager).float().mean().item():.1%} of tokens; "
              f"ours and transformers on {same:.1%}, {diverged:.1%} after the first difference in a row")


def profile(config="5m", batch_size=8, device="cpu", steps=3, rows=20):
    """Where a training step's time goes: a step of a suite config as train.py takes it (compiled, bf16 autocast
    where dtype='auto' picks it, gradient clipping, AdamW, fused on a GPU), batch_size x 512 random tokens, under
    torch.profiler for `steps` steps after two warm-up steps (the first compiles). Prints the time of a step (of
    `steps` steps timed before the profiler, which slows them), its MFU on a GPU of configurator.PEAK_FLOPS, and the
    `rows` ops that take the most device time, their own time only."""
    from contextlib import nullcontext

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    from configurator import bf16_is_fast
    from model import GPT

    on_gpu = device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = GPT(suite_config(config)).to(device)
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), fused=on_gpu)
    compiled = torch.compile(model)
    bf16 = bf16_is_fast(device.split(":")[0])
    x, y = (torch.randint(0, model.config.d_vocab, (batch_size, model.config.n_ctx), device=device) for _ in range(2))

    def run_steps(n):
        """Seconds a step over n steps, waiting for the device once at the end (as train.py's steps run)."""
        t0 = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if bf16 else nullcontext():
                loss = compiled(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n

    print(f"profile {config} {device}: first step (compiling) {run_steps(1):.1f} s", flush=True)
    run_steps(1)
    seconds = run_steps(steps)  # timed outside the profiler, whose tracing slows the steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profiler(activities=activities) as prof:
        run_steps(steps)
    tokens = batch_size * model.config.n_ctx
    head = f"profile {config} {device}, {'bf16' if bf16 else 'float32'}, batch {batch_size} x {model.config.n_ctx}:"
    line = f"{head} {seconds * 1000:.1f} ms a step, {tokens / seconds:,.0f} tokens/s"
    if on_gpu:
        from configurator import gpu_peak_flops
        peak = gpu_peak_flops(device)
        if peak:
            line += f", MFU {model.flops_per_token() * tokens / seconds / peak:.1%}"
    print(line)
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=80), flush=True)


# (name, config, micro-batch, flags): train.py as users run it on one GPU: bf16 autocast, compiled, fused AdamW, and
# CUDA graphs where a step is one micro-step (compile_mode='auto')
GPU_RUNS = [
    *[(f"{c} batch 256", c, 256, ["--tokens_per_step=131072"]) for c in ("1.25m", "5m", "11m", "30m", "35m")],
    ("35m max-autotune", "35m", 256, ["--tokens_per_step=131072", "--compile_mode=max-autotune-no-cudagraphs"]),
    ("35m batch 512", "35m", 512, ["--tokens_per_step=262144"]),
    ("5m recipe", "5m", 64, []),  # the config as it is: 32,768 tokens a step, one micro-step of 64
    ("35m recipe", "35m", 32, []),  # two micro-steps of 32
    ("5m torchrun", "5m", 64, []),
    ("35m batch 256 no cuda graphs", "35m", 256, ["--tokens_per_step=131072", "--compile_mode=default"]),
    ("1.25m no cuda graphs", "1.25m", 64, ["--compile_mode=default"]),
    ("5m no cuda graphs", "5m", 64, ["--compile_mode=default"]),
    ("5m d_mlp x64", "5m", 64, ["--d_mlp_multiple=64"]),
    ("5m muon", "5m", 64, ["--optimizer=muon"]),
    ("1.25m recipe", "1.25m", 64, []),
    ("1.25m synthetic data", "1.25m", 64, ["--synthetic_data=True"]),  # the recipe's step when data costs nothing
    ("5m synthetic data", "5m", 64, ["--synthetic_data=True"]),
]

PYTHON = [sys.executable]  # how gpu() starts a script (the tests start it on a fake GPU)


def gpu_command(name, config, batch_size, flags, out_dir, max_iters):
    """train.py on the sample bins, evaluating at step 0 and at the end (eval_seqs = batch_size: the sample's val.bin
    holds fewer windows, so one smaller val batch)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    return [*(torchrun if "torchrun" in name else PYTHON), os.path.join(REPO, "train.py"), os.path.join(REPO, "configs", f"{config}.py"),
            "--dataset=sample", f"--out_dir={out_dir}", f"--max_iters={max_iters}", f"--batch_size={batch_size}",
            f"--eval_seqs={batch_size}", f"--eval_interval={max_iters}", "--log_interval=10",
            "--sample_tokens=0", *flags]


def run_timed(command, timeout, env=None):
    """Runs command for at most timeout seconds; returns (return code, seconds to its first 'step N: loss' line or None,
    the line that says why it failed: 'timed out', its 'error: ...' line, its last exception line or its last line)."""
    t0, first, errors = time.time(), [], []
    p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def read_stdout():
        for line in p.stdout:
            if not first and ": loss " in line:
                first.append(time.time() - t0)
    # both pipes in threads: a torchrun worker (a session of its own) may keep them open after torchrun has gone
    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=lambda: errors.extend(p.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        p.wait(timeout)
        why = None
    except subprocess.TimeoutExpired:
        why = f"timed out after {timeout} s"
        p.terminate()  # torchrun passes SIGTERM on to its workers; SIGKILL would leave them running
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for reader in readers:
        reader.join(5)
    lines = [e.strip() for e in errors if e.strip()]
    why = why or next((e for e in reversed(lines) if e.startswith("error:")), None) or \
        next((e for e in reversed(lines) if "Error" in e.split(":")[0]), None) or (lines[-1] if lines else "")
    return p.returncode, first[0] if first else None, why


def gpu(runs="", max_iters=40, timeout=240, with_sampling=True):
    """The GPU table: the runs of GPU_RUNS (all, or those named in runs, comma-separated) as train.py on the sample
    bins for max_iters steps each, one at a time in the order given, each from a cold start (an inductor and Triton
    cache of its own: it compiles, ~25-50 s on an H200 machine) and killed after timeout seconds.
    Per run: the median over the log lines after the first (which holds compilation) of tokens/s, MFU and the share of
    the step spent waiting for data, the peak memory, the seconds to the first log line (start-up, compilation and 10
    steps), and the last training loss (the sample bins are small: it shows the run learns, not how well). Then
    (with_sampling) sampling on the GPU."""
    import json

    import numpy as np
    import torch

    by_name = {r[0]: r for r in GPU_RUNS}
    unknown = set(runs.split(",")) - set(by_name) if runs else set()
    if unknown:
        sys.exit(f"gpu: no run named {', '.join(sorted(unknown))}; the runs are {', '.join(by_name)}")
    chosen = [by_name[name] for name in runs.split(",")] if runs else GPU_RUNS
    print(f"gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    print("| run | ms/step | tokens/s | MFU | data wait | peak memory | first log line | last loss |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as root:
        for run in chosen:
            name, out_dir = run[0], os.path.join(root, run[0])
            caches = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(out_dir, "inductor"), "TRITON_CACHE_DIR": os.path.join(out_dir, "triton")}
            code, first, why = run_timed(gpu_command(*run, out_dir, max_iters), timeout, env={**os.environ, **caches})
            log_path = os.path.join(out_dir, "log.jsonl")
            steps = [r for r in map(json.loads, open(log_path)) if "tokens_per_s" in r][1:] if os.path.exists(log_path) else []
            if code or not steps or first is None:
                print(f"| {name} | failed: {why or 'fewer than two log lines: give more max_iters'} | | | | | | |", flush=True)
                continue
            ms, rate, mfu, wait = (np.median([r[k] or 0 for r in steps]) for k in ("ms_per_step", "tokens_per_s", "mfu", "data_wait"))
            print(f"| {name} | {ms:.1f} | {rate:,.0f} | {100 * mfu:.1f}% | {100 * wait:.2f}% | {steps[-1]['peak_memory_gb']:.2f} GB "
                  f"| {first:.1f} s | {steps[-1]['loss']:.3f} |", flush=True)
    if with_sampling:
        sampling(device="cuda")


if __name__ == "__main__":
    import ast
    import inspect

    benchmarks = {"generate": generate, "train_step": train_step, "data_wait": data_wait, "kv_cache": kv_cache,
                  "optimizers": optimizers, "mlp_width": mlp_width, "openers": openers, "sampling": sampling, "profile": profile,
                  "gpu": gpu}
    usage = f"usage: python bench.py {{{'|'.join(benchmarks)}}} [argument=value ...]"
    if len(sys.argv) < 2:
        sys.exit(usage)
    if sys.argv[1] not in benchmarks:
        sys.exit(f"bench.py: no benchmark {sys.argv[1]!r}; {usage}")
    if not all("=" in a for a in sys.argv[2:]):
        sys.exit(f"bench.py {sys.argv[1]}: {next(a for a in sys.argv[2:] if '=' not in a)!r} is not argument=value; {usage}")

    def value(text):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text  # a word: a string
    sys.stdout.reconfigure(line_buffering=True)  # each line out as it is printed, also into a pipe (| tee) cut off by a time limit
    fn, kwargs = benchmarks[sys.argv[1]], {k: value(v) for k, v in (a.split("=", 1) for a in sys.argv[2:])}
    params = inspect.signature(fn).parameters
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        sys.exit(f"bench.py {sys.argv[1]}: {e}; its arguments are {', '.join(params) or 'none'}")
    for k, v in kwargs.items():  # of its default's type (a whole number where a float goes is fine)
        default = params[k].default
        if type(default) in (bool, int, float, str) and not (
                type(v) is type(default) or (type(default) is float and type(v) is int)):
            sys.exit(f"bench.py {sys.argv[1]}: {k}={v!r} must be of type {type(default).__name__}, like its default {default!r}")
    try:
        fn(**kwargs)
    except (ValueError, OSError) as e:  # a file missing or unreadable, a tokenizer not trained yet, ...
        sys.exit(f"bench.py {sys.argv[1]}: {e}")
