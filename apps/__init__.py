"""Command line and demo apps (installed as streamrt.apps)."""
