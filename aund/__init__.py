"""aund: one local daemon that holds AUN identities and gateway connections for many apps."""
__version__ = "0.1.0"
