"""
Tests of generate_stories.py, the dataset generator (with stories.py, api_client.py and batch_api.py):
its sampler, prompts and cleaning, and whole runs
through the real openai client against tests/openai_server.py, a local OpenAI-compatible server that
injects faults on demand. They read as the contract of stories.jsonl: exactly the stories asked for,
unique ids, labels equal to the prompt's, nothing lost or doubled by a crash, the API key nowhere.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import api_client  # noqa: E402
import batch_api  # noqa: E402
import generate_stories as gs  # noqa: E402
import stories  # noqa: E402
from openai_server import FAULTS, SHAPE_FAULTS, OpenAIServer  # noqa: E402

KEY = "sk-test-7f3a9c2e51"  # distinctive, to look for it in every file and log
AXES_PATH = os.path.join(ROOT, "axes.json")
AXES, NAMES = stories.load_axes(AXES_PATH)


def args_for(*argv):
    return gs.parse_args(list(argv))


def generate(monkeypatch, server, out, *argv):
    """Run generate_stories.py in this process against the server."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    gs.main([f"--base_url={server.url}", f"--out={out}", "--backoff=0.01", *argv])


def start(url, out, *argv, key=KEY):
    """Start generate_stories.py as a process against the server at url."""
    env = {**os.environ, "OPENAI_API_KEY": key}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "generate_stories.py"), f"--base_url={url}",
                             f"--out={out}", "--backoff=0.01", *argv],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_stories(path, n, stories_per_prompt=4, seed=0):
    """The output holds exactly n stories, unique ids, each labelled with its prompt's labels."""
    records = read(path)
    assert len(records) == n
    assert len({r["id"] for r in records}) == n
    ks = [r["prompt_id"] for r in records]
    args = args_for(f"--seed={seed}", f"--stories_per_prompt={stories_per_prompt}")
    for r, (k, labels, prompt) in zip(records, stories.prompts_for(AXES, NAMES, args, ks)):
        assert {key: r[key] for key in labels} == labels and r["prompt"] == prompt
        assert r["story"].isascii() and r["story"] == r["story"].strip()
        assert abs(r["story"].count("\n\n") + 1 - r["num_paragraphs"]) <= 1
        assert r["id"] == stories.story_id(r["story"])
        assert r["model"].startswith("gpt-4o-mini") and r["finish_reason"] in ("stop", "length")
        assert r["story_index"] < stories_per_prompt and r["completion_tokens"] > 0
    assert max(Counter(ks).values()) <= stories_per_prompt
    return records


@pytest.fixture
def server():
    with OpenAIServer(latency=0.002, api_key=KEY, batch_delay=0.05) as s:
        yield s

# -----------------------------------------------------------------------------
# sampler and prompts


def test_prompt_k_depends_only_on_seed_and_k():
    all_at_once = stories.sample_prompts(AXES, NAMES, 7, np.arange(1000))
    for k in (0, 3, 999):
        alone = stories.sample_prompts(AXES, NAMES, 7, [k])
        assert stories.prompt_at(AXES, NAMES, alone, 0) == stories.prompt_at(AXES, NAMES, all_at_once, k)
    other_seed = stories.sample_prompts(AXES, NAMES, 8, np.arange(1000))
    assert (other_seed["theme"] != all_at_once["theme"]).mean() > 0.9


def test_shards_split_the_prompts_without_overlap():
    seen = []
    for i in range(3):
        it = stories.iter_prompts(AXES, NAMES, args_for(f"--shard={i}/3"))
        seen += [k for k, _, _ in (next(it) for _ in range(100))]
    assert sorted(seen) == list(range(300))
    single = stories.iter_prompts(AXES, NAMES, args_for())
    shard = stories.iter_prompts(AXES, NAMES, args_for("--shard=1/3"))
    by_k = {k: prompt for k, _, prompt in (next(single) for _ in range(30))}
    assert all(by_k[k] == prompt for k, _, prompt in (next(shard) for _ in range(10)))


def test_axes_follow_their_weights_and_optional_probabilities():
    idx = stories.sample_prompts(AXES, NAMES, 0, np.arange(200_000))
    grammar, _ = AXES["grammar"]
    assert grammar[0] == "" and abs((idx["grammar"] == 0).mean() - 0.5) < 0.01
    assert abs((idx["persona"] == 0).mean() - 0.5) < 0.01
    letters, _ = AXES["initial_letter"]
    counts = np.bincount(idx["initial_letter"], minlength=len(letters))
    assert letters[counts.argmax()] == "T" and counts[letters.index("E")] < counts[letters.index("A")]
    paragraphs = np.bincount(idx["num_paragraphs"]) / len(idx["num_paragraphs"])
    assert len(paragraphs) == 9 and np.abs(paragraphs - 1 / 9).max() < 0.005


def test_axes_file_has_enough_distinct_values_on_every_axis():
    with open(os.path.join(ROOT, "axes.json")) as f:
        raw = json.load(f)
    minimum = {"themes": 60, "topics": 45, "styles": 20, "features": 25, "grammar": 30, "personas": 20}
    for key, n in minimum.items():
        assert len(set(raw[key])) == len(raw[key]) >= n, key
    assert AXES["num_paragraphs"][0] == list(range(1, 10)) and len(NAMES) >= 20


def test_independence_check_passes_and_catches_coupled_axes():
    idx = stories.sample_prompts(AXES, NAMES, 0, np.arange(100_000))
    n_persona, n_paragraphs = len(AXES["persona"][0]), 9
    table = np.bincount(idx["persona"] * n_paragraphs + idx["num_paragraphs"], minlength=n_persona * n_paragraphs)
    assert stories.chi_square(table.reshape(n_persona, n_paragraphs))[2] > 0.001
    # the published dataset's flaw: personas only where the paragraph count is 1, 4 or 7
    coupled = np.where(np.isin(idx["num_paragraphs"], [0, 3, 6]), idx["persona"], 0)
    table = np.bincount(coupled * n_paragraphs + idx["num_paragraphs"], minlength=n_persona * n_paragraphs)
    assert stories.chi_square(table.reshape(n_persona, n_paragraphs))[2] < 1e-9


def test_dry_run_prints_prompts_counts_independence_and_cost(capsys):
    gs.main(["--dry_run", "--n_stories=40000", "--n_examples=2"])
    out = capsys.readouterr().out
    assert out.count("--- prompt ") == 2 and "Write 4 short stories" in out
    assert "theme (64 values): Friendship" in out and "persona present, by num_paragraphs: 1:" in out
    assert "persona x num_paragraphs" in out and "independence check: passed" in out
    assert "tokens:" in out and "cost: $" in out


def test_dry_run_says_what_the_output_holds_and_which_arguments_it_refuses(monkeypatch, tmp_path, server, capsys):
    out = tmp_path / "stories.jsonl"
    generate(monkeypatch, server, out, "--n_stories=8")
    count = len(read(out))
    capsys.readouterr()
    gs.main(["--dry_run", "--n_stories=40", "--n_examples=0", f"--out={out}"])
    assert f"note: {out} holds {count} stories: a run goes on from there, for the {40 - count} still to make" in \
        capsys.readouterr().out
    gs.main(["--dry_run", "--n_stories=40", "--n_examples=0", f"--out={out}", "--temperature=0.5"])
    assert f"note: {out} was made with --temperature=1.0, not 0.5: a run with these arguments is refused" in \
        capsys.readouterr().out
    gs.main(["--dry_run", "--n_stories=40", "--n_examples=0", f"--out={tmp_path / 'new.jsonl'}"])
    assert "note:" not in capsys.readouterr().out


