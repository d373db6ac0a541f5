"""The blocking client front ends, generated from ``client_stub/_async`` by ``scripts/unasync.py``: do not edit."""
