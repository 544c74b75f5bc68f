"""The README's "Embedding in a service" examples run as written (the HTTP one against a
server on loopback, its port substituted)."""

import re
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.entrypoints.server import build_app
from tests.serving import LoopbackServer

README = Path(__file__).resolve().parent.parent / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    section = text.split("## Embedding in a service", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_examples_run(capsys):
    blocking, streaming, http = _examples()
    exec(compile(blocking, "README:blocking", "exec"), {})
    exec(compile(streaming, "README:streaming", "exec"), {})
    out = capsys.readouterr().out
    assert "stop" in out or "length" in out
    with LoopbackServer(build_app(AsyncEngine(Engine("default")), "SmolLM2-135M-Instruct")) as srv:
        code = http.replace("http://127.0.0.1:8000", srv.url)
        exec(compile(code, "README:http", "exec"), {})
    assert capsys.readouterr().out.strip()


def test_every_cli_flag_says_what_it_does_and_its_default():
    """Every flag of every command has a description; those with a default show it; no help
    text names a path of this machine; a bare `medusa-engine` prints the commands (exit 2)."""
    import argparse
    import contextlib
    import io
    from pathlib import Path

    from engine.entrypoints import cli

    parsers = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):  # main() builds its parsers, then parses: keep them
        parsers["main"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.suppress(SystemExit):
            cli.main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in parsers["main"]._actions if isinstance(a, argparse._SubParsersAction))
    home = str(Path(__file__).resolve().parent.parent.parent)
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            bare = (action.help or "").strip()
            assert bare and not bare.startswith(("(default", "default:")), (name, action.dest, bare)
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                assert "default" in text, (name, action.dest, text)
            assert home not in text, (name, action.dest, text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main([]) == 2
    assert "serve" in err.getvalue() and "train-heads" in err.getvalue()
