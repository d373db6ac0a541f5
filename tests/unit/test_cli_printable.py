"""Unit tests of aund.cli._common.printable / table: text from other processes
and peers never reaches the terminal raw; tests/system/test_local_hostile.py runs `aund status`."""
from hypothesis import given, settings
from hypothesis import strategies as st

from aund.cli._common import printable, table


def test_printable_escapes_controls_and_format_characters_repr_style():
    assert printable("plain ☃ 名字") == "plain ☃ 名字"
    assert printable("a\x1b[2Jb\nc\td\x7f\x9b\u202e\u2028") == "a\\x1b[2Jb\\nc\\td\\x7f\\x9b\\u202e\\u2028"
    assert printable(None) == "None" and printable(3) == "3"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text())
def test_fuzz_printable_output_is_one_line_of_printable_characters(text):
    out = printable(text)
    assert out.isprintable()
    if text.isprintable():
        assert out == text


def test_table_cells_are_escaped_before_widths_are_measured():
    out = table([["evil\x1b[2J\nrow", 1]], ["APP", "N"])
    lines = out.splitlines()
    assert len(lines) == 3 and "\x1b" not in out
    assert lines[2].startswith("evil\\x1b[2J\\nrow")
    assert len(lines[1].split()[0]) == len("evil\\x1b[2J\\nrow")
