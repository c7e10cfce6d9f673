"""tokenizer.py: lossless on the sample and on awkward text, cheap paragraph breaks, clear refusals."""

import json
import shutil

import pytest

from conftest import SAMPLE, one_error_line, run
from tokenizer import TEXT_SEPARATOR, Tokenizer, input_files, read_stories, train

AWKWARD = [
    "\u201cCurly quotes,\u201d she said \u2014 and \u2018single\u2019 ones\u2026",
    "Caf\u00e9, na\u00efve, \u00c5ngstr\u00f6m, se\u00f1or, \u0141\u00f3d\u017a, \u4e2d\u6587, \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "Emoji \U0001F600\U0001F43B\u200d\u2744\ufe0f and a flag \U0001F1EB\U0001F1F7",
    "tabs\tin\t\tthe middle\t",
    "runs of     spaces   and  ",
    "   leading spaces",
    "Windows line\r\nendings\r\n\r\nand a lone \r",
    "\n\nstarts with a break\n\n\n\nand two more\n",
    "sentencepiece's own space symbol \u2581 and \u2581\u2581 twice",
    "control \x00 \x1b[0m and byte-looking text <0x41> <s> </s> <unk>",
    "",
    " ",
    "DIGITS 1234567890 and 3.14159",
]


@pytest.fixture(scope="module")
def tok(workdir):
    return Tokenizer(str(workdir / "tokenizers" / "sample.model"))


def test_default_vocab_and_special_ids(tok):
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.encode("Hi", bos=True, eos=True)[0] == tok.bos_id and tok.encode("Hi", eos=True)[-1] == tok.eos_id


def test_round_trip_on_every_sample_story(tok):
    stories = [text for _, text in read_stories(SAMPLE)]
    assert len(stories) >= 300
    for text, ids in zip(stories, tok.encode_many(stories)):
        assert tok.decode(ids) == text
        assert ids == tok.encode(text)


@pytest.mark.parametrize("text", AWKWARD)
def test_round_trip_on_awkward_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.sp.unk_id() not in ids
    assert tok.encode_many([text, text]) == [ids, ids]


def test_paragraph_break_costs_at_most_two_tokens(tok):
    a, b = "The cat slept.", "Then it woke up."
    assert len(tok.encode(a + "\n\n" + b)) - len(tok.encode(a)) - len(tok.encode(b)) <= 2


def test_token_bytes_add_up_to_the_text(tok):
    sizes = tok.token_bytes()
    for text in AWKWARD + [text for _, text in list(read_stories(SAMPLE))[:20]]:
        assert sum(sizes[i] for i in tok.encode(text, bos=True, eos=True)) == len(text.encode("utf-8"))


def test_compresses_the_sample(tok):
    text = "\n\n".join(t for _, t in list(read_stories(SAMPLE))[:50])
    assert len(text) / len(tok.encode(text)) > 3.0  # bytes per token: whole words, not characters


def test_too_small_corpus_names_the_largest_vocab(tmp_path):
    corpus = tmp_path / "tiny.jsonl"
    corpus.write_text(json.dumps({"story": "A cat sat on a mat. The cat was happy."}) + "\n")
    with pytest.raises(ValueError, match=r"largest vocab it supports is \d+"):
        train(str(corpus), str(tmp_path / "t.model"), vocab_size=4096)
    assert not (tmp_path / "t.model").exists()
    result = run("tokenizer.py", f"--input={corpus}", "--vocab_size=4096", cwd=tmp_path)
    assert "--vocab_size=" in one_error_line(result)


def test_reads_parquet_and_text(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stories = ["One day a fox ran.\n\nIt was fast.", "The sun was hot."]
    pq.write_table(pa.table({"story": stories, "theme": ["a", "b"]}), tmp_path / "shard.parquet")
    (tmp_path / "stories.txt").write_text("<|endoftext|>\n".join(s + "\n" for s in stories))
    assert [t for _, t in read_stories(str(tmp_path / "shard.parquet"))] == stories
    assert [t for _, t in read_stories(str(tmp_path / "stories.txt"))] == stories
    assert len(list(read_stories(str(tmp_path)))) == 4  # a folder: every file in it
    # a byte order mark and CRLF line ends, as Windows editors write them, are not part of the text
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbf" + "<|endoftext|>\r\n".join(s + "\r\n" for s in stories)
                                           .replace("\n\n", "\r\n\r\n").encode())
    assert [t for _, t in read_stories(str(tmp_path / "windows.txt"))] == stories
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + open(SAMPLE, "rb").read())
    assert list(read_stories(str(tmp_path / "bom.jsonl"))) == list(read_stories(SAMPLE))
    pq.write_table(pa.table({"story": [1, 2]}), tmp_path / "numbers.parquet")
    with pytest.raises(ValueError, match="numbers.parquet: column 'story' holds int64, not strings"):
        list(read_stories(str(tmp_path / "numbers.parquet")))


