"""The client front ends' source (asyncio): ``client_stub/_sync`` is generated from it by ``scripts/unasync.py``."""
