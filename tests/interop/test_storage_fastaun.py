"""Storage on the devnet judged by the official SDK: fastaun's own storage facade (inline and
session uploads, downloads with hash check, list / stat / mkdir / remove, a private object refused
to a stranger and read through a share link) runs against `aund devnet` in a subprocess."""
from __future__ import annotations

import pytest

from tests.helpers import run_fastaun

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


def test_fastaun_storage_facade_on_the_devnet(devnet, tmp_path):
    lines = run_fastaun("facade", devnet, tmp_path / "sdk", timeout=150, driver="fastaun_storage_driver.py")
    names = {x["check"] for x in lines if "check" in x}
    assert {"inline upload", "session upload", "download_file verified", "stranger reads through the share link",
            "stranger refused a private object"} <= names
    objects = list((devnet.state_dir / "storage" / "blobs").iterdir())
    assert len(objects) >= 3  # the objects are on disk, content addressed