def test_a_folder_of_stories_leaves_out_what_the_pipeline_writes_beside_them(workdir, tmp_path):
    shutil.copy(SAMPLE, tmp_path / "stories.jsonl")
    (tmp_path / "stories.jsonl.dropped.jsonl").write_text('{"prompt_id": 3, "reason": "no story"}\n')
    tokenizer = str(workdir / "tokenizers" / "sample.model")
    for _ in range(2):  # the second run finds the first one's story index in the folder
        result = run("prepare.py", f"--input={tmp_path}", f"--tokenizer={tokenizer}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert json.load(open(tmp_path / "meta.json"))["val"]["stories"] + json.load(open(tmp_path / "meta.json"))[
        "train"]["stories"] == 350
    # a glob leaves them out too
    assert input_files(str(tmp_path / "*.jsonl")) == [str(tmp_path / "stories.jsonl")]
    with pytest.raises(ValueError, match="no input files match"):  # train.stories.parquet and val.stories.parquet
        input_files(str(tmp_path / "*.parquet"))


def test_a_file_or_folder_whose_name_looks_like_a_glob_is_that_file_or_folder(tmp_path):
    lines = open(SAMPLE).readlines()
    (tmp_path / "my[v2].jsonl").write_text("".join(lines[:40]))
    (tmp_path / "myv.jsonl").write_text("".join(lines[:3]))  # what the pattern my[v2].jsonl matches
    assert len(list(read_stories(str(tmp_path / "my[v2].jsonl")))) == 40
    (tmp_path / "run[1]").mkdir()
    (tmp_path / "run[1]" / "stories.jsonl").write_text("".join(lines[:5]))
    assert len(list(read_stories(str(tmp_path / "run[1]")))) == 5


def test_ids_and_labels_as_other_writers_store_them(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # an id of 0 is that id, not a hash of the text
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"id": i, "story": f"Story {i}."}) + "\n" for i in range(3)))
    assert [sid for sid, _ in read_stories(str(tmp_path / "ids.jsonl"))] == ["0", "1", "2"]
    pq.write_table(pa.table({"id": [0, 1], "story": ["A.", "B."]}), tmp_path / "ids.parquet")
    assert [sid for sid, _ in read_stories(str(tmp_path / "ids.parquet"))] == ["0", "1"]
    # pandas writes an int column with a null as floats: 3.0 is 3
    pq.write_table(pa.table({"story": ["A.", "B."], "num_paragraphs": [3.0, None]}), tmp_path / "floats.parquet")
    assert [labels for *_, labels in read_stories(str(tmp_path / "floats.parquet"), labels=True)] == [
        {"num_paragraphs": 3}, {}]
    pq.write_table(pa.table({"story": ["A."], "num_paragraphs": [2.5]}), tmp_path / "half.parquet")
    with pytest.raises(ValueError, match="label num_paragraphs is 2.5, not a whole number"):
        list(read_stories(str(tmp_path / "half.parquet"), labels=True))


def test_a_blank_story_is_skipped_in_every_format(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"story": s, "theme": "Joy"}) + "\n" for s in ["A.", "", " \n\n ", "B."]))
    pq.write_table(pa.table({"story": ["A.", "", None, "\t", "B."]}), tmp_path / "s.parquet")
    (tmp_path / "s.txt").write_text(f"A.\n{TEXT_SEPARATOR}\n  \n{TEXT_SEPARATOR}\nB.\n{TEXT_SEPARATOR}\n \n")
    for name in ("s.jsonl", "s.parquet", "s.txt"):
        assert [text for _, text, _ in read_stories(str(tmp_path / name), labels=True)] == ["A.", "B."], name