def test_dry_run_cost_prices_each_token_count_at_its_own_price(capsys):
    gs.main(["--dry_run", "--n_stories=40000", "--n_examples=1", "--price_in=1", "--price_out=100"])
    out = capsys.readouterr().out
    tokens_in, tokens_out = (float(n.replace(",", "")) for n in re.search(r"tokens: ([\d,]+) in .*, ([\d,]+) out", out).groups())
    cost = float(re.search(r"cost: \$([\d,.]+) for", out).group(1).replace(",", ""))
    assert cost == pytest.approx(tokens_in * 1 / 1e6 + tokens_out * 100 / 1e6, abs=0.01)
    assert abs(tokens_in - tokens_out) * 99 / 1e6 > 1  # the prices swapped would cost more than a dollar more or less


def test_one_story_prompt_is_worded_for_one_story():
    labels, names = stories.prompt_at(AXES, NAMES, stories.sample_prompts(AXES, NAMES, 0, [5]), 0)
    one = stories.prompt_text(labels, names, 1)
    several = stories.prompt_text(labels, names, 3)
    assert one.startswith("Write a short story") and "stories" not in one and stories.SEPARATOR not in one
    assert several.startswith("Write 3 short stories") and f'line with only "{stories.SEPARATOR}"' in several
    for text in (one, several):
        assert labels["theme"] in text and labels["topic"] in text and labels["feature"] in text
        assert f'letter "{labels["initial_letter"]}"' in text
        assert f"exactly {labels['num_paragraphs']} paragraphs, separated by a blank line." in text
    assert "- Write exactly one paragraph.\n" in stories.prompt_text({**labels, "num_paragraphs": 1}, names, 1)


def forked_axes(tmp_path, **changes):
    """The path of a copy of axes.json with some keys changed, as a fork would have it."""
    with open(os.path.join(ROOT, "axes.json")) as f:
        raw = json.load(f)
    path = tmp_path / "axes.json"
    path.write_text(json.dumps({**raw, **changes}))
    return str(path)


def test_paragraph_counts_may_be_weighted_and_must_be_whole_numbers(tmp_path, capsys):
    axes = forked_axes(tmp_path, num_paragraphs={"1": 1, "2": 2, "3": 1})  # a dict's keys are strings
    gs.main(["--dry_run", "--n_stories=400", "--n_examples=1", f"--axes={axes}"])
    assert "num_paragraphs (3 values): 1 " in capsys.readouterr().out
    fork_axes, fork_names = stories.load_axes(axes)
    labels, _ = stories.prompt_at(fork_axes, fork_names, stories.sample_prompts(fork_axes, fork_names, 0, [0]), 0)
    assert labels["num_paragraphs"] in (1, 2, 3) and type(labels["num_paragraphs"]) is int
    for bad in ({"0": 1, "2": 1}, ["two", 3], [1.5]):
        with pytest.raises(SystemExit, match=r"^error: 'num_paragraphs' in .* whole numbers >= 1") as e:
            stories.load_axes(forked_axes(tmp_path, num_paragraphs=bad))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("changes, message", [
    (None, r"holds a JSON list, not an object of axes at the top level"),
    ({"optional": "grammar"}, r"'optional' in .* must be an object of label: probability"),
    ({"optional": {"grammar": "half"}}, r"optional 'grammar' in .* must be a probability in \(0, 1\], got 'half'"),
    ({"optional": {"persona": None}}, r"optional 'persona' in .* must be a probability in \(0, 1\], got None"),
    ({"themes": ["Friendship", 3]}, r"'themes' in .* must be non-empty strings, got 3"),
    ({"initial_word_types": {"noun": 1, "": 1}}, r"'initial_word_types' in .* must be non-empty strings, got ''"),
    ({"names": ["Mia", ["Leo"]]}, r"has no list 'names' of character names \(non-empty strings\)"),
    ({"settings": ["a castle"]}, r"has keys that are not axes: 'settings' \(the axes are themes, topics"),
    ({"optional": {"personas": 0.5}}, r"'optional' in .* names 'personas': only grammar and persona may be left out"),
    ({"optional": {"theme": 0.5}}, r"'optional' in .* names 'theme': only grammar and persona may be left out"),
])
def test_bad_axes_file_ends_in_one_clear_line_naming_the_file_and_key(tmp_path, changes, message):
    if changes is None:  # a list at the top level
        path = tmp_path / "axes.json"
        path.write_text(json.dumps([{"themes": ["Friendship"]}]))
    else:
        path = forked_axes(tmp_path, **changes)
    with pytest.raises(SystemExit, match=rf"^error: .*{message}") as e:
        stories.load_axes(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)

# -----------------------------------------------------------------------------
# cleaning


PARAGRAPH = "The cat ran to the big red tree. It sat in the sun and smiled at the birds. Then it went home to sleep."


