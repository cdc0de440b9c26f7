"""Child process of the benchmark harness: load one artifact, time it, report.

Usage (internal): python -m edgekit.runtimes.bench_worker REQUEST.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(request_file: str) -> None:
    req = json.loads(Path(request_file).read_text())
    from edgekit.artifact import Artifact
    from edgekit.runtimes import get_runtime
    from edgekit.runtimes.bench import peak_rss_mb, summarize, time_session

    rt = get_runtime(req["runtime"])
    rt.version()  # import the runtime before the baseline so it is not counted as the model's
    with np.load(req["feeds"], allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    baseline = peak_rss_mb()
    artifact = Artifact.load(req["artifact"])
    session = rt.load(artifact, threads=req["threads"], **req["options"])
    batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
    times = time_session(session, feeds, req["warmup"], req["repeats"])
    result = {**summarize(times, batch), "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline, "describe": session.describe()}
    tmp = Path(req["result"] + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(req["result"])


if __name__ == "__main__":
    main(sys.argv[1])
