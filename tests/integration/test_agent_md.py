"""Apps read and replace an AID's agent.md through the stub and `aund aid agent-md`
(real `aund run` and `aund devnet` processes); fastaun, as a peer in its own process, accepts the
replaced card; documents that do not validate are refused, naming the field, and the published
card stays."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from aund.identity import agent_md, pki
from client_stub import Client, InvalidParams
from tests.helpers import ROOT, run_fastaun

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def daemon(aund_on_devnet):
    aid = f"card-{os.getpid() % 100000}.aid.test"
    proc = aund_on_devnet([aid])
    proc.aid = aid
    with Client(str(proc.socket), connect_timeout=30) as app:
        app.ensure_identity(aid)
        app.session(aid).wait_ready(timeout=60)  # connected: the default card is published
    return proc


def _cert(devnet, aid):
    with urllib.request.urlopen(f"{devnet.http_url}/pki/cert/{aid}", timeout=5) as r:
        return pki.load_cert_pem(r.read())


def _etag(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest() + '"'


CARD = """---
aid: "{aid}"
name: "Card Bot"
type: "agent"
version: "1.2.0"
description: "answers questions about cards"
tags: ["cards", "test"]
---

# Card Bot

Ask me about cards.
"""


def test_get_returns_the_published_card_and_set_replaces_it_as_fastaun_reads_it(devnet, daemon, tmp_path):
    aid = daemon.aid
    with Client(str(daemon.socket)) as app:
        first = app.agent_md(aid)
        assert first["aid"] == aid and first["content"].startswith(f'---\naid: "{aid}"\nname: "card-')
        assert first["etag"] == _etag(first["content"])
        agent_md.validate(first["content"], aid=aid, cert=_cert(devnet, aid))  # signed, as the devnet checked
        text = CARD.format(aid=aid)
        stale = text + agent_md.MARKER + first["content"].partition(agent_md.MARKER)[2]  # an old block: dropped
        done = app.set_agent_md(aid, stale)
        assert agent_md.payload_of(done["content"]) == text and done["etag"] == _etag(done["content"])
        now = app.agent_md(aid)
        assert (now["content"], now["etag"]) == (done["content"], done["etag"])
    checked = agent_md.validate(now["content"], aid=aid, cert=_cert(devnet, aid))
    assert checked.front["tags"] == ["cards", "test"]
    run_fastaun("", devnet, tmp_path / "fa", driver="fastaun_agent_md_driver.py", PEER_AID=aid, EXPECT_NAME="Card Bot")


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda t: t.replace('aid: "{aid}"\n', ""), "aid", "lacks aid"),
    (lambda t: t.replace('aid: "{aid}"', 'aid: "someone-else.aid.test"'), "aid", "is not"),
    (lambda t: t.replace("answers questions about cards", "x" * 101), "description", "101 characters; at most 100"),
    (lambda t: t + "y" * 4096 + "\n", "payload", "larger than 4096"),
    (lambda t: t.replace('version: "1.2.0"', "version: 1.2"), "version", "MAJOR.MINOR.PATCH"),
    (lambda t: t.rstrip("\n"), "payload", "newline"),
])
def test_documents_that_do_not_validate_are_refused_and_the_card_stays(daemon, change, field, words):
    aid = daemon.aid
    with Client(str(daemon.socket)) as app:
        before = app.agent_md(aid)
        with pytest.raises(InvalidParams) as caught:
            app.set_agent_md(aid, change(CARD).format(aid=aid))
        assert words in caught.value.message and caught.value.message.startswith("agent.md: ")
        assert caught.value.data["field"] == field and caught.value.retryable is False
        assert app.agent_md(aid) == before


def aund(*args: str, stdin: str | None = None):
    return subprocess.run([sys.executable, "-m", "aund", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, input=stdin)


def test_the_cli_prints_and_replaces_the_card(daemon, tmp_path):
    aid, sock = daemon.aid, str(daemon.socket)
    shown = aund("aid", "agent-md", aid, "--socket", sock)
    assert shown.returncode == 0 and shown.stdout.startswith(f'---\naid: "{aid}"') and agent_md.MARKER in shown.stdout
    card = tmp_path / "card.md"
    card.write_text(CARD.format(aid=aid))
    r = aund("aid", "agent-md", aid, "--set", str(card), "--socket", sock)
    assert r.returncode == 0 and r.stdout.startswith(f"published the agent.md of {aid}  etag \"")
    shown = aund("aid", "agent-md", aid, "--socket", sock)
    assert agent_md.payload_of(shown.stdout) == CARD.format(aid=aid)
    for path, words in ((tmp_path / "missing.md", "does not exist"), (tmp_path, "is a directory")):
        r = aund("aid", "agent-md", aid, "--set", str(path), "--socket", sock)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert str(path) in r.stderr and words in r.stderr
    card.write_text(CARD.format(aid="someone-else.aid.test"))
    r = aund("aid", "agent-md", aid, "--set", str(card), "--socket", sock)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert str(card) in r.stderr and "InvalidParams" in r.stderr and f"is not {aid}" in r.stderr
    r = aund("aid", "agent-md", aid, "--set", "-", "--socket", sock, stdin=CARD.format(aid=aid).replace("1.2.0", "1.3.0"))
    assert r.returncode == 0
    assert 'version: "1.3.0"' in aund("aid", "agent-md", aid, "--socket", sock).stdout


def test_concurrent_replacements_all_succeed_and_the_last_one_is_published(daemon):
    """Five apps replace the card at once: each upload is conditional (If-Match), none is lost to a
    412, and the card published afterwards is one of theirs, whole."""
    aid = daemon.aid
    texts = [CARD.format(aid=aid).replace("Ask me about cards.", f"Version {i}.") for i in range(5)]

    def replace(text):
        with Client(str(daemon.socket)) as app:
            return app.set_agent_md(aid, text)

    with ThreadPoolExecutor(5) as pool:
        done = list(pool.map(replace, texts))
    with Client(str(daemon.socket)) as app:
        now = app.agent_md(aid)
    assert all(d["etag"] == _etag(d["content"]) for d in done)
    assert now["content"] in [d["content"] for d in done] and agent_md.payload_of(now["content"]) in texts