def completion(text, finish_reason="stop"):
    return {"id": "chatcmpl-1", "model": "m",
            "choices": [{"message": {"content": text}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20}}


def test_clean_story_fixes_typography_titles_and_drops_what_cannot_be_fixed():
    args = args_for()
    text = f"**The Red Tree**\n\n\u201cHi,\u201d said Zo\u00eb \u2014 it\u2019s me\u2026 {PARAGRAPH}"
    story, rule, fixes = stories.clean_story(text, 1, args)
    assert rule is None and story == f'"Hi," said Zoe - it\'s me... {PARAGRAPH}'
    assert set(fixes) == {"title", "typography", "transliterated"}
    story, _, fixes = stories.clean_story(f"Story 2: {PARAGRAPH}\n\n{PARAGRAPH}", 2, args)
    assert story == f"{PARAGRAPH}\n\n{PARAGRAPH}" and fixes == ["numbering"]
    story, _, _ = stories.clean_story(f"{PARAGRAPH}\n{PARAGRAPH}\n{PARAGRAPH}", 3, args)  # single line breaks
    assert story.count("\n\n") == 2
    assert stories.clean_story(f"{PARAGRAPH} \U0001F431", 1, args)[1] == "non_ascii"
    assert stories.clean_story("The cat sat.", 1, args)[1] == "too_short"
    assert stories.clean_story(" ".join([PARAGRAPH] * 60), 1, args)[1] == "too_long"
    assert stories.clean_story("\n\n".join([PARAGRAPH] * 6), 2, args)[1] == "wrong_paragraphs"


def test_paragraph_count_may_be_one_off_not_two():
    args = args_for()
    for n in (1, 2, 3, 4, 5):  # paragraphs long enough that even one is not too short
        story, rule, _ = stories.clean_story("\n\n".join([f"{PARAGRAPH} {PARAGRAPH}"] * n), 3, args)
        if abs(n - 3) <= 1:
            assert rule is None and story.count("\n\n") == n - 1
        else:
            assert story is None and rule == "wrong_paragraphs"


def test_make_records_drops_unfinished_runtogether_and_duplicate_stories(tmp_path):
    args = args_for("--stories_per_prompt=3")
    labels, names = stories.prompt_at(AXES, NAMES, stories.sample_prompts(AXES, NAMES, 0, [0]), 0)
    labels["num_paragraphs"] = 1
    out = gs.Output(tmp_path / "stories.jsonl", args, AXES, NAMES)
    texts = [f"{PARAGRAPH} {PARAGRAPH} Story {i}." for i in range(3)]

    def records(text, finish_reason="stop"):
        removed, fixed = Counter(), Counter()
        return stories.make_records(0, labels, "p", completion(text, finish_reason), args, out, removed, fixed), removed

    got, removed = records("\n###\n".join(texts))
    assert [r["story"] for r in got] == texts and not removed and got[0]["theme"] == labels["theme"]
    got, removed = records("\n###\n".join(texts)[:-40], "length")  # cut at max_tokens
    assert [r["story"] for r in got] == texts[:2] and removed == {"truncated": 1}
    got, removed = records("\n###\n".join(texts)[:-40], "content_filter")  # cut by a moderation filter
    assert [r["story"] for r in got] == texts[:2] and removed == {"content_filter": 1}
    got, removed = records("\n\n".join(texts))  # the separator forgotten
    assert got == [] and removed == {"separator_failed": 1}
    got, removed = records(f"{texts[0]}\n###\n{texts[0].upper()}\n###\n{texts[1]}")
    assert [r["story"] for r in got] == [texts[0], texts[1]] and removed == {"duplicate": 1}
    assert [r["story_index"] for r in got] == [0, 2]
    out.write(got)  # a story written before is a duplicate in any later completion
    got, removed = records(f"{texts[2]}\n###\n{texts[1]}")
    assert [r["story"] for r in got] == [texts[2]] and removed == {"duplicate": 1}


def test_usage_left_out_or_null_counts_as_zero_tokens(tmp_path):
    args = args_for("--stories_per_prompt=1", "--n_stories=10")
    labels, _ = stories.prompt_at(AXES, NAMES, stories.sample_prompts(AXES, NAMES, 0, [0]), 0)
    labels["num_paragraphs"] = 1
    progress = gs.Progress(args, gs.Output(tmp_path / "stories.jsonl", args, AXES, NAMES))
    for i, usage in enumerate(({"prompt_tokens": None, "completion_tokens": None}, None)):
        progress.add(i, labels, "p", {**completion(f"{PARAGRAPH} {PARAGRAPH} Story {i}."), "usage": usage})
    progress.bar.close()
    assert progress.stats["completions"] == 2 and progress.stats["prompt_tokens"] == 0
    assert [r["prompt_tokens"] for r in read(tmp_path / "stories.jsonl")] == [0, 0]

# -----------------------------------------------------------------------------
# live runs against the local server


def test_faulty_server_gives_exactly_the_stories_asked_for(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(latency=0.005, fault_rate=0.2, stall=1.0, api_key=KEY) as server:
        for kind in FAULTS:  # each kind at least once, whatever the random draws
            server.inject(kind)
        generate(monkeypatch, server, out, "--n_stories=500", "--stories_per_prompt=3", "--concurrency=32",
                 "--timeout=0.3")
        assert all(server.stats[kind] >= 1 for kind in FAULTS)
        assert sum(server.stats[kind] for kind in FAULTS) >= 0.15 * server.stats["chat"]
    check_stories(out, 500, stories_per_prompt=3)
    summary = capsys.readouterr().out
    for reason in ("retry 429", "retry 500", "retry timeout", "retry connection", "retry bad_answer",
                   "truncated", "separator_failed"):
        assert reason in summary
    assert "gave up" not in summary


def test_live_run_cost_prices_each_token_count_at_its_own_price(monkeypatch, tmp_path, server, capsys):
    out = tmp_path / "stories.jsonl"
    generate(monkeypatch, server, out, "--n_stories=8", "--price_in=1", "--price_out=100")
    by_prompt = {r["prompt_id"]: r for r in read(out)}
    assert server.stats["chat"] == len(by_prompt) == 2  # no answer dropped whole: each one's usage is in a record
    tokens_in = sum(len(r["prompt"]) // 4 for r in by_prompt.values())  # the server's usage: 4 characters a token
    tokens_out = sum(r["completion_tokens"] for r in by_prompt.values())
    assert tokens_in == sum(r["prompt_tokens"] for r in by_prompt.values())
    summary = capsys.readouterr().out
    assert f"tokens: {tokens_in:,} in, {tokens_out:,} out, $" in summary
    cost = float(re.search(r"tokens: .* out, \$([\d,.]+)", summary).group(1).replace(",", ""))
    assert cost == pytest.approx(tokens_in * 1 / 1e6 + tokens_out * 100 / 1e6, abs=0.006)
    assert abs(tokens_in - tokens_out) * 99 / 1e6 > 0.02  # the prices swapped would cost more than 2 cents more or less


def test_killed_run_restarted_ends_like_an_uninterrupted_one(monkeypatch, tmp_path):
    with OpenAIServer(latency=0.04, api_key=KEY) as server:
        whole = tmp_path / "whole.jsonl"
        generate(monkeypatch, server, whole, "--n_stories=240", "--concurrency=4")
        assert server.stats["chat"] == 60
        out = tmp_path / "stories.jsonl"
        proc = start(server.url, out, "--n_stories=240", "--concurrency=4")
        deadline = time.time() + 30
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 40):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n_before = out.read_text().count("\n")
        assert 40 <= n_before < 240
        with open(out, "a") as f:  # as if the machine died in the middle of a write
            f.write('{"id": "0123456789abcdef", "story": "Once upon a ti')
        restarted = start(server.url, out, "--n_stories=240", "--concurrency=4")
        stdout, stderr = restarted.communicate(timeout=60)
        assert restarted.returncode == 0, stderr
        assert "torn last line" in stderr
        assert server.stats["chat"] - 60 <= 60 + 4  # only the requests in flight at the kill are paid twice
    records = check_stories(out, 240)
    assert {r["prompt_id"] for r in records} == {r["prompt_id"] for r in read(whole)} == set(range(60))


def test_finished_run_is_not_repeated_and_other_arguments_are_refused(monkeypatch, tmp_path, server, capsys):
    out = tmp_path / "stories.jsonl"
    generate(monkeypatch, server, out, "--n_stories=20")
    requests = server.stats["chat"]
    generate(monkeypatch, server, out, "--n_stories=20")
    assert server.stats["chat"] == requests and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--seed"):
        generate(monkeypatch, server, out, "--n_stories=40", "--seed=1")
    with pytest.raises(SystemExit, match="shard"):
        generate(monkeypatch, server, out, "--n_stories=40", "--shard=1/2")
    generate(monkeypatch, server, out, "--n_stories=40")
    check_stories(out, 40)


def test_resume_with_other_arguments_is_refused_naming_what_differs(monkeypatch, tmp_path, server):
    out = tmp_path / "stories.jsonl"
    generate(monkeypatch, server, out, "--n_stories=8")
    assert json.loads(open(f"{out}.run.json").read()) == gs.fingerprint(args_for())
    other_axes = forked_axes(tmp_path, names=NAMES[:5])
    sha256 = [gs.fingerprint(args_for(f"--axes={axes}"))["axes_sha256"][:12] for axes in (AXES_PATH, other_axes)]
    for other, made_with in (("--model=gpt-4o", "--model=gpt-4o-mini, not gpt-4o"),
                             ("--temperature=0.7", "--temperature=1.0, not 0.7"),
                             ("--top_p=0.9", "--top_p=1.0, not 0.9"),
                             ("--stories_per_prompt=2", "--stories_per_prompt=4, not 2"),
                             ("--max_tokens=2000", "--max_tokens=4096, not 2000"),
                             ("--seed=3", "--seed=0, not 3"),
                             (f"--axes={other_axes}", f"another --axes file (sha256 {sha256[0]}, not {sha256[1]})")):
        for mode in ([], ["--batch"]):
            with pytest.raises(SystemExit, match=f"^error: {re.escape(str(out))} was made with {re.escape(made_with)}:"
                                                 f" use the same arguments, or another --out$"):
                generate(monkeypatch, server, out, "--n_stories=16", other, *mode)
    assert server.stats["chat"] == 2 and len(read(out)) == 8
    assert not os.path.exists(f"{out}.dropped.jsonl")  # a refused run leaves no empty file behind
    # a run file deleted: the first record is the check, and it is written again
    os.remove(f"{out}.run.json")
    with pytest.raises(SystemExit, match="was made with another --seed, --axes or --stories_per_prompt"):
        generate(monkeypatch, server, out, "--n_stories=16", "--seed=3")
    generate(monkeypatch, server, out, "--n_stories=16")
    assert json.loads(open(f"{out}.run.json").read()) == gs.fingerprint(args_for())
    check_stories(out, 16)


def test_prompt_whose_stories_were_all_dropped_is_not_asked_again(monkeypatch, tmp_path, server):
    out = tmp_path / "stories.jsonl"
    server.inject("merged")  # prompt 0's stories run together: all dropped
    generate(monkeypatch, server, out, "--n_stories=4", "--concurrency=1")
    [dropped] = read(f"{out}.dropped.jsonl")
    assert dropped["prompt_id"] == 0 and dropped["removed"] == {"separator_failed": 1}
    assert dropped["finish_reason"] == "stop" and dropped["completion_id"].startswith("chatcmpl-")
    assert dropped["prompt_tokens"] > 0 and dropped["completion_tokens"] > 0
    with open(f"{out}.dropped.jsonl", "a") as f:  # as if the machine died in the middle of a write
        f.write('{"prompt_id": 7, "complet')
    generate(monkeypatch, server, out, "--n_stories=8", "--concurrency=1")
    assert server.stats["chat"] == 3 and [r["prompt_id"] for r in read(f"{out}.dropped.jsonl")] == [0]
    assert {r["prompt_id"] for r in check_stories(out, 8)} == {1, 2}
    generate(monkeypatch, server, out, "--batch", "--n_stories=12", "--poll_interval=0.02")  # Batch mode too
    submitted = [json.loads(line)["custom_id"] for f in server.files.values() if f["purpose"] == "batch"
                 for line in f["content"].splitlines()]
    assert submitted == ["prompt-3"] and {r["prompt_id"] for r in check_stories(out, 12)} == {1, 2, 3}


def test_shards_together_make_the_whole_job(monkeypatch, tmp_path, server):
    records = []
    for i in range(3):
        generate(monkeypatch, server, tmp_path / f"stories.{i}.jsonl", "--n_stories=100", f"--shard={i}/3")
        records += read(tmp_path / f"stories.{i}.jsonl")
        assert all(r["prompt_id"] % 3 == i for r in read(tmp_path / f"stories.{i}.jsonl"))
    assert len(records) == 100 and len({r["id"] for r in records}) == 100


@pytest.mark.parametrize("retry_after, retry_after_ms, max_backoff, wait", [
    (0.3, True, 60, 0.3),  # OpenAI's retry-after-ms
    (0.3, False, 60, 1.0),  # Retry-After alone, in whole seconds, as most other servers send it
    (100, True, 0.4, 0.4),  # a wait longer than MAX_BACKOFF is cut to it
])
def test_retry_after_is_honoured(monkeypatch, tmp_path, retry_after, retry_after_ms, max_backoff, wait):
    monkeypatch.setattr(api_client, "MAX_BACKOFF", max_backoff)
    with OpenAIServer(retry_after=retry_after, retry_after_ms=retry_after_ms, api_key=KEY) as server:
        server.inject("429")
        generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=4", "--backoff=0.001")
        times = [t for t, path, _ in server.log if path.endswith("/chat/completions")]
    assert len(times) == 2 and wait <= times[1] - times[0] < 1.2 * wait + 0.5  # and up to 20% more, as jitter


def test_a_retry_after_that_is_not_a_wait_is_left_for_the_backoff():
    assert api_client.retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert api_client.retry_after({"retry-after-ms": "nan", "retry-after": "2"}) == 2.0
    for bad in ("nan", "inf", "-1", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert api_client.retry_after({"retry-after": bad}) is None


def test_tokens_per_minute_limit_holds_for_requests_larger_than_a_seconds_worth(monkeypatch, tmp_path):
    axes = forked_axes(tmp_path, num_paragraphs=[1])  # requests of ~170 tokens, the limit 100 a second
    with OpenAIServer(api_key=KEY) as server:
        generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=2", "--stories_per_prompt=1",
                 "--tpm=6000", f"--axes={axes}", "--min_words=1")
        times = [t for t, path, _ in server.log if path.endswith("/chat/completions")]
    first = min(read(tmp_path / "stories.jsonl"), key=lambda r: int(r["completion_id"].split("-")[1]))
    # the second request waits until the first one's tokens are paid back at --tpm
    tokens_per_minute = (first["prompt_tokens"] + first["completion_tokens"]) / (times[1] - times[0]) * 60
    assert len(times) == 2 and 0.7 * 6000 < tokens_per_minute < 1.2 * 6000


def test_requests_per_minute_limit(monkeypatch, tmp_path, server):
    t0 = time.time()
    generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=600", "--rpm=6000")  # 100 a second
    # 150 requests: a second's worth at once, then 100 a second
    assert time.time() - t0 >= 0.45 and server.stats["chat"] == 150


def test_bad_key_ends_in_one_clear_line_and_writes_nothing(tmp_path, server):
    out = tmp_path / "stories.jsonl"
    proc = start(server.url, out, "--n_stories=20", "--concurrency=4", key="sk-wrong-key")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert len(stderr.strip().splitlines()) == 1 and "401" in stderr and "OPENAI_API_KEY" in stderr
    assert not out.exists() and [path for _, path, _ in server.log] == ["/v1/models"]  # met before any request


def test_not_found_is_not_retried(monkeypatch, tmp_path, server):
    with pytest.raises(SystemExit, match="404"):
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        gs.main([f"--base_url={server.url}/nope", f"--out={tmp_path / 'stories.jsonl'}", "--n_stories=20",
                 "--concurrency=1"])
    assert [(path, status) for _, path, status in server.log] == [("/v1/nope/models", 404),
                                                                  ("/v1/nope/chat/completions", 404)]


@pytest.mark.parametrize("fault, message", [("400", r"refused the request \(400\): Invalid value for 'temperature'"),
                                            ("403", r"refused the request \(403\): Project does not have access"),
                                            ("quota", r"no quota left \(429 insufficient_quota\)")])
def test_refusals_and_an_account_out_of_credit_end_the_run_in_one_clear_line(monkeypatch, tmp_path, server, fault,
                                                                             message):
    server.inject(fault)
    with pytest.raises(SystemExit, match=f"^error: the {'account has' if fault == 'quota' else 'API'} {message}") as e:
        generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=20", "--concurrency=1")
    assert "\n" not in str(e.value) and server.stats["chat"] == 1
    assert not (tmp_path / "stories.jsonl").exists()


def unused_url():
    """The URL of a port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_server_that_cannot_be_reached_ends_the_run_in_seconds(monkeypatch, tmp_path):
    url = unused_url()
    proc = start(url, tmp_path / "stories.jsonl", "--n_stories=8")  # fewer prompts than --concurrency
    stdout, stderr = proc.communicate(timeout=60)  # one GET, no backoff
    assert proc.returncode != 0 and "Traceback" not in stderr
    assert stderr.splitlines() == [f"error: cannot reach {url} (All connection attempts failed): check --base_url"
                                   f" and that the server is running"]
    assert os.listdir(tmp_path) == []
    with socket.socket() as s:  # a server that takes the connection and never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(api_client, "PREFLIGHT_TIMEOUT", 0.3)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        with pytest.raises(SystemExit, match=rf"^error: cannot reach {url} \(no answer in 0.3 s\): check --base_url"):
            gs.main([f"--base_url={url}", f"--out={tmp_path / 'stories.jsonl'}", "--batch"])


def test_run_that_gets_no_answers_stops_in_one_clear_line(monkeypatch, tmp_path):
    argv = ["--concurrency=4", "--max_retries=1"]
    with OpenAIServer(fault_rate=1.0, faults=["500"], api_key=KEY) as server:
        with pytest.raises(SystemExit, match="^error: 10 prompts in a row got no answer: 2 tries failed, the last with"
                                             " 500 The server had an error.*: check that http.* answers") as e:
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=200", *argv)
        assert "\n" not in str(e.value)
        assert 20 <= server.stats["chat"] < 30  # 10 prompts, and those in flight beside them
        chats = server.stats["chat"]
        # a run that needs fewer prompts than that stops when those it needs got no answer
        with pytest.raises(SystemExit, match="^error: 2 prompts in a row got no answer: 2 tries failed"):
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=8", *argv)
        assert server.stats["chat"] - chats <= 6  # the 2 prompts, and one begun beside them


def test_ctrl_c_stops_the_run_in_one_line_without_retrying(tmp_path):
    with OpenAIServer(latency=0.3, api_key=KEY) as server:
        out = tmp_path / "stories.jsonl"
        proc = start(server.url, out, "--n_stories=400", "--concurrency=4")
        deadline = time.time() + 30
        while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 16):
            time.sleep(0.01)
        time.sleep(0.1)  # requests in flight
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    n = out.read_text().count("\n")
    assert proc.returncode == 1 and "Traceback" not in stderr and "note:" not in stderr, stderr
    assert stderr.splitlines()[-1] == f"interrupted: {n} stories in {out}; run the same command to go on"


def test_a_run_that_waits_on_retries_says_for_what(monkeypatch, tmp_path, server, capsys):
    server.inject("500", 2)
    server.inject("429")
    generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=4")
    notes = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n") if "note:" in line]  # bar aside
    assert notes == ["note: retrying requests that failed with 500 The server had an error. (retry 1)",
                     "note: retrying requests that failed with 429 Rate limit reached. (retry 3)"]  # once per change


@pytest.mark.parametrize("argv, answer_fault, reason, hint", [
    ([], "merged", "separator_failed", "does not put a line with only ### between stories; try --stories_per_prompt=1"),
    (["--max_tokens=60"], None, "truncated", "cut at --max_tokens; raise it"),
    (["--min_words=1100"], None, "too_short", "shorter than --min_words; lower it"),
])
def test_answers_that_are_all_unusable_end_the_run_in_one_clear_line(monkeypatch, tmp_path, argv, answer_fault,
                                                                     reason, hint):
    with OpenAIServer(latency=0.002, answer_fault=answer_fault, api_key=KEY) as server:
        with pytest.raises(SystemExit, match=rf"^error: 20 answers in a row gave no usable story \({reason} \d+\):"
                                             rf" .*{re.escape(hint)}") as e:
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=400", *argv)
        assert "\n" not in str(e.value)
        assert server.stats["chat"] <= 20 + 32  # --max_unusable, and those in flight at --concurrency
    assert os.listdir(tmp_path) == []  # a run that wrote no story leaves nothing, so a rerun may change arguments


@pytest.mark.parametrize("shape", SHAPE_FAULTS)
def test_answers_of_the_wrong_shape_end_the_run_in_one_line(monkeypatch, tmp_path, shape):
    # JSON, but not a chat completion: paid for and no story, as the same server answers the same way again, so
    # counted by --max_unusable, live and in a batch, and not retried
    hint = r"the server's answers are not chat completions \(not a chat completion: .*\); check --base_url and --model"
    with OpenAIServer(answer_fault=shape, api_key=KEY, batch_delay=0.02) as server:
        with pytest.raises(SystemExit, match=rf"^error: 20 answers in a row gave no usable story \(not_a_completion 20\):"
                                             rf" {hint}$"):
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=400", "--concurrency=8")
        assert 20 <= server.stats["chat"] <= 20 + 8  # --max_unusable, and those in flight at --concurrency
        with pytest.raises(SystemExit, match=rf"^error: 10 answers in a row gave no usable story \(not_a_completion 10\):"
                                             rf" {hint}$"):
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--batch", "--n_stories=40", "--max_unusable=3",
                     "--poll_interval=0.02")
        assert server.stats["batches"] == 1
    assert os.listdir(tmp_path) == []


def test_run_whose_yield_is_too_low_ends(monkeypatch, tmp_path):
    with OpenAIServer(answer_fault="merged", api_key=KEY) as server:
        with pytest.raises(SystemExit, match=r"^error: 0 usable stories in 100 answers that asked for 400, under"
                                             r" --min_yield=0.1 \(separator_failed 100\): the model does not") as e:
            generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=4000", "--max_unusable=1000")
        assert "\n" not in str(e.value) and server.stats["chat"] <= 100 + 32


def test_batch_run_whose_answers_are_all_unusable_sends_one_small_batch(monkeypatch, tmp_path):
    argv = ["--batch", "--n_stories=400", "--poll_interval=0.02"]
    with OpenAIServer(answer_fault="merged", api_key=KEY, batch_delay=0.05) as server:
        with pytest.raises(SystemExit, match=r"^error: 32 answers in a row gave no usable story \(separator_failed"
                                             r" 32\): the model does not put a line with only ###") as e:
            generate(monkeypatch, server, tmp_path / "stories.jsonl", *argv)
        assert "\n" not in str(e.value)
        assert [len(f["content"].splitlines()) for f in server.files.values() if f["purpose"] == "batch"] == [32]
    assert os.listdir(tmp_path) == []
    # requests that a batch answers with an error count too; those it never ran (half of them here) do not
    with OpenAIServer(api_key=KEY, batch_delay=0.05, batch_fault_rate=1.0) as server:
        with pytest.raises(SystemExit, match=r"^error: 32 answers in a row gave no usable story \(request_failed 32\):"
                                             r" the batch answers its requests with an error \(500 server error\)"):
            generate(monkeypatch, server, tmp_path / "stories.jsonl", *argv)
        assert server.stats["batches"] == 2


def test_independent_server_whose_answers_run_the_stories_together(monkeypatch, tmp_path):
    """The same rule against a few lines of http.server rather than openai_server.py: a server that answers
    every request, 200 OK, with four stories and no separator line between them."""
    chats = []
    paragraph = "Mia saw a red ball in the park. She ran to it and picked it up. It was soft and round and fun."

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status, payload):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # no /models here: the run goes on
            self.reply(404, {"error": {"message": "Not found"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            chats.append(body)
            text = "\n\n".join(f"{paragraph} Story {i}." for i in range(4))
            self.reply(200, {"id": f"chatcmpl-{len(chats)}", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": 200, "completion_tokens": 100, "total_tokens": 300}})

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # the 32 connections opened at once

    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with pytest.raises(SystemExit, match=r"^error: 20 answers in a row gave no usable story \(separator_failed"
                                             r" 20\): the model does not put a line with only ###") as e:
            generate(monkeypatch, httpd, tmp_path / "stories.jsonl", "--n_stories=400")
        assert "\n" not in str(e.value) and len(chats) < 60
        del chats[:]
        proc = start(httpd.url, tmp_path / "stories.jsonl", "--n_stories=400")
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "Traceback" not in stderr and len(chats) < 60
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: 20 answers in a row gave no usable story")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_reasoning_models_get_max_completion_tokens(monkeypatch, tmp_path, server):
    assert "max_tokens" in api_client.request_body(args_for("--model=gpt-4o-mini"), "p")  # what every server knows
    out = tmp_path / "stories.jsonl"
    generate(monkeypatch, server, out, "--n_stories=8", "--model=gpt-5-nano")  # the server refuses max_tokens here
    assert len(read(out)) == 8 and all(r["model"].startswith("gpt-5-nano") for r in read(out))


def test_a_second_run_on_the_same_output_is_refused(monkeypatch, tmp_path, server):
    out = tmp_path / "stories.jsonl"
    first = gs.Output(str(out), args_for(), AXES, NAMES)  # as a run in another process holds it
    with pytest.raises(SystemExit, match=f"^error: another run is writing {out}: let it finish, or use another --out"):
        generate(monkeypatch, server, out, "--n_stories=4")
    first.close()
    generate(monkeypatch, server, out, "--n_stories=4")
    check_stories(out, 4)


def test_help_shows_the_usage():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "generate_stories.py"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "Usage:" in result.stdout and "--n_stories" in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--max_retries=-1"], "--max_retries=-1 must not be negative"),  # would retry forever
    (["--rpm=-1"], r"--rpm=-1.0 must be a finite number, 0 or more"),  # would wait forever
    (["--tpm=-5"], r"--tpm=-5.0 must be a finite number, 0 or more"),
    (["--timeout=0"], "--timeout=0.0 must be more than 0"),
    (["--poll_interval=nan", "--batch"], "--poll_interval=nan must be more than 0"),
    (["--price_in=-1"], r"--price_in=-1.0 must be a finite number, 0 or more"),  # a negative cost
    (["--price_out=inf"], r"--price_out=inf must be a finite number, 0 or more"),
    (["--min_words=50", "--max_words=40"], "--min_words=50 is more than --max_words=40: every story would be dropped"),
    (["--n_examples=-1", "--dry_run"], "--n_examples=-1 must not be negative"),
    (["--top_p=1.5"], r"--top_p=1.5 must be between 0 and 1"),
    (["--max_tokens=4096.0"], r"argument --max_tokens: invalid int value: '4096.0'; `python generate_stories.py"
                              r" --help` lists the flags"),
    (["--n_stories=abc"], "argument --n_stories: invalid int value: 'abc'"),
    (["--batch=maybe"], "argument --batch: expected True or False, got 'maybe'"),
    (["--nstories=5"], "unrecognized arguments: --nstories=5"),  # no abbreviations either
])
def test_bad_flag_ends_in_one_line_before_anything_is_sent(monkeypatch, tmp_path, server, argv, message):
    with pytest.raises(SystemExit, match=f"^error: {message}") as e:
        generate(monkeypatch, server, tmp_path / "stories.jsonl", "--n_stories=20", *argv)
    assert "\n" not in str(e.value) and server.log == [] and os.listdir(tmp_path) == []


def test_bad_flag_exits_1_without_the_usage_block(tmp_path):
    proc = start("http://127.0.0.1:9/v1", tmp_path / "stories.jsonl", "--max_tokens=4096.0")
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1 and stderr.splitlines() == [
        "error: argument --max_tokens: invalid int value: '4096.0'; `python generate_stories.py --help` lists the flags"]


def test_missing_key_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="OPENAI_API_KEY is not set"):
        gs.main([f"--out={tmp_path / 'stories.jsonl'}"])

# -----------------------------------------------------------------------------
# Batch API


def test_batch_mode_end_to_end_resubmits_failed_requests(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05, batch_fault_rate=0.2) as server:
        generate(monkeypatch, server, out, "--batch", "--n_stories=200", "--requests_per_batch=15", "--batches_in_flight=2",
                 "--poll_interval=0.02")
        assert server.stats["batches"] >= 5 and server.stats["batch_faults"] >= 2 and server.stats["chat"] == 0
    records = check_stories(out, 200)
    assert {r["prompt_id"] for r in records} == set(range(50))  # the failed requests came back, resubmitted
    assert "batch requests failed" in capsys.readouterr().out
    assert not os.path.exists(f"{out}.batches.json")


def test_killed_batch_run_polls_again_instead_of_paying_twice(tmp_path):
    out = tmp_path / "stories.jsonl"
    state = tmp_path / "stories.jsonl.batches.json"
    with OpenAIServer(api_key=KEY, batch_delay=1.0) as server:
        argv = ["--batch", "--n_stories=160", "--requests_per_batch=10", "--batches_in_flight=3", "--poll_interval=0.05"]
        proc = start(server.url, out, *argv)
        deadline = time.time() + 30
        # the first batch alone, then three side by side once its stories are in
        while time.time() < deadline and not (state.exists() and server.stats["batches"] >= 4 and [
                b["batch_id"] is not None for b in json.loads(state.read_text())["batches"]] == [True] * 3):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(read(out)) == 40  # killed while three batches were in flight
        restarted = start(server.url, out, *argv)
        stdout, stderr = restarted.communicate(timeout=60)
        assert restarted.returncode == 0, stderr
        submitted = Counter(json.loads(line)["custom_id"] for f in server.files.values() if f["purpose"] == "batch"
                            for line in f["content"].splitlines())
    check_stories(out, 160)
    assert set(submitted) == {f"prompt-{k}" for k in range(40)} and max(submitted.values()) == 1


def test_api_key_is_in_no_file_and_no_log(tmp_path, server):
    logs = ""
    for mode in ([], ["--batch", "--poll_interval=0.02", "--requests_per_batch=3"]):
        proc = start(server.url, tmp_path / f"stories{len(mode)}.jsonl", "--n_stories=20", *mode)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        logs += stdout + stderr
    assert KEY not in logs
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) >= 2
    for path in files:
        with open(path, "rb") as f:
            assert KEY.encode() not in f.read(), path


def test_failed_and_expired_batches_are_submitted_again(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05) as server:
        server.inject_batch("failed", 2)  # the organisation's queue of batch tokens is full, twice
        server.inject_batch("expired")  # half of the requests done in time
        # the requests that the batch never ran are not paid for: they do not count toward --max_unusable
        generate(monkeypatch, server, out, "--batch", "--n_stories=32", "--requests_per_batch=8", "--batches_in_flight=1",
                 "--poll_interval=0.02", "--max_unusable=1")
        sizes = [len(f["content"].splitlines()) for f in server.files.values() if f["purpose"] == "batch"]
        statuses = Counter(b["status"] for b in server.batches.values())
    check_stories(out, 32)
    assert sizes[:3] == [8, 4, 2]  # after each failure for the token limit, batches of half the size
    assert statuses["failed"] == 2 and statuses["expired"] == 1
    summary = capsys.readouterr().out
    assert "batches failed 2" in summary and "batches expired 1" in summary and "batch requests failed 1" in summary
    assert not os.path.exists(f"{out}.batches.json")


def test_batches_that_fail_again_and_again_stop_the_run_and_a_rerun_goes_on(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    # one batch at a time: a token limit met while other batches are in the queue waits for them, uncounted
    argv = ["--batch", "--n_stories=32", "--requests_per_batch=8", "--batches_in_flight=1", "--poll_interval=0.02"]
    with OpenAIServer(api_key=KEY, batch_delay=0.05) as server:
        server.inject_batch("failed", batch_api.MAX_BATCH_FAILURES)
        with pytest.raises(SystemExit, match=rf"^error: {batch_api.MAX_BATCH_FAILURES} batches in a row failed"
                                             rf" \(token_limit_exceeded: Enqueued token limit reached.*\);"
                                             rf" run the same command again later$") as e:
            generate(monkeypatch, server, out, *argv)
        assert "\n" not in str(e.value) and os.listdir(tmp_path) == []  # no batch in flight, no story
        generate(monkeypatch, server, out, *argv)  # the queue has room again
    check_stories(out, 32)


class AnswerlessBatches(OpenAIServer):
    """A server whose batches come back without a single answer: every request expired (response null), or the
    batch completed with neither an output nor an error file."""

    def __init__(self, status, **kwargs):
        super().__init__(**kwargs)
        self.status = status

    def run_batch(self, batch):
        if self.status == "expired":
            lines = [json.dumps({"id": self.new_id("batch_req"), "custom_id": json.loads(line)["custom_id"],
                                 "response": None, "error": {"code": "batch_expired", "message": "Not run in time."}})
                     for line in self.files[batch["input_file_id"]]["content"].decode().splitlines()]
            batch["error_file_id"] = self.add_file("\n".join(lines).encode() + b"\n", "batch_output", "errors")["id"]
        batch["status"], batch[f"{self.status}_at"] = self.status, int(time.time())


@pytest.mark.parametrize("status, why", [("expired", r"batch_expired: Not run in time\."), ("completed", "no output")])
def test_batches_that_answer_nothing_end_the_run_in_one_clear_line(tmp_path, status, why):
    with AnswerlessBatches(status, api_key=KEY, batch_delay=0.02) as server:
        proc = start(server.url, tmp_path / "stories.jsonl", "--batch", "--n_stories=40", "--max_retries=2",
                     "--poll_interval=0.05")
        stdout, stderr = proc.communicate(timeout=60)
        # each of the 10 prompts asked in 3 batches (--max_retries=2), then the run stops
        assert server.stats["batches"] == 3
    assert proc.returncode == 1 and "Traceback" not in stderr
    assert re.fullmatch(rf"error: 10 prompts in a row got no answer: 3 batches left each unanswered, the last {status}"
                        rf" \({why}\); run the same command again later\n", stderr.split("\r")[-1]), stderr
    assert os.listdir(tmp_path) == []


def test_unreadable_line_of_a_batch_answer_is_submitted_again(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05) as server:
        server.inject_batch("garbled")
        generate(monkeypatch, server, out, "--batch", "--n_stories=20", "--poll_interval=0.02")
        assert server.stats["batches"] == 2
    check_stories(out, 20)
    summary = capsys.readouterr().out
    assert "batch lines unreadable 1" in summary and "batch requests failed 1" in summary


def test_batch_request_that_the_api_refuses_ends_the_run_in_one_clear_line(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05) as server:
        server.inject_batch("refused")  # its first request
        with pytest.raises(SystemExit, match=r"^error: the API refused the request \(400\): Invalid value") as e:
            generate(monkeypatch, server, out, "--batch", "--n_stories=20", "--poll_interval=0.02")
        assert "\n" not in str(e.value) and server.stats["batches"] == 1  # not submitted again
    assert len(read(out)) == 16  # the answers that came back are kept


def stop_with_batches_in_flight(monkeypatch, server, out):
    """A run on an output of 20 stories (so that batches go side by side) that stops with a batch (slow) in
    flight, and a second created on the server whose id never came back, as when a run is killed between the
    two. Returns its arguments."""
    argv = ["--batch", "--n_stories=60", "--requests_per_batch=5", "--poll_interval=0.02"]
    generate(monkeypatch, server, out, *argv, "--n_stories=20")
    server.inject_batch("slow")
    server.inject_batch("timeout")
    with pytest.raises(SystemExit, match="1 try failed, the last with no answer in 0.2 s"):
        generate(monkeypatch, server, out, *argv, "--timeout=0.2", "--max_retries=0")
    state = json.loads(open(f"{out}.batches.json").read())["batches"]
    assert [entry["batch_id"] is not None for entry in state] == [True, False]
    return argv


def test_batch_whose_create_timed_out_is_found_not_made_twice(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05, stall=0.5) as server:
        server.inject_batch("timeout")  # made on the server, its answer past --timeout
        generate(monkeypatch, server, out, "--batch", "--n_stories=40", "--timeout=0.2", "--max_retries=3",
                 "--poll_interval=0.02")
        made_from = Counter(b["input_file_id"] for b in server.batches.values())
    assert list(made_from.values()) == [1]  # the retry adopted it
    check_stories(out, 40)


def test_batch_made_after_the_lookup_of_a_create_tried_again_is_cancelled(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=2.0, stall=0.5) as server:
        server.inject_batch("late")  # made on the server after the retry looked for it and made another
        generate(monkeypatch, server, out, "--batch", "--n_stories=40", "--timeout=0.2", "--max_retries=3",
                 "--poll_interval=0.05")
        batches = list(server.batches.values())
    assert len(batches) == 2 and batches[0]["input_file_id"] == batches[1]["input_file_id"]
    assert sorted(b["status"] for b in batches) == ["cancelled", "completed"]
    assert "batches made twice, cancelled 1" in capsys.readouterr().out
    check_stories(out, 40)


def test_batches_in_flight_are_refused_to_a_run_with_other_arguments(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05, stall=0.5) as server:
        # no story yet: the run file stays as long as a batch is in flight, and is checked all the same
        first = tmp_path / "first.jsonl"
        argv = ["--batch", "--n_stories=40", "--poll_interval=0.02"]
        server.inject_batch("timeout")
        with pytest.raises(SystemExit, match="1 try failed, the last with no answer in 0.2 s"):
            generate(monkeypatch, server, first, *argv, "--timeout=0.2", "--max_retries=0")
        assert sorted(os.listdir(tmp_path)) == ["first.jsonl.batches.json", "first.jsonl.run.json"]
        with pytest.raises(SystemExit, match=f"^error: {re.escape(str(first))} was made with --seed=0, not 1:"):
            generate(monkeypatch, server, first, *argv, "--seed=1")
        argv = stop_with_batches_in_flight(monkeypatch, server, out)
        written = out.read_text()
        for other in ("--seed=1", "--stories_per_prompt=2", "--max_tokens=1000", "--model=gpt-4o"):
            flag, value = other.split("=")
            with pytest.raises(SystemExit, match=f"^error: {re.escape(str(out))} was made with {flag}=.*, not {value}:"
                                                 f" use the same arguments, or another --out$"):
                generate(monkeypatch, server, out, *argv, other)
        assert server.stats["batches"] == 4 and out.read_text() == written


def test_live_run_is_refused_while_batches_are_in_flight(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05, stall=0.5) as server:
        argv = stop_with_batches_in_flight(monkeypatch, server, out)
        with pytest.raises(SystemExit, match=rf"^error: batches are in flight for {re.escape(str(out))}, listed in"
                                             rf" .*batches.json: rerun with --batch to collect them, or use another"
                                             rf" --out$"):
            generate(monkeypatch, server, out, "--n_stories=40")
        assert server.stats["chat"] == 0
        generate(monkeypatch, server, out, *argv, "--n_stories=40")
    check_stories(out, 40)


@pytest.mark.parametrize("state", ['{"batches": [{"foo": 1}]}', '{"batches": [1]}', '[]',
                                   '{"batches": [{"input_file_id": "f", "batch_id": null, "prompt_ids": ["7"]}]}'])
def test_damaged_batches_file_ends_in_one_line(monkeypatch, tmp_path, server, state):
    out = tmp_path / "stories.jsonl"
    (tmp_path / "stories.jsonl.batches.json").write_text(state)
    with pytest.raises(SystemExit, match=rf"^error: {re.escape(str(out))}.batches.json is damaged \(.*\): restore it,"
                                         rf" or use another --out$"):
        generate(monkeypatch, server, out, "--batch", "--n_stories=8")
    assert server.stats["batches"] == 0


@pytest.mark.parametrize("name, line", [("stories.jsonl", {"story": "A fox ran.", "prompt_id": "7"}),
                                        ("stories.jsonl", {"story": "A fox ran.", "prompt_id": None}),
                                        ("stories.jsonl.dropped.jsonl", {"prompt_id": "7"})])
def test_record_with_a_prompt_id_that_is_not_a_number_ends_in_one_line(monkeypatch, tmp_path, server, name, line):
    out = tmp_path / "stories.jsonl"
    (tmp_path / name).write_text(json.dumps(line) + "\n")
    with pytest.raises(SystemExit, match=rf"^error: line 1 of {re.escape(str(tmp_path / name))} is not a"
                                         rf" (story record|dropped prompt): fix or remove it, or use another --out$"):
        generate(monkeypatch, server, out, "--n_stories=8")
    assert server.log == []


def test_batch_whose_id_was_lost_is_found_and_batches_no_longer_needed_are_cancelled(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.05, stall=0.5) as server:
        argv = stop_with_batches_in_flight(monkeypatch, server, out)
        generate(monkeypatch, server, out, *argv, "--n_stories=40")  # the second batch's answers are enough now
        statuses = [b["status"] for b in server.batches.values()][1:]
    assert statuses == ["cancelling", "completed"]  # found by batches.list, not created again; the slow one cancelled
    assert {r["prompt_id"] for r in check_stories(out, 40)} == set(range(5)) | set(range(10, 15))
    assert "batches cancelled 1" in capsys.readouterr().out and not os.path.exists(f"{out}.batches.json")


def test_batches_in_flight_are_cancelled_by_a_rerun_whose_stories_are_there(monkeypatch, tmp_path, capsys):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=1.5, stall=0.5) as server:  # both batches still run at the rerun
        argv = stop_with_batches_in_flight(monkeypatch, server, out)
        capsys.readouterr()
        generate(monkeypatch, server, out, *argv, "--n_stories=20")  # the output holds 20 already
        statuses = [b["status"] for b in server.batches.values()][1:]
    # the slow one by its id, the one whose id was lost found by batches.list; none made
    assert len(statuses) == 2 and set(statuses) <= {"cancelling", "cancelled"}
    assert "batches cancelled 2" in capsys.readouterr().out and not os.path.exists(f"{out}.batches.json")
    check_stories(out, 20)


def test_batch_in_a_status_of_the_servers_own_is_polled_not_sent_again(monkeypatch, tmp_path):
    out = tmp_path / "stories.jsonl"
    with OpenAIServer(api_key=KEY, batch_delay=0.3) as server:
        server.inject_batch("queued")
        generate(monkeypatch, server, out, "--batch", "--n_stories=8", "--poll_interval=0.02")
        assert server.stats["batches"] == 1
    check_stories(out, 8)


def test_batch_the_server_does_not_know_or_that_runs_past_its_window_ends_in_one_line(monkeypatch, tmp_path):
    import batch_api

    out = tmp_path / "stories.jsonl"
    state = tmp_path / "stories.jsonl.batches.json"
    with OpenAIServer(api_key=KEY, batch_delay=0.05) as server:
        state.write_text(json.dumps({"batches": [{"input_file_id": "file-x", "batch_id": "batch-x", "prompt_ids": [0]}]}))
        with pytest.raises(SystemExit, match=rf"^error: batch batch-x, listed in {re.escape(str(state))}, is unknown to"
                                             rf" http://.* \(404\): use the key and --base_url that made it, or remove its"
                                             rf" entry from .* to ask its prompts again$"):
            generate(monkeypatch, server, out, "--batch", "--n_stories=8", "--poll_interval=0.02")
        state.unlink()
        # a batch still running an hour after its 24 h window: here, at once
        monkeypatch.setattr(batch_api, "PAST_WINDOW_S", -24 * 3600)
        server.inject_batch("slow")
        with pytest.raises(SystemExit, match=r"^error: batch \S+ is still (validating|in_progress) -24 h after its"
                                             r" completion window ended; run the same command again later, it polls"
                                             r" the batches listed in .*batches.json$"):
            generate(monkeypatch, server, out, "--batch", "--n_stories=8", "--poll_interval=0.02")
        assert server.stats["batches"] == 1 and json.loads(state.read_text())["batches"][0]["batch_id"]
