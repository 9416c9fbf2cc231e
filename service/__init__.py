"""Research conversations over Parallel's Task API."""

__version__ = "0.1.0"
