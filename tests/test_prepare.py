"""prepare.py: the bins decode to exactly their split's stories, the story index gives each story's tokens and
labels, the split is stable, failures leave nothing."""

import hashlib
import json
import os
import re
import runpy
import shutil
import sys

import numpy as np
import pytest
import sentencepiece

import prepare
import tokenizer
from conftest import REPO, SAMPLE, one_error_line, run
from tokenizer import LABELS, Tokenizer, read_stories


def decoded_stories(data_dir, split, tok):
    """Stories of one split, cut from the bin by its index, each checked to be framed BOS ... EOS."""
    tokens = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype="<u2")
    starts = np.fromfile(os.path.join(data_dir, f"{split}.idx"), dtype="<u8").tolist() + [len(tokens)]
    stories = []
    for a, b in zip(starts, starts[1:]):
        ids = tokens[a:b].tolist()
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
        stories.append(tok.decode(ids[1:-1]))
    return stories


@pytest.mark.parametrize("chunk_stories", [4096, 7])  # one write, and many
def test_bins_decode_to_their_split(workdir, tmp_path, chunk_stories):
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    meta = prepare.prepare(SAMPLE, tok.model_file, str(tmp_path), val_fraction=0.1, chunk_stories=chunk_stories)
    expected = {"train": [], "val": []}
    for sid, text in read_stories(SAMPLE):
        expected[prepare.split_of(sid, 0.1)].append(text)
    for split in ("train", "val"):
        assert decoded_stories(tmp_path, split, tok) == expected[split]
        assert meta[split]["stories"] == len(expected[split])
        assert meta[split]["tokens"] * 2 == os.path.getsize(tmp_path / f"{split}.bin")
    assert 15 < meta["val"]["stories"] < 60
    assert meta["vocab_size"] == 4096 and meta["tokenizer_sha256"] == tok.sha256()
    assert json.load(open(tmp_path / "meta.json")) == meta
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_story_index_holds_each_storys_tokens_and_labels(workdir, tmp_path):
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    meta = prepare.prepare(SAMPLE, tok.model_file, str(tmp_path), val_fraction=0.1, chunk_stories=7)
    records = [json.loads(line) for line in open(SAMPLE)]
    assert meta["labels"] == list(LABELS)
    for split in ("train", "val"):
        expected = [r for r in records if prepare.split_of(r["id"], 0.1) == split]
        index = prepare.read_index(str(tmp_path), split)
        assert index["offset"].to_pylist() == np.fromfile(tmp_path / f"{split}.idx", dtype="<u8").tolist()
        start = 0
        for row, record in zip(index.to_pylist(), expected, strict=True):
            n = len(tok.encode(record["story"], bos=True, eos=True))  # re-tokenized: the reference
            assert (row["offset"], row["length"], row["id"]) == (start, n, record["id"])
            assert {k: row[k] for k in LABELS} == {k: record[k] for k in LABELS}
            start += n


def test_story_ranges_match_retokenizing_the_stories(workdir, tmp_path):
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    prepare.prepare(SAMPLE, tok.model_file, str(tmp_path), val_fraction=0.1)
    val = [r for r in map(json.loads, open(SAMPLE)) if prepare.split_of(r["id"], 0.1) == "val"]
    tokens = np.fromfile(tmp_path / "val.bin", dtype="<u2")

    def naive(match):  # token ranges of the matching val stories, found by tokenizing every val story again
        ranges, start = [], 0
        for record in val:
            n = len(tok.encode(record["story"], bos=True, eos=True))
            ranges += [[start, start + n]] if match(record) else []
            start += n
        return ranges

    theme = val[0]["theme"]
    ranges = prepare.story_ranges(str(tmp_path), "val", theme=theme)
    assert ranges.tolist() == naive(lambda r: r["theme"] == theme) and len(ranges) >= 1
    assert [tok.decode(tokens[a:b].tolist()) for a, b in ranges] == [r["story"] for r in val if r["theme"] == theme]
    themes, paragraphs = {val[0]["theme"], val[1]["theme"]}, [2, 3, 4]
    assert prepare.story_ranges(str(tmp_path), "val", theme=sorted(themes), num_paragraphs=paragraphs).tolist() == \
        naive(lambda r: r["theme"] in themes and r["num_paragraphs"] in paragraphs)
    assert prepare.story_ranges(str(tmp_path), "val", persona="").tolist() == naive(lambda r: r["persona"] == "")
    assert len(prepare.story_ranges(str(tmp_path), "val")) == len(val)
    assert len(prepare.story_ranges(str(tmp_path), "val", theme="no such theme")) == 0
    with pytest.raises(ValueError, match=f"label theme has no value {theme.lower()!r}; the val split holds {theme!r}"):
        prepare.story_ranges(str(tmp_path), "val", theme=[theme.lower(), "no such theme"])
    with pytest.raises(ValueError, match="no label 'colour'"):
        prepare.story_ranges(str(tmp_path), "val", colour="red")
    for bad in ("three", 2.5, [3, 2.5], True):  # pyarrow alone would read 2.5 as 2 and True as 1
        with pytest.raises(ValueError, match="label num_paragraphs holds int32 values"):
            prepare.story_ranges(str(tmp_path), "val", num_paragraphs=bad)
    assert prepare.story_ranges(str(tmp_path), "val", num_paragraphs=np.int64(3)).tolist() == \
        naive(lambda r: r["num_paragraphs"] == 3)


