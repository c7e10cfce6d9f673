"""evaluate.py: per-story losses against a naive forward pass of each story, the rows grouped by label, the LLM
judge run whole against the local OpenAI-compatible server (faults, stops, a killed run resumed without paying
twice), and the data report's numbers against a naive exact computation."""

import itertools
import json
import math
import os
import shutil
import signal
import string
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO, SAMPLE, TINY, one_error_line, run

sys.path.insert(0, os.path.join(REPO, "tests"))
import data_report  # noqa: E402
import evaluate  # noqa: E402
import judge  # noqa: E402
import prepare  # noqa: E402
from openai_server import SHAPE_FAULTS, OpenAIServer  # noqa: E402
from tokenizer import LABELS  # noqa: E402

KEY = "sk-test-evaluate"


@pytest.fixture(scope="session")
def tiny(workdir):
    """workdir with a tiny model trained for a few steps in out/tiny; n_ctx 128, so most val stories need windows."""
    result = run("train.py", *TINY, "--max_iters=10", "--eval_interval=10", "--out_dir=out/tiny", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def error_of(argv):
    """The one line evaluate.main(argv) ends with."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code), e.value.code
    return str(e.value.code)


# ----------------------------------------------------------------------------------------------
# loss by story


def tiny_model_and_val_stories():
    """The tiny run's model and tokenizer, the val tokens, and each val story's offset and length in them."""
    from sample import load_model

    model, tok = load_model("out/tiny", "cpu")
    index = prepare.read_index("data/sample", "val")
    tokens = np.fromfile("data/sample/val.bin", dtype="<u2")
    return model, tok, tokens, index["offset"].to_numpy().astype(np.int64), index["length"].to_numpy().astype(np.int64)


def test_story_losses_match_a_naive_forward_pass_of_each_window(tiny, monkeypatch):
    import torch
    import torch.nn.functional as F

    monkeypatch.chdir(tiny)
    model, tok, tokens, offsets, lengths = tiny_model_and_val_stories()
    n_ctx, stride = model.config.n_ctx, 48
    assert lengths.max() > 2 * n_ctx  # windows are exercised
    nats, text_nats, nbytes, pos_nats, pos_tokens = evaluate.story_losses(
        model, tokens, offsets, lengths, tok.token_bytes(), stride, batch_size=5, device="cpu")
    token_bytes = np.array(tok.token_bytes())
    for i in range(len(lengths)):
        story = tokens[offsets[i]:offsets[i] + lengths[i]].astype(np.int64)
        n = len(story) - 1
        nll, logits = np.zeros(n + 1), {}
        for p in range(1, n + 1):  # target p is scored in the window that ends at n_ctx + k * stride, the first past p
            k = max(0, math.ceil((p - n_ctx) / stride))
            end = min(n_ctx + k * stride, n)
            start = max(0, end - n_ctx)
            if (start, end) not in logits:  # the window alone: no batch, no padding
                with torch.no_grad():
                    logits[start, end] = model(torch.from_numpy(story[start:end])[None])[0][0]
            nll[p] = F.cross_entropy(logits[start, end][p - start - 1], torch.tensor(story[p])).item()
        assert nats[i] / n == pytest.approx(nll[1:].mean(), abs=1e-4)
        text = token_bytes[story[1:]] > 0
        assert text_nats[i] == pytest.approx(nll[1:][text].sum(), rel=1e-4)
        assert nbytes[i] == token_bytes[story[1:]].sum() == len(tok.decode(story.tolist()).encode())
    assert pos_tokens.sum() == (lengths - 1).sum() and pos_nats.sum() == pytest.approx(nats.sum(), rel=1e-6)


def test_opening_loss_is_the_first_ten_tokens_scored_from_bos_at_position_0(tiny, monkeypatch):
    import torch
    import torch.nn.functional as F

    monkeypatch.chdir(tiny)
    model, _, tokens, offsets, lengths = tiny_model_and_val_stories()
    lengths[3] = 6  # a story of 5 tokens after BOS: its opening is those 5
    opening = evaluate.opening_losses(model, tokens, offsets, lengths, batch_size=4, device="cpu")
    for i in range(len(lengths)):
        story = torch.from_numpy(tokens[offsets[i]:offsets[i] + min(lengths[i], 11)].astype(np.int64))
        with torch.no_grad():  # the story's first tokens alone, BOS at position 0
            logits = model(story[None, :-1])[0][0]
        assert opening[i] == pytest.approx(F.cross_entropy(logits, story[1:]).item(), rel=1e-5)
    assert len(story) == 11 and story[0] == json.load(open("data/sample/meta.json"))["bos_id"]


def test_loss_report_by_label_length_and_position(tiny):
    result = run("evaluate.py", "--out_dir=out/tiny", "--batch_size=7", cwd=tiny)
    assert result.returncode == 0, result.stderr
    out = tiny / "out" / "tiny" / "eval"
    report = json.load(open(out / "loss.json"))
    stories = pq.read_table(out / "loss_by_story.parquet")
    index = prepare.read_index(str(tiny / "data" / "sample"), "val")
    meta = json.load(open(tiny / "data" / "sample" / "meta.json"))
    loss, bpb = stories["loss"].to_numpy(), stories["bpb"].to_numpy()
    assert stories["id"].to_pylist() == index["id"].to_pylist() and report["stories"] == meta["val"]["stories"]
    assert report["stride"] == 64 and report["n_ctx"] == 128
    rows = {(r["group"], str(r["value"])): r for r in report["rows"]}
    assert rows["all", ""]["loss"] == pytest.approx(loss.mean()) and rows["all", ""]["stories"] == len(loss)
    from scipy import stats

    half = stats.t.ppf(0.975, len(loss) - 1) * loss.std(ddof=1) / math.sqrt(len(loss))
    assert rows["all", ""]["loss_ci"] == pytest.approx(half)
    assert report["opening_loss"] == pytest.approx(stories["opening_loss"].to_numpy().mean())
    assert "Opening loss" in open(out / "loss.md").read()
    assert report["token_loss"] == pytest.approx((loss * stories["tokens"].to_numpy()).sum() / stories["tokens"].to_numpy().sum())
    for label in LABELS:  # every value of every label: the mean over exactly its stories
        values = index[label].to_pylist()
        for value, n in Counter(values).items():
            row = rows[label, str(value)]
            chosen = np.array([v == value for v in values])
            assert row["stories"] == n and row["loss"] == pytest.approx(loss[chosen].mean())
            assert row["bpb"] == pytest.approx(bpb[chosen].mean())
    assert sum(r["stories"] for r in report["rows"] if r["group"] == "length") == len(loss)
    position = report["by_position"]
    assert sum(position["tokens"]) == stories["tokens"].to_numpy().sum() and position["tokens"][0] == len(loss)
    markdown = open(out / "loss.md").read()
    assert "| theme |" in markdown and "95% t-interval" in markdown
    for png in ("loss_by_label.png", "loss_by_position.png"):
        assert open(out / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a label named twice is reported once
    result = run("evaluate.py", "--out_dir=out/tiny", "--labels=theme,theme", "--eval_dir=out/tiny/eval_theme", cwd=tiny)
    assert result.returncode == 0, result.stderr
    twice = json.load(open(tiny / "out" / "tiny" / "eval_theme" / "loss.json"))["rows"]
    assert sum(r["group"] == "theme" for r in twice) == len(set(index["theme"].to_pylist()))


def test_bits_per_byte_by_story_and_label_are_text_nats_over_ln2_bytes(tiny, tmp_path, monkeypatch):
    import torch
    import torch.nn.functional as F

    monkeypatch.chdir(tiny)
    monkeypatch.setattr(evaluate, "loss_plots", lambda *args: [])  # not checked here, and slow
    evaluate.main(["--out_dir=out/tiny", "--stride=64", "--batch_size=32", f"--eval_dir={tmp_path}", "--device=cpu"])
    stories = pq.read_table(tmp_path / "loss_by_story.parquet")
    model, tok, tokens, offsets, lengths = tiny_model_and_val_stories()
    n_ctx, stride = model.config.n_ctx, 64
    text_nats, nbytes = np.zeros(len(lengths)), np.zeros(len(lengths))
    token_bytes = np.array(tok.token_bytes())
    for i in range(len(lengths)):  # each target scored in the first window that ends past it, as in the test above
        story = tokens[offsets[i]:offsets[i] + lengths[i]].astype(np.int64)
        n = len(story) - 1
        for k in range(max(1, math.ceil((n - n_ctx) / stride) + 1)):
            end = min(n_ctx + k * stride, n)
            start, first = max(0, end - n_ctx), 0 if k == 0 else min(n_ctx + (k - 1) * stride, n)
            with torch.no_grad():
                nll = F.cross_entropy(model(torch.from_numpy(story[start:end])[None])[0][0], torch.from_numpy(story[start + 1:end + 1]),
                                      reduction="none").numpy()[first - start:]
            text = token_bytes[story[first + 1:end + 1]] > 0  # not BOS or EOS
            text_nats[i] += nll[text].sum()
        nbytes[i] = len(tok.decode(story.tolist()).encode())
    bpb = text_nats / (math.log(2) * nbytes)
    assert stories["bytes"].to_numpy().tolist() == nbytes.tolist()
    assert stories["bpb"].to_numpy() == pytest.approx(bpb, rel=1e-4)
    report = json.load(open(tmp_path / "loss.json"))
    assert report["token_bpb"] == pytest.approx(text_nats.sum() / (math.log(2) * nbytes.sum()), rel=1e-4)
    rows = {(r["group"], str(r["value"])): r for r in report["rows"]}
    assert rows["all", ""]["bpb"] == pytest.approx(bpb.mean(), rel=1e-4)
    index = prepare.read_index("data/sample", "val")
    for label in LABELS:
        values = np.array(index[label].to_pylist(), dtype=object)
        for value in set(values):
            assert rows[label, str(value)]["bpb"] == pytest.approx(bpb[values == value].mean(), rel=1e-4)


def test_loss_mode_refuses_bad_inputs_in_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny)
    assert "out/none/ckpt.pt does not exist" in error_of(["--out_dir=out/none"])
    assert "no label 'colour'" in error_of(["--out_dir=out/tiny", "--labels=theme,colour"])
    assert "data/nothing/meta.json is missing" in error_of(["--out_dir=out/tiny", "--dataset=nothing"])
    assert "must be at least 1" in error_of(["--out_dir=out/tiny", "--batch_size=0"])
    assert "one of the three" in error_of(["--out_dir=out/tiny", "--data=data/sample/stories.jsonl"])
    assert "one of the three" in error_of(["--out_dir=out/tiny", "--hf_dir=hf/tiny"])
    assert "--dry_run goes with --judge" in error_of(["--out_dir=out/tiny", "--dry_run"])
    # a flag of another mode is refused, not ignored
    assert "--max_stories goes with a data report" in error_of(["--out_dir=out/tiny", "--max_stories=3"])
    assert "--labels goes with a model's evaluation" in error_of(["--data=data/sample/stories.jsonl", "--labels=theme"])
    assert "--judge_model goes with --judge" in error_of(["--out_dir=out/tiny", "--judge_model=gpt-4o"])
    assert "--stride goes with the loss report, not with --judge" in error_of(["--out_dir=out/tiny", "--judge", "--stride=8"])
    # bins of another tokenizer, bins made before the story index, and val stories without labels
    for name in ("other", "old", "text"):
        shutil.copytree("data/sample", tmp_path / name)
        os.symlink(tmp_path / name, f"data/{name}")
    meta = json.load(open("data/other/meta.json"))
    json.dump({**meta, "tokenizer_sha256": "0" * 64}, open("data/other/meta.json", "w"))
    os.remove("data/old/val.stories.parquet")
    table = pq.read_table("data/text/val.stories.parquet")  # as prepare.py writes it for stories from text files
    for k in LABELS:
        table = table.set_column(table.schema.get_field_index(k), k, pa.nulls(table.num_rows, table.schema.field(k).type))
    pq.write_table(table, "data/text/val.stories.parquet")
    assert "tokenized with another tokenizer" in error_of(["--out_dir=out/tiny", "--dataset=other"])
    assert "data/old/val.stories.parquet does not exist; run prepare.py" in error_of(["--out_dir=out/tiny", "--dataset=old"])
    assert "carry no label theme" in error_of(["--out_dir=out/tiny", "--dataset=text", "--labels=theme",
                                               f"--eval_dir={tmp_path / 'eval'}"])
    for name in ("other", "old", "text"):
        os.remove(f"data/{name}")  # the session's workdir, as it was
    # Ctrl-C while the stories are scored: one line, and no report
    def pressed_ctrl_c(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "story_losses", pressed_ctrl_c)
    assert error_of(["--out_dir=out/tiny", f"--eval_dir={tmp_path / 'stopped'}"]) == "error: interrupted; no report was left half-written"
    assert not (tmp_path / "stopped").exists() or not os.listdir(tmp_path / "stopped")


# ----------------------------------------------------------------------------------------------
# the judge


def test_reports_on_other_bins_or_a_snapshot_go_beside_the_models_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    eval_dir = {flags: evaluate.parse_args(["--out_dir=out/5m", *flags]).eval_dir for flags in [
        (), ("--split=train",), ("--dataset=other",), ("--dataset=other", "--split=train"), ("--step=512", "--split=train")]}
    assert list(eval_dir.values()) == [os.path.join("out", "5m", "eval", *parts) for parts in [
        (), ("train",), ("other",), ("other", "train"), ("step_0000512", "train")]]
    assert evaluate.parse_args(["--hf_dir=hf/5m", "--dataset=d", "--split=train"]).eval_dir == os.path.join(
        "out", "5m", "eval_hf", "train")
    assert evaluate.parse_args(["--out_dir=out/5m", "--eval_dir=mine", "--split=train"]).eval_dir == "mine"


def test_parse_grade_takes_grades_and_names_what_is_not_one():
    scores = {"originality": 70, "coherence": 61, "grammar": 90, "quality": 65}
    assert judge.parse_grade(json.dumps({"explanation": "ok", **scores})) == (scores, "ok")
    fenced = "Here it is:\n```json\n" + json.dumps({k.upper(): float(v) for k, v in scores.items()}) + "\n```"
    assert judge.parse_grade(fenced) == (scores, "")
    for answer, kind in (("", "empty"), ("Originality: 70/100", "not_json"), ('{"originality": 70', "not_json"),
                         (json.dumps({**scores, "grammar": 101}), "out_of_range"),
                         (json.dumps({**scores, "grammar": -1}), "out_of_range"),
                         (json.dumps({**scores, "quality": 65.5}), "not_a_whole_number"),
                         (json.dumps({**scores, "quality": "65"}), "not_a_whole_number"),
                         (json.dumps({**scores, "quality": True}), "not_a_whole_number"),
                         (json.dumps({**scores, "quality": float("nan")}), "not_a_whole_number"),  # JSON's NaN
                         (json.dumps({**scores, "quality": float("inf")}), "not_a_whole_number"),
                         (json.dumps(scores).replace("65", "1e999"), "not_a_whole_number"),
                         (json.dumps({k: v for k, v in scores.items() if k != "coherence"}), "missing_score"),
                         ("[70, 61, 90, 65]", "not_json")):
        with pytest.raises(judge.NotAGrade) as e:
            judge.parse_grade(answer)
        assert e.value.kind == kind, answer
    story = "Mia had a red kite. \"Look!\" she said. It flew high over the hill and far away."
    assert judge.beginning(story, 0) == "Mia had a red kite."
    assert judge.beginning(story, 5) == "Mia had a red kite."
    assert judge.beginning(story, 6) == "Mia had a red kite. \"Look!\""
    assert judge.beginning("No stop at all", 0) == "No stop at all"


def start_judge(workdir, url, *argv):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "evaluate.py"), "--out_dir=out/tiny", "--judge",
                             f"--base_url={url}", "--max_new_tokens=16", "--backoff=0.01", "--device=cpu", *argv],
                            cwd=workdir, env={**os.environ, "OPENAI_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def judge_run(workdir, url, *argv, key=KEY):
    return run("evaluate.py", "--out_dir=out/tiny", "--judge", f"--base_url={url}", "--max_new_tokens=16",
               "--backoff=0.01", "--device=cpu", *argv, cwd=workdir, env={"OPENAI_API_KEY": key})


def lines(path):
    return [json.loads(line) for line in open(path)]


def test_judge_grades_each_prompt_once_through_faults_and_a_rerun_pays_nothing(tiny, tmp_path):
    faults = ["429", "500", "malformed", "disconnect", "not_json", "out_of_range", "missing_score"]
    eval_dir = tmp_path / "eval"
    with OpenAIServer(api_key=KEY, fault_rate=0.3, faults=faults, seed=3, stall=0.5) as server:
        result = judge_run(tiny, server.url, "--n_prompts=9", "--concurrency=4", f"--eval_dir={eval_dir}")
        assert result.returncode == 0, result.stderr
        records = lines(eval_dir / "judge.jsonl")
        report = json.load(open(eval_dir / "judge.json"))
        failed = [r for r in records if r["scores"] is None]
        assert len(records) == len({r["id"] for r in records}) == 9 and report["prompts"] == 9
        # each answer that is no grade is counted as failed, by its reason, and never scored
        served = {k: server.stats[k] for k in ("not_json", "out_of_range", "missing_score")}
        assert report["failed_to_parse"] == len(failed) == sum(served.values()) > 0
        assert report["failed_by_reason"] == {k: n for k, n in served.items() if n}
        assert report["graded"] == 9 - len(failed) and all(r["error"] and r["answer"] for r in failed)
        for metric in judge.METRICS:
            values = [r["scores"][metric] for r in records if r["scores"]]
            assert report["metrics"][metric]["mean"] == pytest.approx(np.mean(values))
        assert server.stats["chat"] == 9 + sum(server.stats[k] for k in ("429", "500", "malformed", "disconnect"))
        assert all(r["prompt"] and r["completion"] is not None for r in records)
        chats = server.stats["chat"]
        result = judge_run(tiny, server.url, "--n_prompts=9", f"--eval_dir={eval_dir}")
        assert result.returncode == 0 and server.stats["chat"] == chats  # graded already: nothing sent
        assert json.load(open(eval_dir / "judge.json"))["metrics"] == report["metrics"]
        result = judge_run(tiny, server.url, "--n_prompts=100", f"--eval_dir={eval_dir}")  # every val story: 13
        assert result.returncode == 0 and len(lines(eval_dir / "judge.jsonl")) == 13
        assert lines(eval_dir / "judge.jsonl")[:9] == records
        result = judge_run(tiny, server.url, "--n_prompts=100", f"--eval_dir={eval_dir}", "--top_k=5")
        assert "made with other settings (top_k)" in one_error_line(result)
    markdown = open(eval_dir / "judge.md").read()
    assert "| originality |" in markdown and "failed to parse" in markdown


def test_judge_that_is_a_reasoning_model_is_sent_no_temperature(tiny, tmp_path):
    # OpenAI's gpt-5 and o-series refuse max_tokens and any temperature but 1, as the local server does
    with OpenAIServer(api_key=KEY) as server:
        result = judge_run(tiny, server.url, "--n_prompts=3", "--judge_model=gpt-5-nano", f"--eval_dir={tmp_path}")
        assert result.returncode == 0, result.stderr
    assert json.load(open(tmp_path / "judge.json"))["graded"] == 3


def test_killed_judge_run_resumes_without_paying_twice(tiny, tmp_path):
    eval_dir = tmp_path / "eval"
    with OpenAIServer(api_key=KEY, latency=0.25) as server:
        process = start_judge(tiny, server.url, "--n_prompts=13", "--concurrency=2", f"--eval_dir={eval_dir}")
        deadline = time.time() + 60
        while time.time() < deadline and not (eval_dir / "judge.jsonl").exists() or len(lines(eval_dir / "judge.jsonl")) < 4:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        done = lines(eval_dir / "judge.jsonl")
        assert 4 <= len(done) < 13
        with open(eval_dir / "judge.jsonl", "ab") as f:
            f.write(b'{"id": "torn')  # a write the kill cut short
        before = server.stats["chat"]
        result = judge_run(tiny, server.url, "--n_prompts=13", "--concurrency=2", f"--eval_dir={eval_dir}")
        assert result.returncode == 0, result.stderr
        assert "cutting off a torn last line" in result.stderr
        records = lines(eval_dir / "judge.jsonl")
        assert len(records) == len({r["id"] for r in records}) == 13
        assert server.stats["chat"] - before == 13 - len(done)  # only the prompts without a line were asked
        assert records[:len(done)] == done


def test_judge_that_never_answers_with_a_grade_stops_after_a_bounded_number_of_requests(tiny, tmp_path):
    with OpenAIServer(api_key=KEY, answer_fault="not_json") as server:
        result = judge_run(tiny, server.url, "--n_prompts=13", "--concurrency=3", "--max_unusable=4",
                           f"--eval_dir={tmp_path}")
        line = one_error_line(result)
        assert "judge answers in a row were not grades (not_json" in line and "--response_format" in line
        assert 4 <= server.stats["chat"] <= 4 + 3
    assert len(lines(tmp_path / "judge.jsonl")) == server.stats["chat"]  # paid for: kept, not asked again


def test_judge_answers_of_the_wrong_shape_end_in_one_line(tiny, tmp_path):
    # JSON, but not a chat completion: paid for, kept and counted by --max_unusable, not asked again
    for shape in SHAPE_FAULTS:  # content parts, usage "n/a", token counts as strings
        with OpenAIServer(api_key=KEY, answer_fault=shape) as server:
            result = judge_run(tiny, server.url, "--n_prompts=13", "--concurrency=3", "--max_unusable=4",
                               f"--eval_dir={tmp_path / shape}")
            line = one_error_line(result)
            assert "judge answers in a row were not grades (not_a_completion" in line, line
            assert "the server's answers are not chat completions; check --base_url and --judge_model" in line
            assert 4 <= server.stats["chat"] <= 4 + 3
        records = lines(tmp_path / shape / "judge.jsonl")
        assert len(records) == server.stats["chat"] and all(r["error"].startswith("not_a_completion: ") for r in records)


@pytest.mark.parametrize("case, message", [
    ("bad_key", "the API rejected the key (401 Unauthorized)"),
    ("unreachable", "cannot reach http://127.0.0.1:9/v1"),
    ("no_json_schema", "the API refused the request (400): response_format of type 'json_schema' is not supported"),
    ("no_answers", "prompts in a row got no answer from the judge"),
])
def test_judge_setups_that_cannot_work_end_in_one_line_and_write_nothing(tiny, tmp_path, case, message):
    with OpenAIServer(api_key=KEY, json_schema=case != "no_json_schema", fault_rate=float(case == "no_answers"),
                      faults=["500"]) as server:
        url = "http://127.0.0.1:9/v1" if case == "unreachable" else server.url
        result = judge_run(tiny, url, "--n_prompts=6", "--max_retries=1", f"--eval_dir={tmp_path}",
                           key="sk-wrong" if case == "bad_key" else KEY)
        line = one_error_line(result)
        assert message in line
        if case == "no_json_schema":
            assert "--judge_model" in line and "--model" not in line.replace("--judge_model", "")
            assert "--response_format=json_object" in line
        assert server.stats["chat"] <= 6 * 2
    assert os.listdir(tmp_path) == []


def test_judge_dry_run_prints_the_prompt_and_the_cost_and_sends_nothing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tiny)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    evaluate.main(["--out_dir=out/tiny", "--judge", "--dry_run", "--n_prompts=8", "--max_new_tokens=16",
                   f"--eval_dir={tmp_path}", "--device=cpu"])
    out = capsys.readouterr().out
    assert "Grade the story as a whole" in out and "<story>" in out and '"json_schema"' in out
    assert "8 requests to send" in out and "cost: $" in out and "for gpt-4o-mini" in out
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# the data report


def naive_report(stories):
    """The data report's exact numbers, computed the plain way: Counters of word tuples, all pairs of stories."""
    punctuation = str.maketrans({c: " " for c in string.punctuation if c != "'"})
    words = [t.lower().translate(punctuation).split() for t, _ in stories]
    out = {"distinct": {}, "ngrams": {}}
    fourgrams = None
    for n in (1, 2, 3, 4):
        grams = Counter(tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1))
        out["distinct"][n], out["ngrams"][n] = len(grams), sum(grams.values())
        fourgrams = grams
    out["zipf"] = data_report.zipf_exponent(sorted(fourgrams.values(), reverse=True))[0]
    openings = Counter(" ".join(w[:3]) for w in words)
    out["openings"] = openings
    texts = [t.strip() for t, _ in stories]
    out["exact"] = len(texts) - len(set(texts))
    shingles = [{" ".join(w[i:i + 5]) for i in range(max(1, len(w) - 4))} for w in words]
    near = set()
    for i, j in itertools.combinations(range(len(stories)), 2):
        if len(shingles[i] & shingles[j]) / len(shingles[i] | shingles[j]) >= 0.8:
            near |= {i, j}
    out["near"] = len(near)
    out["words"] = [len(w) for w in words]
    out["paragraphs"] = [len([p for p in t.split("\n\n") if p.strip()]) for t, _ in stories]
    return out


