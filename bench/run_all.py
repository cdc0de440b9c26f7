"""Regenerate every table in bench/results/ (`make bench`)."""

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in sorted(HERE.glob("*.py")):
    if script.name != "run_all.py":
        print(f"== {script.name}")
        runpy.run_path(str(script), run_name="__main__")