def test_story_ranges_never_match_a_story_without_the_label(workdir, tmp_path):
    records = [json.loads(line) for line in open(SAMPLE)][:80]
    theme = max({r["theme"] for r in records}, key=[r["theme"] for r in records].count)
    for i, record in enumerate(records):
        if i % 3 == 0:  # a third of the stories have no theme, some of those of this theme among them
            del record["theme"]
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    prepare.prepare(str(data), tok.model_file, str(tmp_path / "out"), val_fraction=0.1, chunk_stories=9)
    train = [r for r in records if prepare.split_of(r["id"], 0.1) == "train"]
    assert any("theme" not in r for r in train) and any(r.get("theme") == theme for r in train)
    ranges, start = [], 0
    for record in train:
        n = len(tok.encode(record["story"], bos=True, eos=True))
        ranges += [[start, start + n]] if record.get("theme") == theme else []
        start += n
    assert prepare.story_ranges(str(tmp_path / "out"), "train", theme=theme).tolist() == ranges
    assert prepare.story_ranges(str(tmp_path / "out"), "train", theme=[theme, "no such theme"]).tolist() == ranges


def test_stories_without_labels_and_labels_of_the_wrong_type(workdir, tmp_workdir):
    stories = [t for _, t in read_stories(SAMPLE)][:60]
    text = tmp_workdir / "stories.txt"
    text.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    meta = prepare.prepare(str(text), str(workdir / "tokenizers" / "sample.model"), str(tmp_workdir / "text"), val_fraction=0.2)
    index = prepare.read_index(str(tmp_workdir / "text"), "train")
    assert meta["labels"] == [] and all(index[k].null_count == index.num_rows for k in LABELS)
    bad = tmp_workdir / "bad.jsonl"
    bad.write_bytes(b"".join(good_lines()) + b'{"story": "A fox.", "num_paragraphs": "three"}\n')
    result = run("prepare.py", f"--input={bad}", "--tokenizer=tokenizers/sample.model", cwd=tmp_workdir)
    assert "line 41: label num_paragraphs is 'three', not a whole number" in one_error_line(result)
    bad.write_bytes(b"".join(good_lines()) + b'{"story": "A fox.", "num_paragraphs": 10000000000}\n')  # past int32
    result = run("prepare.py", f"--input={bad}", "--tokenizer=tokenizers/sample.model", cwd=tmp_workdir)
    assert "line 41: label num_paragraphs is 10000000000, not a whole number from 0 to" in one_error_line(result)


def test_split_is_stable_as_the_corpus_grows():
    ids = [f"story-{i}" for i in range(2000)]
    before = {i: prepare.split_of(i, 0.05) for i in ids[:1000]}
    assert all(prepare.split_of(i, 0.05) == s for i, s in before.items())
    assert 0.03 < sum(prepare.split_of(i, 0.05) == "val" for i in ids) / 2000 < 0.07


def test_split_follows_the_rule_meta_json_states(workdir):
    meta = json.load(open(workdir / "data" / "sample" / "meta.json"))
    assert meta["split"] == "val if int.from_bytes(sha256(id)[:8], 'little') < val_fraction * 2**64, else train"

    def rule(story_id):  # the rule as meta.json states it
        h = int.from_bytes(hashlib.sha256(story_id.encode("utf-8")).digest()[:8], "little")
        return "val" if h < meta["val_fraction"] * 2**64 else "train"

    ids = [json.loads(line)["id"] for line in open(SAMPLE)]
    for split in ("train", "val"):
        assert prepare.read_index(str(workdir / "data" / "sample"), split)["id"].to_pylist() == [i for i in ids if rule(i) == split]
    more = [f"story-{i}" for i in range(500)]
    assert [prepare.split_of(i, 0.3) for i in more] == [
        "val" if int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "little") < 0.3 * 2**64 else "train" for i in more]


