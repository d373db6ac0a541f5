"""System tests: real `aund devnet`, `aund run`, app and fastaun processes together (issues 4, 5, 7).

Run: python -m pytest tests/system -q -p no:cacheprovider (about 1.5 minutes on 2 cores; add -s
for the measured numbers). test_uid_policy needs root and fails, loudly, without it.
"""
