"""The package version, in a module with no imports so that anything may read it cheaply."""

__version__ = "0.1.0"