def test_data_report_matches_a_naive_exact_computation(tmp_path):
    records = [json.loads(line) for line in open(SAMPLE)]
    copy = dict(records[5], id="copy")  # an exact duplicate, and a near one: a word changed
    near = dict(records[9], id="near", story=records[9]["story"].replace(" the ", " a ", 1))
    long = dict(records[12], id="long", story="\n\n".join(  # 6,000 words in 300 paragraphs: longer than most stories
        " ".join(f"word{(17 * p + i) % 97}" for i in range(20)) + "." for p in range(300)))
    records += [copy, near, long]
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("".join(f"Once upon a time, there was a {a} who liked {b}.\n\nThe end.\n<|endoftext|>\n"
                                 for a, b in itertools.product(["cat", "dog", "girl", "boy"], ["cake", "rain", "toys"])))
    evaluate.main([f"--data={data}", f"--data={tiny_text}", f"--eval_dir={tmp_path / 'report'}"])
    report = json.load(open(tmp_path / "report" / "data.json"))
    first, second = report["datasets"]
    stories = [(r["story"], r) for r in records]
    naive = naive_report(stories)
    assert first["stories"] == len(records)
    for n in (1, 2, 3, 4):
        d = first["distinct"][str(n)]
        assert (d["distinct"], d["ngrams"], d["exact"]) == (naive["distinct"][n], naive["ngrams"][n], True)
    assert first["zipf"]["exponent"] == pytest.approx(naive["zipf"]) and first["zipf"]["exact"]
    top = naive["openings"].most_common(1)[0]
    assert first["openings"]["most_common_share"] == pytest.approx(top[1] / len(records))
    assert first["openings"]["distinct"] == len(naive["openings"])
    p = np.array(list(naive["openings"].values())) / len(records)
    assert first["openings"]["entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert first["duplicates"]["exact"] == naive["exact"] == 1
    assert first["duplicates"]["near"] == naive["near"] >= 4 and first["duplicates"]["near_sample"] == len(records)
    assert first["words"]["mean"] == pytest.approx(np.mean(naive["words"]))
    for q, key in ((5, "p5"), (50, "median"), (95, "p95")):
        assert first["words"][key] == int(np.percentile(naive["words"], q, method="inverted_cdf"))
        assert first["paragraphs"][key] == int(np.percentile(naive["paragraphs"], q, method="inverted_cdf"))
    assert first["paragraphs"]["mean"] == pytest.approx(np.mean(naive["paragraphs"]))
    assert max(naive["words"]) == 6000 and max(naive["paragraphs"]) == 300
    for label in LABELS:
        counts = Counter(r[label] for r in records)
        assert first["labels"][label]["counts"] == {str(k): v for k, v in counts.items()}
        assert first["labels"][label]["values"] == len(counts)
    from scipy.stats import chi2_contingency

    pair = next(r for r in first["label_pairs"] if r["labels"] == ["theme", "style"])
    table = Counter((r["theme"], r["style"]) for r in records)
    rows, cols = sorted({r["theme"] for r in records}), sorted({r["style"] for r in records})
    expected = chi2_contingency(np.array([[table[a, b] for b in cols] for a in rows]), correction=False)
    assert pair["chi2"] == pytest.approx(expected.statistic) and pair["p"] == pytest.approx(expected.pvalue)
    import textstat

    assert first["readability"]["flesch_kincaid_grade"]["mean"] == pytest.approx(
        np.mean([textstat.flesch_kincaid_grade(r["story"]) for r in records]))
    # TinyStories-style text: no labels, a formulaic opening
    assert second["stories"] == 12 and second["labels"] == {} and second["label_pairs"] == []
    assert second["openings"]["top"][0] == {"opening": "once upon a", "stories": 12, "share": 1.0}
    markdown = open(tmp_path / "report" / "data.md").read()
    assert f"| stories | {len(records)} | 12 |" in markdown and '"once upon a" 100.0%' in markdown
    for png in ("zipf.png", "lengths.png", "labels.png"):
        assert open(tmp_path / "report" / png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a report of data without labels, in the same folder, leaves no labels.png of the data before
    evaluate.main([f"--data={tiny_text}", f"--eval_dir={tmp_path / 'report'}"])
    assert not (tmp_path / "report" / "labels.png").exists() and (tmp_path / "report" / "zipf.png").exists()


def test_sketches_past_their_exact_range():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300_000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    distinct = data_report.Distinct(exact_below=10_000)
    for chunk in np.array_split(np.concatenate([hashes, hashes[:100_000]]), 30):
        distinct.add(chunk)
    count, exact = distinct.count()
    assert not exact and count == pytest.approx(300_000, rel=0.03)  # 0.8% standard error
    # a Zipfian stream through a summary far smaller than its distinct values
    values = (rng.zipf(1.3, size=400_000) % 50_000).astype(np.uint64)
    top = data_report.TopCounts(k=2_000)
    for chunk in np.array_split(values, 40):
        top.add(chunk)
    true = np.sort(np.bincount(values.astype(np.int64)))[::-1]
    estimate = top.top(100)
    assert top.dropped and (estimate <= true[:100]).all()
    assert (true[:100] - estimate <= len(values) / (2_000 + 1)).all()
    assert (estimate[:20] == true[:20]).all()  # the heavy hitters, never dropped: exact


def test_data_report_of_stories_too_short_for_a_4_gram(tmp_path):
    data = tmp_path / "short.jsonl"
    data.write_text('{"story": "Hi there."}\n{"story": "Go home now."}\n')
    evaluate.main([f"--data={data}", f"--eval_dir={tmp_path / 'report'}"])
    [report] = json.load(open(tmp_path / "report" / "data.json"))["datasets"]
    assert report["distinct"]["4"]["ratio"] is None and report["distinct"]["3"]["ratio"] == 1.0
    markdown = open(tmp_path / "report" / "data.md").read()
    assert "| distinct-4 | - |" in markdown and "| Zipf exponent of 4-gram frequencies | - |" in markdown


def test_data_report_bad_inputs_end_in_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"story": "A fox."}\n{not json\n')
    result = run("evaluate.py", "--data=nope/stories.jsonl", cwd=tmp_path)
    assert "--data=nope/stories.jsonl does not exist" in one_error_line(result)
    assert "holds no stories" in error_of([f"--data={tmp_path / 'empty.jsonl'}", f"--eval_dir={tmp_path / 'r'}"])
    assert "bad.jsonl line 2: not valid JSON" in error_of([f"--data={tmp_path / 'bad.jsonl'}", f"--eval_dir={tmp_path / 'r'}"])
    assert "--jaccard=0.0 must be in (0, 1]" in error_of([f"--data={SAMPLE}", "--jaccard=0"])
    result = run("evaluate.py", "--data=hf:nobody/nothing", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert one_error_line(result).endswith("or download it and give --data a local folder")  # the flag it has