def test_large_vocab_is_refused(workdir, tmp_path, monkeypatch):
    class Huge(Tokenizer):
        def __init__(self, model_file):
            super().__init__(model_file)
            self.vocab_size = 65536

    monkeypatch.setattr(prepare, "Tokenizer", Huge)
    with pytest.raises(ValueError, match="uint16"):
        prepare.prepare(SAMPLE, str(workdir / "tokenizers" / "sample.model"), str(tmp_path))
    assert os.listdir(tmp_path) == []


def good_lines():
    return open(SAMPLE, "rb").read().splitlines(keepends=True)[:40]


@pytest.mark.parametrize("bad_line, message", [
    (b"{not json\n", "line 41: not valid JSON"),
    (b'{"id": "x", "text": "no story key"}\n', "line 41: record has no text field 'story'"),
    (b'{"story": "caf\xe9"}\n', "line 41: not UTF-8"),
])
def test_bad_input_leaves_the_old_output_intact(tmp_workdir, bad_line, message):
    out = tmp_workdir / "data" / "sample"
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    bad = out / "bad.jsonl"
    bad.write_bytes(b"".join(good_lines()) + bad_line + b"".join(good_lines()))
    result = run("prepare.py", f"--input={bad}", "--tokenizer=tokenizers/sample.model", f"--data_dir={out}", cwd=tmp_workdir)
    assert message in one_error_line(result)
    bad.unlink()
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before  # nothing new, nothing half-written


def test_missing_input_and_tokenizer(tmp_workdir):
    result = run("prepare.py", "--input=data/nope.jsonl", "--tokenizer=tokenizers/sample.model", cwd=tmp_workdir)
    assert "does not exist" in one_error_line(result)
    result = run("prepare.py", "--input=data/sample/stories.jsonl", "--tokenizer=tokenizers/none.model", cwd=tmp_workdir)
    assert "tokenizer.py" in one_error_line(result)
    (tmp_workdir / "empty.jsonl").write_text("\n")
    result = run("prepare.py", "--input=empty.jsonl", "--tokenizer=tokenizers/sample.model", "--data_dir=data/empty",
                 cwd=tmp_workdir)
    assert "no stories went to train" in one_error_line(result) and not (tmp_workdir / "data" / "empty").exists()


def test_val_input_makes_val_whole(workdir, tmp_path):
    lines = open(SAMPLE).readlines()
    (tmp_path / "train.jsonl").write_text("".join(lines[:300]))
    (tmp_path / "test.jsonl").write_text("".join(lines[300:]))
    tok = Tokenizer(str(workdir / "tokenizers" / "sample.model"))
    meta = prepare.prepare(str(tmp_path / "train.jsonl"), tok.model_file, str(tmp_path / "out"),
                           val_input=str(tmp_path / "test.jsonl"))
    for split, file in (("train", "train.jsonl"), ("val", "test.jsonl")):
        assert decoded_stories(tmp_path / "out", split, tok) == [t for _, t in read_stories(str(tmp_path / file))]
    assert meta["val_input"] == str(tmp_path / "test.jsonl") and meta["val_fraction"] is None
    # a folder --input that holds the --val_input file: its stories would be in train.bin too
    with pytest.raises(ValueError, match=r"test.jsonl is in both --input=.* and --val_input=.*: move the val stories"):
        prepare.prepare(str(tmp_path), tok.model_file, str(tmp_path / "out2"), val_input=str(tmp_path / "test.jsonl"))
    assert not (tmp_path / "out2").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(workdir, tmp_path):
    import resource
    import subprocess

    def small_files():  # a file may grow to 50 KB, and train.bin is larger: the write fails as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), f"--input={SAMPLE}", "--data_dir=out",
                             f"--tokenizer={workdir / 'tokenizers' / 'sample.model'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, preexec_fn=small_files)
    assert "cannot write the bins" in one_error_line(result) and "choose another --data_dir" in result.stderr
    assert not (tmp_path / "out").exists()


