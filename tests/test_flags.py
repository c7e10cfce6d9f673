"""Flags: a bad one ends in one line naming it, --help lists them with their defaults under the script's docstring,
and every command the docs show passes only flags its script takes."""

import ast
import os
import re

import pytest

from conftest import REPO, one_error_line, run


@pytest.mark.parametrize("script, flag", [("sample.py", "--step"), ("export.py", "--step"), ("prepare.py", "--val_fraction"),
                                          ("tokenizer.py", "--vocab_size")])
def test_bad_flag_is_one_line_and_help_lists_the_flags(tmp_path, script, flag):
    line = one_error_line(run(script, f"{flag}=abc", cwd=tmp_path))
    assert f"argument {flag}: invalid" in line and f"`python {script} --help` lists the flags" in line
    line = one_error_line(run(script, "--bogus=1", cwd=tmp_path))
    assert "unrecognized arguments: --bogus=1" in line
    result = run(script, "--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {script}"), result.stderr
    assert f"python {script} --" in result.stdout and f"{flag} " in result.stdout and "(default: " in result.stdout


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py", "activations.py", "export.py", "remove_norms.py"])
def test_out_dir_naming_the_checkpoint_file_says_to_give_the_run_folder(tmp_path, script):
    (tmp_path / "out" / "run").mkdir(parents=True)
    (tmp_path / "out" / "run" / "ckpt.pt").write_bytes(b"")
    extra = ["--init_from=resume"] if script == "train.py" else ["--hf_dir=hf/run"] if script == "export.py" else []
    line = one_error_line(run(script, "--out_dir=out/run/ckpt.pt", *extra, cwd=tmp_path))
    assert "out/run/ckpt.pt is a file, not a folder; give the run's folder, the one that holds ckpt.pt" in line


def test_a_help_that_tells_its_default_is_not_given_a_second_one():
    from configurator import Parser

    p = Parser("doc", "x.py")
    p.add_argument("--out", default="", help="where it goes (default: beside the input)")
    p.add_argument("--n", type=int, default=3, help="how many")
    text = " ".join(p.format_help().split())
    assert "where it goes (default: beside the input) --n" in text and "how many (default: 3)" in text


SCRIPTS = ["train.py", "sample.py", "export.py", "prepare.py", "tokenizer.py", "evaluate.py", "activations.py",
           "remove_norms.py", "generate_stories.py"]


def test_every_flag_the_docs_name_is_one_the_script_takes(tmp_path):
    """The commands (python or torchrun, then a script) in README.md, BENCHMARKS.md, quickstart.sh and the scripts'
    docstrings pass only flags their script lists in --help: a renamed flag is renamed there too."""
    taken = {}
    for script in SCRIPTS:
        result = run(script, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        taken[script] = set(re.findall(r"^\s+--(\w+)", result.stdout, re.MULTILINE))
        assert len(taken[script]) >= 3, result.stdout
    texts = {name: open(os.path.join(REPO, name)).read() for name in ("README.md", "BENCHMARKS.md", "quickstart.sh")}
    texts.update({script: ast.get_docstring(ast.parse(open(os.path.join(REPO, script)).read())) for script in SCRIPTS})
    # a command: python or torchrun (with its own flags), then the script
    named = re.compile(r"\b(?:python|torchrun(?: --\S+)*) (" + "|".join(re.escape(s) for s in SCRIPTS) + r")\b")
    wrong, commands = [], 0
    for name, text in texts.items():
        text = text.replace("\\\n", " ")  # a command continued on the next line
        for line in text.splitlines():
            found = list(named.finditer(line))
            for here, after in zip(found, found[1:] + [None]):
                command = re.split(r"[#|`;]|&&", line[here.end():after.start() if after else None])[0]
                commands += 1
                wrong += [f"{name}: {here.group(1)} --{flag}" for flag in re.findall(r"(?<![\w-])--(\w+)", command)
                          if flag not in taken[here.group(1)] and flag != "help"]
    assert not wrong and commands > 50, (wrong, commands)
