__version__ = "0.1.0"  # pyproject.toml reads it (tool.setuptools.dynamic)
