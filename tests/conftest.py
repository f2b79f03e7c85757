import os
import sys

# the project is flat scripts at the top level: make them importable from tests/
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
