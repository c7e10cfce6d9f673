"""
Benchmarks: one function per benchmark, named on the command line. Numbers go in BENCHMARKS.md.

Usage:
  python bench.py generate     # generate_stories.py against a local server: requests/s against the ideal, memory
  python bench.py train_step   # a CPU training step of the 1.25M and 5M models against transformers' Llama
  python bench.py data_wait    # the share of a training step spent waiting for batches from the bins
  python bench.py kv_cache     # sampling 256 tokens with the KV cache against recomputing the sequence
  python bench.py sampling     # generate() against transformers' generate, batch 1 and 32, 400 new tokens
"""

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time


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

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", f"{name}.py")
    settings = {key: value for key, value, _ in read_config(path)}
    return GPTConfig(**{k: settings[k] for k in ("n_layers", "d_model", "n_heads") if k in settings})


def train_step(compile=None):
    """One AdamW training step (forward, backward, update) in float32 on CPU, batch 8 x 512, of our GPT and of
    transformers' LlamaForCausalLM (SDPA attention) of the same shape, timed in turns in one process so that drift
    hits both; the best of three rounds of medians. Three ways: ours as train.py runs it (compiled) against
    transformers as its users run it (eager), and both eager, and both compiled; compile=True or False: only
    both compiled or both eager."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model import GPT

    pairs = {None: [(True, False), (False, False), (True, True)], True: [(True, True)], False: [(False, False)]}[compile]
    for name in ("1.25m", "5m"):
        c = suite_config(name)
        torch.manual_seed(0)
        ours = GPT(c)
        llama = LlamaForCausalLM(LlamaConfig(
            vocab_size=c.d_vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.n_ctx,
            rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=True, attn_implementation="sdpa"))
        x, y = torch.randint(0, c.d_vocab, (8, 512)), torch.randint(0, c.d_vocab, (8, 512))

        def step_of(model, loss_of, compiled):
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            forward = torch.compile(model) if compiled else model

            def step():
                loss_of(forward).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step

        steps = {}
        for ours_compiled, llama_compiled in pairs:
            steps.setdefault(("ours", ours_compiled), step_of(ours, lambda m: m(x, y)[1], ours_compiled))
            steps.setdefault(("llama", llama_compiled), step_of(llama, lambda m: m(input_ids=x, labels=y).loss, llama_compiled))
        times = {k: [] for k in steps}
        for _ in range(3):
            for k, step in steps.items():
                times[k].append(median_seconds(step, 3))
        best = {k: min(v) for k, v in times.items()}
        for ours_compiled, llama_compiled in pairs:
            a, b = best["ours", ours_compiled], best["llama", llama_compiled]
            print(f"train_step {name}: ours {'compiled' if ours_compiled else 'eager'} {a * 1000:.0f} ms, transformers Llama "
                  f"{'compiled' if llama_compiled else 'eager'} {b * 1000:.0f} ms, ours is {b / a:.2f}x as fast")


def data_wait(max_iters=60):
    """train.py on the sample bins (the 5M shape at context 512, a step of 8,192 tokens, eager, on CPU): the share
    of the step time the loop waits for the next batch, as log.jsonl records it. A step on synthetic tokens
    already on the device would wait for nothing: this share is what real bins cost over them."""
    import json

    import numpy as np

    with tempfile.TemporaryDirectory() as out_dir:
        result = subprocess.run([sys.executable, "train.py", "configs/5m.py", "--dataset=sample", f"--out_dir={out_dir}",
                                 f"--max_iters={max_iters}", "--tokens_per_step=8192", "--batch_size=8", f"--eval_interval={max_iters}",
                                 "--eval_seqs=8", "--log_interval=5", "--sample_tokens=0", "--compile=False", "--device=cpu"],
                                capture_output=True, text=True)
        if result.returncode:
            sys.exit(result.stderr)
        records = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [r for r in records if "data_wait" in r][1:]  # the first interval warms up
    share = np.array([r["data_wait"] for r in steps])
    ms = np.array([r["ms_per_step"] for r in steps])
    print(f"data_wait: {len(steps) * 5} steps of 8,192 tokens, {np.median(ms):.0f} ms a step (median); waiting for batches "
          f"{100 * np.median(share):.2f}% of it (median), {100 * share.max():.2f}% at most")


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


def llama_twin(model):
    """transformers' LlamaForCausalLM with model's weights (export.py's mapping), SDPA attention, in eval mode."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from export import llama_state_dict

    c = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.d_vocab, hidden_size=c.d_model, intermediate_size=c.d_mlp, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.n_ctx, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=True,
        attn_implementation="sdpa"))
    result = llama.load_state_dict(llama_state_dict(model.state_dict()), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}, result
    llama.generation_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0)
    return llama.to(next(model.parameters()).device).eval()


def sampling(n_tokens=400, batch_sizes=(1, 32), rounds=3, device="cpu"):
    """Greedy generation of n_tokens after an 8-token prompt with the 5M model (random weights, no EOS, so
    that every run makes all n_tokens), batch 1 and batch 32: our generate(), eager and compiled, against
    transformers' generate() on the same weights (its default dynamic cache, SDPA), timed in turns in one
    process; the best of `rounds` runs each, after one warm-up run (for compile=True, the compilation: its
    time is printed). Also the share of generated tokens on which ours and transformers agree (greedy
    decoding diverges for good at the first near-tie that float noise flips)."""
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


if __name__ == "__main__":
    benchmarks = {"generate": generate, "train_step": train_step, "data_wait": data_wait, "kv_cache": kv_cache,
                  "sampling": sampling}
    if len(sys.argv) != 2 or sys.argv[1] not in benchmarks:
        sys.exit(f"usage: python bench.py {{{'|'.join(benchmarks)}}}")
    benchmarks[sys.argv[1]]()
