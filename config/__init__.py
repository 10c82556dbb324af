"""Packaged configuration: the site defaults (``default.toml``) that every run starts from."""
