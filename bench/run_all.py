"""Regenerate every table in bench/results/ (`make bench`)."""

import runpy
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in sorted(HERE.glob("*.py")):
    # a benchmark is a script with a main guard; the rest are helper modules (e.g. hls4ml_peer.py)
    if script.name != "run_all.py" and '__name__ == "__main__"' in script.read_text():
        print(f"== {script.name}")
        runpy.run_path(str(script), run_name="__main__")
