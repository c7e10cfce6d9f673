"""The scripts that take --key=value flags only: a bad flag ends in one line naming it, and --help lists the flags
with their defaults under the script's docstring."""

import pytest

from conftest import one_error_line, run


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


def test_a_help_that_tells_its_default_is_not_given_a_second_one():
    from configurator import Parser

    p = Parser("doc", "x.py")
    p.add_argument("--out", default="", help="where it goes (default: beside the input)")
    p.add_argument("--n", type=int, default=3, help="how many")
    text = " ".join(p.format_help().split())
    assert "where it goes (default: beside the input) --n" in text and "how many (default: 3)" in text
