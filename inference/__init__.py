"""The explainable ICH detector: pure PyTorch, importable without Django.

worklist/tasks.py is the one adapter between this package and the web app.
"""

__version__ = "0.1.0"
