"""Two small real example models (digits CNN, docstring transformer) exported as `.pt2` programs.

Build them with ``python -m examples.build OUT_DIR``; see ``examples/README.md``.
"""

from examples.common import ExampleArtifacts

__all__ = ["ExampleArtifacts"]
