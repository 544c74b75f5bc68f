"""The README's "Embedding in a service" examples run as written (the HTTP one against a
server on loopback, its port substituted)."""

import re
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.server import build_app
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