def hub_cache(root, repo_id, shards):
    """A Hugging Face hub cache holding a dataset snapshot laid out as the hub lays out parquet datasets;
    with HF_HUB_OFFLINE=1, huggingface_hub's snapshot_download finds it there instead of downloading."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    repo = root / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for name, stories in shards.items():
        path = repo / "snapshots" / "0123abcd" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"story": stories, "theme": ["x"] * len(stories)}), path)
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def test_hub_dataset_keeps_its_own_test_split(tmp_path):
    stories = [t for _, t in read_stories(SAMPLE)]
    env = hub_cache(tmp_path / "hub", "SimpleStories/SimpleStories", {
        "data/train-00000-of-00002.parquet": stories[:150], "data/train-00001-of-00002.parquet": stories[150:320],
        "data/test-00000-of-00001.parquet": stories[320:]})
    result = run("tokenizer.py", "--input=hf:SimpleStories/SimpleStories", "--vocab_size=2048", cwd=tmp_path, env=env)
    assert result.returncode == 0 and "tokenizers/simplestories.model" in result.stdout, result.stderr
    result = run("prepare.py", "--input=hf:SimpleStories/SimpleStories", "--tokenizer=tokenizers/simplestories.model",
                 cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    tok = Tokenizer(str(tmp_path / "tokenizers" / "simplestories.model"))
    out = tmp_path / "data" / "simplestories"
    assert decoded_stories(out, "train", tok) == stories[:320] and decoded_stories(out, "val", tok) == stories[320:]
    meta = json.load(open(out / "meta.json"))
    assert meta["val_input"] == "hf:SimpleStories/SimpleStories:test"
    line = one_error_line(run("prepare.py", "--input=hf:Nobody/Nothing", "--tokenizer=tokenizers/simplestories.model",
                              cwd=tmp_path, env=env))
    assert "cannot get dataset Nobody/Nothing from the Hugging Face hub" in line
    line = one_error_line(run("tokenizer.py", "--input=hf:SimpleStories/SimpleStories:validation", cwd=tmp_path, env=env))
    assert "has no split 'validation' (it has test, train)" in line


def test_not_a_tokenizer_and_a_data_dir_that_cannot_be_made(tmp_workdir):
    (tmp_workdir / "notes.md").write_text("# not a model\n")
    result = run("prepare.py", "--tokenizer=notes.md", cwd=tmp_workdir)
    assert "notes.md is not a sentencepiece model" in one_error_line(result)
    result = run("prepare.py", "--tokenizer=tokenizers/sample.model", "--data_dir=notes.md/bins", cwd=tmp_workdir)
    assert "cannot write to --data_dir=notes.md/bins" in one_error_line(result)


@pytest.mark.parametrize("script", ["prepare.py", "tokenizer.py"])
def test_ctrl_c_ends_in_one_line(workdir, tmp_path, monkeypatch, script):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # Ctrl-C while prepare.py tokenizes or tokenizer.py trains
    monkeypatch.setattr(tokenizer, "Tokenizer", interrupted)
    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", interrupted)
    monkeypatch.setattr(sys, "argv", [script, f"--input={SAMPLE}", f"--tokenizer={workdir}/tokenizers/sample.model",
                                      f"--data_dir={tmp_path}"] if script == "prepare.py" else
                        [script, f"--input={SAMPLE}", "--name=t"])
    monkeypatch.chdir(tmp_path)  # tokenizer.py writes tokenizers/t.model
    with pytest.raises(SystemExit, match="^error: interrupted: run the same command again"):
        runpy.run_path(os.path.join(os.path.dirname(prepare.__file__), script), run_name="__main__")
    assert [f for _, _, files in os.walk(tmp_path) for f in files] == []  # no file, whole or half-written


def test_open_bins_refuses_bins_that_do_not_match_their_meta(workdir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(workdir / "data" / "sample", data)
    meta, bins = prepare.open_bins(str(data))
    assert [len(bins[s]) for s in prepare.SPLITS] == [meta[s]["tokens"] for s in prepare.SPLITS]
    assert all(meta[s]["sha256"] == hashlib.sha256((data / f"{s}.bin").read_bytes()).hexdigest() for s in prepare.SPLITS)
    val = (data / "val.bin").read_bytes()
    for broken, message in [
        (lambda: (data / "val.bin").write_bytes(val[:-2]), f"val.bin is missing or does not match {data}/meta.json ("),
        (lambda: (data / "val.bin").write_bytes(val[:-2] + b"\xff\xff"), "val.bin holds token id 65535, not below vocab_size"),
        (lambda: (data / "meta.json").write_bytes(b"\xff{"), "meta.json is not valid JSON"),
        (lambda: (data / "meta.json").write_text(json.dumps({**meta, "val": {"tokens": "7"}})), "lacks keys that prepare.py writes"),
        (lambda: (data / "meta.json").unlink(), "meta.json is missing; run prepare.py"),
    ]:
        broken()
        with pytest.raises(ValueError, match=re.escape(message)):
            prepare.open_bins(str(data))
        (data / "val.bin").write_bytes(val)
        (data / "meta.json").write_text(json.dumps(meta))