def test_a_file_that_fails_while_it_is_read_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "s.jsonl").write_text(open(SAMPLE).read())
    real_open = open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith("s.jsonl"):
            raise OSError(5, "Input/output error")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(ValueError, match=r"s.jsonl: cannot read it \(Input/output error\); check the file"):
        list(read_stories(str(tmp_path / "s.jsonl")))


def test_a_sentencepiece_model_without_bos_or_eos(tmp_path):
    import io

    import sentencepiece as spm

    text = open(SAMPLE).read()
    for bos, eos, name in ((-1, 2, "nobos"), (1, -1, "noeos")):
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=proto, vocab_size=300,
                                       unk_id=0, bos_id=bos, eos_id=eos, pad_id=-1, minloglevel=2)
        (tmp_path / f"{name}.model").write_bytes(proto.getvalue())
    tok = Tokenizer(str(tmp_path / "nobos.model"))  # a story starts after EOS, as with the WordPiece tokenizers
    assert tok.bos_id == tok.eos_id >= 0 and tok.encode("Hi", bos=True)[0] == tok.eos_id
    with pytest.raises(ValueError, match="noeos.model has no end-of-text piece"):
        Tokenizer(str(tmp_path / "noeos.model"))


@pytest.mark.parametrize("bad_line, message", [(b"{not json\n", "line 41: not valid JSON"),
                                               (b'{"story": "caf\xe9"}\n', "line 41: not UTF-8"),
                                               (b'{"story": "half \\ud800 a pair"}\n', "line 41: its story or id holds a lone surrogate")])
def test_bad_input_is_one_clear_line(tmp_path, bad_line, message):
    lines = open(SAMPLE, "rb").read().splitlines(keepends=True)
    corpus = tmp_path / "bad.jsonl"
    corpus.write_bytes(b"".join(lines[:40]) + bad_line + b"".join(lines[40:]))
    assert message in one_error_line(run("tokenizer.py", f"--input={corpus}", cwd=tmp_path))
    assert not (tmp_path / "tokenizers").exists()
    assert "below 65536" in one_error_line(run("tokenizer.py", f"--input={SAMPLE}", "--vocab_size=70000", cwd=tmp_path))


def test_empty_input_too_small_a_vocab_and_no_room_for_the_model(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert "holds no stories" in one_error_line(run("tokenizer.py", "--input=empty.jsonl", cwd=tmp_path))
    # sentencepiece skips a paragraph over 64 KB: a corpus of only those has nothing it can train on
    (tmp_path / "walls.jsonl").write_text(json.dumps({"story": " ".join(["word"] * 20_000)}) + "\n")
    line = one_error_line(run("tokenizer.py", "--input=walls.jsonl", cwd=tmp_path))
    assert "every paragraph of walls.jsonl is longer than 65,536 bytes" in line
    line = one_error_line(run("tokenizer.py", f"--input={SAMPLE}", "--vocab_size=10", cwd=tmp_path))
    assert "vocab_size=10 is too small: this input needs at least" in line
    (tmp_path / "tokenizers").write_text("a file where the folder would go")
    line = one_error_line(run("tokenizer.py", f"--input={SAMPLE}", cwd=tmp_path))
    assert "cannot write tokenizers/sample.model" in line and "is a file, not a folder" in line


def test_corrupt_parquet_is_one_line_naming_the_file(workdir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stories = [t for _, t in read_stories(SAMPLE)]
    pq.write_table(pa.table({"story": stories}), tmp_path / "whole.parquet", compression="none", row_group_size=100)
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[:len(data) // 2])  # no footer: found on opening it
    footer = int.from_bytes(data[-8:-4], "little") + 8
    middle = len(data) // 2  # the footer kept, a row group's page header overwritten: found on reading that row group
    (tmp_path / "torn.parquet").write_bytes(data[:middle] + b"\xff" * 4096 + data[middle + 4096:])
    assert middle + 4096 < len(data) - footer
    for name in ("cut.parquet", "torn.parquet"):
        with pytest.raises(ValueError, match=f"{name}: not a readable parquet file"):
            list(read_stories(str(tmp_path / name)))
    line = one_error_line(run("tokenizer.py", "--input=cut.parquet", cwd=tmp_path))
    assert "cut.parquet: not a readable parquet file" in line
    line = one_error_line(run("prepare.py", "--input=cut.parquet", f"--tokenizer={workdir / 'tokenizers' / 'sample.model'}",
                              cwd=tmp_path))
    assert "cut.parquet: not a readable parquet file" in line
