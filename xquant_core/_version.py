"""The xquant version (one place: the package metadata, the CLI and the exported models read it)."""

__version__ = "0.1.0"
