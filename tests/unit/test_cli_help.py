"""Every flag in `tokenmill <command> --help` has a one-line help string that states its default, read from the
printed help as a user sees it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import pytest

from tokenmill.config import ENGINE_CONFIG_PARTS
from tokenmill.entrypoints.cli import build_parser, engine_flag_help

_OPTION = re.compile(r"^  (-[^ ].*?)(?: {2,}(.*))?$")  # "  --flag VALUE   help..." (help may start on the next line)
_SECTION = re.compile(r"^(\S.*):$")  # "options:", "engine:", "request limits:"
_HELP_COLUMNS = 100


def help_entries(argv: list[str]) -> dict[str, dict[str, str]]:
    """{section: {option (its first flag): help text}} from the printed `--help` of argv."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    sections: dict[str, dict[str, str]] = {}
    section, option = "", None
    for line in out.getvalue().splitlines():
        if match := _SECTION.match(line):
            section, option = match.group(1), None
        elif match := _OPTION.match(line):
            option = match.group(1).split(",")[0].split(" ")[0]
            sections.setdefault(section, {})[option] = match.group(2) or ""
        elif option is not None and line.startswith(" " * 8) and line.strip():
            entries = sections[section]
            entries[option] = f"{entries[option]} {line.strip()}".strip()
        elif not line.strip():
            option = None
    return sections


def _takes_a_value(option: str, parser_argv: list[str]) -> bool:
    parser = build_parser()
    for name in parser_argv:  # walk down to the subcommand's parser
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[name]
    action = next(a for a in parser._actions if option in a.option_strings)
    return action.nargs != 0


@pytest.mark.parametrize("argv", [["generate"], ["chat"], ["plan"], ["serve"]])
def test_every_flag_has_help_with_its_default(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(_HELP_COLUMNS))
    sections = help_entries(argv)
    options = {opt: text for entries in sections.values() for opt, text in entries.items() if opt != "-h"}
    assert len(options) > 10
    bare = sorted(opt for opt, text in options.items() if not text)
    assert not bare, f"flags without help in `tokenmill {' '.join(argv)} --help`: {bare}"
    no_default = sorted(opt for opt, text in options.items()
                        if _takes_a_value(opt, argv) and "default" not in text)
    assert not no_default, f"flags whose help does not state the default: {no_default}"


@pytest.mark.parametrize("argv", [["generate"], ["serve"], ["bench", "throughput"]])
def test_every_engine_flag_is_listed_with_help_and_default(argv: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(_HELP_COLUMNS))
    engine = help_entries(argv)["engine"]
    fields = [f for part in ENGINE_CONFIG_PARTS.values() for f in dataclasses.fields(part)]
    assert sorted(engine) == sorted("--" + f.name.replace("_", "-") for f in fields)
    for option, text in engine.items():
        assert "default:" in text, (option, text)


def test_engine_flag_help_states_the_config_default() -> None:
    fields = {f.name: f for part in ENGINE_CONFIG_PARTS.values() for f in dataclasses.fields(part)}
    assert engine_flag_help(fields["block_size"]).endswith("(default: 16)")
    assert engine_flag_help(fields["enable_prefix_caching"]).endswith("(default: true)")
    assert engine_flag_help(fields["max_model_len"]).count("default:") == 1  # its text says what None means
