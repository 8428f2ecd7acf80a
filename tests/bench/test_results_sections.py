"""bench/RESULTS.md is written by four scripts: each rewrites its own part and keeps the others'."""

from __future__ import annotations

from _common import (DAEMON_HEADING, REPLICATION_HEADING, SCALE_HEADING, write_main_report,
                     write_section)

MAIN = "# p2pbackup vs restic\n\n## Time and size\n\nrestic figures {}\n\n## Method\n\nhow\n"


def section(heading: str, body: str) -> str:
    return f"{heading}\n\n{body}\n\n### Method ({heading[3:].lower()})\n\n- notes\n"


def test_the_restic_report_keeps_every_other_scripts_section_even_without_a_daemon_one(tmp_path):
    out = tmp_path / "RESULTS.md"
    replication, scale = section(REPLICATION_HEADING, "lane 1"), section(SCALE_HEADING, "1M")
    out.write_text(MAIN.format(1) + "\n" + replication + "\n" + scale)

    write_main_report(out, MAIN.format(2))

    assert out.read_text() == MAIN.format(2) + "\n" + replication + "\n" + scale


def test_a_script_replaces_only_its_own_section_or_appends_it(tmp_path):
    out = tmp_path / "RESULTS.md"
    daemon, replication = section(DAEMON_HEADING, "idle"), section(REPLICATION_HEADING, "lane")
    out.write_text(MAIN.format(1) + "\n" + daemon + "\n" + replication)

    write_section(out, SCALE_HEADING, section(SCALE_HEADING, "100k"))
    write_section(out, DAEMON_HEADING, section(DAEMON_HEADING, "busy"))
    write_section(out, SCALE_HEADING, section(SCALE_HEADING, "1M"))
    write_main_report(out, MAIN.format(2))

    assert out.read_text() == "\n".join([MAIN.format(2), section(DAEMON_HEADING, "busy"),
                                         replication, section(SCALE_HEADING, "1M")])


def test_a_section_is_written_into_a_missing_file(tmp_path):
    out = tmp_path / "RESULTS.md"
    write_section(out, SCALE_HEADING, section(SCALE_HEADING, "100k"))
    assert out.read_text() == section(SCALE_HEADING, "100k")
