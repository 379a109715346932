"""The package's version (pyproject.toml holds the same): a module of its own, so that any part of
vaelab can name it without importing the whole package."""

__version__ = "0.1.0"
