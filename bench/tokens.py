"""Token compression (issue 8): Token Transforming vs ToMe vs pruning on a ViT, FastV vs FEATHER on a VLM.

Two sections, each in its own module so this script stays a table writer:

- bench/tokens_vit.py: a ViT trained by edgekit on generated shapes, compressed
  training-free at equal block-FLOPs cuts (20/30/40/50%) by each method; top-1 on
  held-out generated images, block MACs counted on the compressed model, and ONNX
  Runtime latency as a ratio to the uncompressed export.
- bench/tokens_vlm.py: a small VLM (ViT encoder + RoPE causal LM) trained by edgekit
  on generated visual questions; localization and other-question accuracy with no
  pruning, FastV (RoPE scores), FastV without RoPE and FEATHER at equal compute.

Run: python bench/tokens.py  (writes bench/results/tokens.md and tokens.json; trained
weights are cached in bench/.cache). --quick: small settings into a temporary folder.
--only vit|vlm: one section (the other is kept from the last full run's json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from edgekit import fsio  # noqa: E402
from edgekit.machine import machine_info, versions  # noqa: E402

RESULTS = HERE / "results"


def header() -> str:
    import torch

    m, v = machine_info(), versions()
    return (
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores); torch {v.get('torch')}, onnxruntime {v.get('onnxruntime')}, "
        f"transformers {v.get('transformers')}; torch threads {torch.get_num_threads()}; {datetime.now(UTC).date()}. "
        "Every model is trained by edgekit on data it generates (no downloads); compression is training-free. "
        "Regenerate: `python bench/tokens.py`."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings, output to a temporary folder")
    ap.add_argument("--only", choices=("vit", "vlm"), help="run one section; the other is kept from the last json")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="tokens-bench-")) if args.quick else RESULTS
    previous = json.loads((RESULTS / "tokens.json").read_text()) if (RESULTS / "tokens.json").is_file() else {}
    sections: dict[str, dict] = {}
    for key in ("vit", "vlm"):
        if args.only and args.only != key:
            if key in previous.get("sections", {}):
                sections[key] = previous["sections"][key]
            continue
        started = time.perf_counter()
        if key == "vit":
            from tokens_vit import vit_section

            md, data = vit_section(args.quick)
        else:
            from tokens_vlm import vlm_section

            md, data = vlm_section(args.quick)
        sections[key] = {"markdown": md, "data": data, "seconds": round(time.perf_counter() - started, 1)}
        print(md)
    lines = ["# Token compression: Token Transforming, ToMe and pruning on a ViT; FastV and FEATHER on a VLM", "", header(), ""]
    for key in ("vit", "vlm"):
        if key in sections:
            lines += [sections[key]["markdown"].rstrip(), "", f"_Section run time: {sections[key]['seconds'] / 60:.1f} min._", ""]
    fsio.write_text(out / "tokens.md", "\n".join(lines))
    fsio.write_json(out / "tokens.json", {"machine": machine_info(), "versions": versions(), "sections": sections})
    print(f"wrote {out / 'tokens.md'}")


if __name__ == "__main__":
    main()
