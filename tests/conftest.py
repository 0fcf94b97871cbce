import sys
from pathlib import Path

# Let tests import the shared helpers in this folder (tests/tiny_models.py) as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
