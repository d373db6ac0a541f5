"""Group identities with the official SDK (fastaun 0.5.25, in a subprocess) against a real
`aund devnet --group-identity-check` process: the SDK's own facades are the judge.

- anonymous: `client.group.create({"name"}, aid_store=)` creates, binds (group.bind_group_aid) and
  publishes the group's card; the identity is in fastaun's AIDs store, another client downloads and
  verifies the card, the SDK's owner / authoritative certificate resolution accepts it;
  `renew_group_aid` rekeys (the new certificate served, the old one revoked in history); a member
  joins and both exchange E2EE messages; dissolving revokes the certificate.
- named: `{"group_name"}` creates `{name}.aid.test` with its certificate; the name is refused to
  someone else.
- recovery: a raw `group.create` leaves the group without identity; the devnet's -32003 makes the
  SDK bind and publish on its own, and its call then succeeds.

The driver (tests/interop/fastaun_group_identity_driver.py) asserts the client side; these tests
check that every check ran and what the devnet saw.
"""
from __future__ import annotations

import pytest

from tests.conftest import _running_devnet
from tests.helpers import run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]
DRIVER = "fastaun_group_identity_driver.py"


@pytest.fixture
def gated_devnet(tmp_path):
    """A devnet with production's group identity admission (`--group-identity-check`)."""
    yield from _running_devnet(tmp_path, "--group-identity-check")


def _checks(lines) -> set[str]:
    return {c["check"] for c in lines if "check" in c}


def test_anonymous_group_identity_renew_e2ee_and_dissolve(gated_devnet, tmp_path):
    lines = run_fastaun("anonymous", gated_devnet, tmp_path / "sdk", timeout=140.0, driver=DRIVER)
    names = _checks(lines)
    for label in ("anonymous", "renewed"):
        assert {f"{label}: group identity in the AIDs store", f"{label}: authoritative certificate",
                f"{label}: SDK resolves owner and certificate", f"{label}: owner projection",
                f"{label}: card downloaded and verified", f"{label}: card is the group's"} <= names
    assert {"renew_group_aid", "the new certificate is served", "the old certificate stays in history, revoked",
            "gidown decrypts gidmem's message", "gidmem decrypts gidown's message",
            "the group certificate is revoked (OCSP)", "the card is marked dissolved",
            "no name outside *.aid.test was looked up"} <= names
    stats = gated_devnet.stats()
    rpc, errors = stats["rpc"], stats["rpc_errors"]
    assert rpc["group.bind_group_aid"] >= 1 and rpc["group.renew_group_aid"] == 1
    assert stats["http"].get("PUT /agent.md", 0) >= 2 + 2  # two AIDs' cards, the group's card twice
    # -32003 is the admission the SDK recovers from (its background pulls can race the bind)
    assert all(key.endswith("-32003") for key in errors), errors


def test_named_group_and_a_taken_name(gated_devnet, tmp_path):
    names = _checks(run_fastaun("named", gated_devnet, tmp_path / "sdk", timeout=140.0, driver=DRIVER))
    assert {"named create", "named: card downloaded and verified", "named: owner projection",
            "the name is taken for someone else", "a named group admits a member",
            "gidnamed decrypts gidother's message", "gidother decrypts gidnamed's message"} <= names
    errors = gated_devnet.stats()["rpc_errors"]
    assert errors.get("group.create -33002") == 1  # the taken name
    assert "group.bind_group_aid" not in {k.split()[0] for k in errors}


def test_the_sdk_recovers_from_the_group_admission(gated_devnet, tmp_path):
    names = _checks(run_fastaun("recovery", gated_devnet, tmp_path / "sdk", timeout=140.0, driver=DRIVER))
    assert {"add_member succeeds after the SDK's recovery", "recovered: owner projection",
            "recovered: card downloaded and verified"} <= names
    stats = gated_devnet.stats()
    refused = {k for k in stats["rpc_errors"] if k.endswith(" -32003")}
    assert refused and stats["rpc"]["group.bind_group_aid"] >= 1, stats["rpc_errors"]
    assert set(stats["rpc_errors"]) == refused, stats["rpc_errors"]
