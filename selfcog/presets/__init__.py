"""Bundled YAML presets: each file holds only what differs from the RunConfig defaults (see `selfcog config list`)."""
