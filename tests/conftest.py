import os
import sys

# Tests import the top-level scripts (model.py, push.py, ...) as modules.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
