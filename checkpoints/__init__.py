"""The shipped digits endpoints, installed as the package ``modeconn.checkpoints``.

This folder stays at the repository root; pyproject.toml maps it to the package
``modeconn.checkpoints`` so that the wheel, the sdist and the editable install
carry the ``.pt`` files and their README. Find a file with
``modeconn.shipped_checkpoint(name)``, not by a path relative to the source.
"""
