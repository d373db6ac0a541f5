"""fastaun 0.5.25 (subprocess) on a `--pki production` devnet process."""
from __future__ import annotations

import pytest

from tests.helpers import run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def test_e2ee_and_plain_both_ways_on_production_pki(prod_devnet, tmp_path):
    run_fastaun("both_ways", prod_devnet, tmp_path / "sdk")
    assert prod_devnet.stats()["rpc_errors"] == {}


def test_unsigned_echo_plaintext_both_ways(prod_devnet, tmp_path):
    lines = run_fastaun("echo_both_ways", prod_devnet, tmp_path / "sdk", driver="fastaun_prod_driver.py")
    assert sum(1 for c in lines if c.get("check", "").startswith("received echo")) == 2
    assert prod_devnet.stats()["rpc_errors"] == {}


def test_a_fresh_fastaun_reader_refuses_a_revoked_sender(prod_devnet, tmp_path):
    """alice (fastaun) sends bob E2EE messages, is revoked by the devnet's CLI, sends once more on her
    open connection; a fresh fastaun bob must not deliver any of her messages as plaintext."""
    import json
    import os
    import subprocess
    import sys
    import time

    from tests.helpers import ROOT

    work = tmp_path / "sdk"
    work.mkdir()
    env = dict(os.environ, AUN_GW_URL=prod_devnet.gateway_url, AUN_ROOT_CA=prod_devnet.root_ca, AUN_WORKDIR=str(work))
    driver = str(ROOT / "tests" / "interop" / "fastaun_prod_driver.py")
    sender = subprocess.Popen([sys.executable, driver, "revoke_send"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (work / "ids.json").exists():
            assert sender.poll() is None and time.monotonic() < deadline, sender.communicate(timeout=5)
            time.sleep(0.05)
        alice = json.loads((work / "ids.json").read_text())["alice"]
        done = subprocess.run([sys.executable, "-m", "aund", "devnet", "revoke", alice, "--state-dir",
                               str(prod_devnet.state_dir)], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and done.stdout.startswith(f"revoked {alice} serial="), done
        (work / "revoked").touch()
        out, err = sender.communicate(timeout=60)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait(5)
    checks = [json.loads(x) for x in out.splitlines() if x.startswith("{") and "check" in x]
    assert sender.returncode == 0 and checks and all(c["ok"] for c in checks), (checks, err[-2000:])
    run_fastaun("revoke_read", prod_devnet, work, driver="fastaun_prod_driver.py")
