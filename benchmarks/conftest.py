import os
import sys

# The suites import their shared case definitions from this folder.
sys.path.insert(0, os.path.dirname(__file__))
