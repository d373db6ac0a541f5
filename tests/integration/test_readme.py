"""The README's app guide, run as written: each ```python block of it, in order, in its own
process, against a real daemon (AUND_SOCKET) on a real devnet. A block that stops working
(renamed API, an invalid AID, a missing await) fails here before a newcomer finds it."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, AundProcess

pytestmark = pytest.mark.timeout(120)


def _guide() -> str:
    text = (ROOT / "README.md").read_text()
    guide = text[text.index("## App developers' guide"):]
    return guide[:guide.index("\n## ", 5)]


def _blocks() -> list[str]:
    """The whole programs: ```python blocks fenced at the start of a line (indented ones, inside a
    list item, are fragments that use a session `s`; they are only compiled)."""
    return re.findall(r"^```python\n(.*?)^```", _guide(), flags=re.S | re.M)


def test_the_readme_fragments_compile():
    fragments = re.findall(r"^( +)```python\n(.*?)^\1```", _guide(), flags=re.S | re.M)
    assert fragments
    for indent, body in fragments:
        compile(textwrap.dedent(body), "README.md", "exec")


def test_the_readme_app_guide_runs_as_written(devnet, tmp_path):
    blocks = _blocks()
    assert len(blocks) == 2  # the blocking and the asyncio example
    cfg = tmp_path / "aund.toml"
    cfg.write_text(f'gateway_url = ["{devnet.gateway_url}"]\nroot_ca = ["{devnet.root_ca}"]\n')
    daemon = AundProcess(tmp_path / "state", tmp_path / "aund.sock", cfg)
    daemon.start()
    try:
        outputs = []
        for block in blocks:
            r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                               timeout=90, env=dict(os.environ, AUND_SOCKET=str(daemon.socket), PYTHONPATH=str(ROOT)))
            assert r.returncode == 0, (block, r.stderr[-3000:])
            outputs.append(r.stdout.splitlines())
    finally:
        daemon.stop()
    hi = {"type": "text", "text": "hi"}
    sender, payload, header = outputs[0][1].split(" ", 1)[0], *outputs[0][1].split(" ", 1)[1].rsplit(" ", 1)
    assert outputs[0][0].startswith("delivered ") and sender == "alice-agent.aid.test"
    assert ast.literal_eval(payload) == hi and header == "my-agent"
    assert outputs[1][0] == "delivered"
    assert ast.literal_eval(outputs[1][1]) == hi  # a new consumer reads from the start
