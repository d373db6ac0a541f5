"""fastaun 0.5.25 (subprocess) on a `--pki production` devnet process."""
from __future__ import annotations

import pytest

from tests.helpers import DevnetProcess, run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


@pytest.fixture
def prod_devnet(tmp_path):
    proc = DevnetProcess(tmp_path / "devnet", extra_args=["--pki", "production"])
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
    assert code == 0


def test_e2ee_and_plain_both_ways_on_production_pki(prod_devnet, tmp_path):
    run_fastaun("both_ways", prod_devnet, tmp_path / "sdk")
    assert prod_devnet.stats()["rpc_errors"] == {}


def test_unsigned_echo_plaintext_both_ways(prod_devnet, tmp_path):
    lines = run_fastaun("echo_both_ways", prod_devnet, tmp_path / "sdk", driver="fastaun_prod_driver.py")
    assert sum(1 for c in lines if c.get("check", "").startswith("received echo")) == 2
    assert prod_devnet.stats()["rpc_errors"] == {}
