"""Helpers for the tests that check aund's E2EE code against vectors the official SDK makes: the
generator runs fastaun in a subprocess (never imported here), and keys travel as PEM."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

GENERATOR = Path(__file__).resolve().parent / "interop" / "gen_fastaun_vectors.py"


def run_sdk(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    """Run the fastaun vector generator with `args`; its stdout (asserting it succeeded)."""
    proc = subprocess.run([sys.executable, str(GENERATOR), *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def private_key(pem_text: str | None) -> ec.EllipticCurvePrivateKey | None:
    if pem_text is None:
        return None
    key = serialization.load_pem_private_key(pem_text.encode("ascii"), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")
