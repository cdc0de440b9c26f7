"""The pipeline: run a recipe's steps in order, one folder per step, resumable.

Run folder layout::

    RUN/run.json                 which recipe owns this folder
    RUN/recipe.json              the validated recipe, defaults filled in
    RUN/steps/00-source/         manifest.json + artifact/
    RUN/steps/01-train.supervised/
    RUN/steps/02-export.onnx/
    RUN/report.json, report.md, report.png

Each step is keyed by a hash of (input step's key, pass name, config, data it
reads). A step folder appears only when the pass *and* its probes finished
(it is built in a temporary folder and renamed), so an interrupted run leaves
no half-written step; ``--resume`` reuses every finished step whose key still
matches and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import fsio
from edgekit.artifact import Artifact
from edgekit.errors import UserError
from edgekit.passes import PassContext
from edgekit.progress import Reporter
from edgekit.recipe import Recipe, Step

RUN_FILE = "run.json"
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Pipeline:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        resume: bool = False,
        force: bool = False,
        reporter: Reporter | None = None,
        cache_dir: Path | None = None,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.out = reporter or Reporter()
        self.cache_dir = cache_dir or default_cache_dir()
        self.source: Artifact | None = None
        self.data = None
        self.dims: dict[str, int] = {}
        self._reference: np.ndarray | None = None

    # -- before any work ----------------------------------------------------
    def prepare(self) -> None:
        """Load and check everything; raise UserError before anything is written."""
        from edgekit import sources

        r = self.recipe
        self._check_formats()
        self._check_run_dir()
        self.out.log(f"[bold]edgekit[/bold] {r.name}: loading {r.model.source}")
        self.source = sources.load_source(r.model, r.resolve)
        self.dims = {**self.source.meta.get("dims", {}), **r.model.dims}
        self.source.meta["dims"] = dict(self.dims)
        sources.check_inputs(self.source, self.dims, r.model.source)
        if r.data is not None:
            from edgekit.data import RecipeData

            self.data = RecipeData(
                r.data, r.resolve, self.source.inputs, self.dims, self.source.meta.get("tokenizer_dir"), r.seed,
                byte_tokens=self.source.meta.get("tokenizer") == "bytes",
            )
            self.data.check()
        for step in r.steps():
            needs = step.pass_class().uses_data
            if needs and self.data is None:
                raise UserError(f"{step.path} reads data.{needs[0]}, but the recipe has no data: section; add one")

    def _check_formats(self) -> None:
        from edgekit.sources import SOURCE_FORMATS

        fmt = SOURCE_FORMATS[self.recipe.model.kind]
        earlier: list[str] = []
        for step in self.recipe.compress:
            cls = step.pass_class()
            late = [name for name in earlier if name.startswith(cls.comes_before)] if cls.comes_before else []
            if late:
                raise UserError(f"{step.path} must come before {late[0]}; move it earlier in compress:")
            earlier.append(cls.name)
            if fmt not in cls.accepts:
                raise UserError(f"{step.path}: takes {' or '.join(cls.accepts)} models but gets a {fmt} model here; reorder the steps or change the source")
            fmt = cls.produces or fmt
        for step in self.recipe.export:
            cls = step.pass_class()
            if fmt not in cls.accepts:
                raise UserError(f"{step.path}: exports {' or '.join(cls.accepts)} models but the compressed model is {fmt}; drop this export or use a {cls.accepts[0]} source")

    def _check_run_dir(self) -> None:
        d = self.run_dir
        if not d.exists() or not any(d.iterdir()):
            return
        run_file = d / RUN_FILE
        if not run_file.is_file():
            raise UserError(f"run folder {d} exists and is not an edgekit run; pick a new or empty --run-dir")
        owner = json.loads(run_file.read_text()).get("name")
        if owner != self.recipe.name and not self.force:
            raise UserError(f"run folder {d} holds results of recipe {owner!r}; pick another --run-dir or pass --force to replace them")
        has_steps = any((d / "steps").glob(f"*/{MANIFEST}"))
        if has_steps and not (self.resume or self.force):
            raise UserError(f"run folder {d} already holds results of {self.recipe.name!r}; pass --resume to reuse finished steps or --force to start over")

    # -- the run -----------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.source is None:
            self.prepare()
        if self.force and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        (self.run_dir / "steps").mkdir(parents=True, exist_ok=True)
        fsio.remove_stale_temps(self.run_dir / "steps")
        fsio.write_json(self.run_dir / RUN_FILE, {"name": self.recipe.name, "edgekit": _version()})
        fsio.write_json(self.run_dir / "recipe.json", self.recipe.canonical())

        from edgekit.sources import source_fingerprint

        records = []
        key = _hash("source", source_fingerprint(self.recipe.model, self.recipe.resolve))
        artifact, rec = self._step(0, "source", None, key, lambda ctx: self.source)
        records.append(rec)
        last, last_key = artifact, key
        by_name = {"source": (artifact, key)}  # what an export's ``of:`` can name
        for i, step in enumerate(self.recipe.compress, start=1):
            key = self._step_key(last_key, step)
            last, rec = self._step(i, step.name, step, key, self._runner(step, last))
            last_key = key
            by_name[step.name] = (last, key)
            records.append(rec)
        for j, step in enumerate(self.recipe.export, start=len(self.recipe.compress) + 1):
            compressed, compressed_key = by_name[step.of] if step.of else (last, last_key)
            key = self._step_key(compressed_key, step)
            _, rec = self._step(j, step.name, step, key, self._runner(step, compressed))
            if step.of:
                rec["of"] = step.of
            records.append(rec)

        report = self._report(records)
        if self.recipe.report.formats:
            from edgekit.report import write_report

            written = write_report(self.run_dir, report, self.recipe.report.formats)
            self.out.log(f"report: {', '.join(str(p) for p in written)}")
        return report

    def _step_key(self, input_key: str, step: Step) -> str:
        cls = step.pass_class()
        data_part = self.data.fingerprint() if (cls.uses_data and self.data is not None) else None
        # export steps verify on calibration data, so the data is part of their identity too
        if cls.kind == "export" and self.data is not None:
            data_part = self.data.fingerprint()
        return _hash(input_key, step.name, step.config.model_dump(mode="json"), data_part, self.dims)

    def _runner(self, step: Step, artifact: Artifact):
        def run(ctx: PassContext) -> Artifact:
            p = step.pass_class()(step.config)
            p.check_input(artifact)
            out = p.run(artifact, ctx)
            out.lineage = [*artifact.lineage, {"pass": step.name, "config": step.config.model_dump(mode="json")}]
            return out

        return run

    def _step(self, index: int, name: str, step: Step | None, key: str, run) -> tuple[Artifact, dict[str, Any]]:
        folder = self.run_dir / "steps" / f"{index:02d}-{name}"
        manifest_file = folder / MANIFEST
        if manifest_file.is_file():
            manifest = json.loads(manifest_file.read_text())
            if manifest.get("key") == key:
                self.out.log(f"[dim]✓ {folder.name}: finished earlier, reused[/dim]")
                manifest["cached"] = True
                return Artifact.load(folder / "artifact"), manifest
        self.out.log(f"▶ {folder.name}")
        started = time.perf_counter()
        with fsio.atomic_dir(folder) as tmp:
            workdir = tmp / "artifact"
            workdir.mkdir()
            ctx = PassContext(
                workdir=workdir,
                data=self.data,
                dims=self.dims,
                seed=self.recipe.seed,
                cache_dir=self.cache_dir,
                run_dir=self.run_dir,
                key=key,
                progress=self.out.track,
                log=self.out.log,
                samples=self._samples,
                path=step.path if step else "",
            )
            artifact = run(ctx)
            ctx.source = artifact
            pass_seconds = time.perf_counter() - started
            saved = artifact.save(workdir)
            probe_started = time.perf_counter()
            # the decoding bench times the final compressed model only (its drafters are a runtime choice)
            metrics = {**ctx.metrics, **self._probe(saved, decoding=index == len(self.recipe.compress))}
            manifest = {
                "id": folder.name,
                "index": index,
                "pass": name,
                "kind": step.kind if step else "source",
                "config": step.config.model_dump(mode="json") if step else self.recipe.model.model_dump(mode="json"),
                "key": key,
                "format": saved.format,
                "seconds": round(pass_seconds, 3),
                "probe_seconds": round(time.perf_counter() - probe_started, 3),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "metrics": metrics,
            }
            fsio.write_json(tmp / MANIFEST, manifest)
        self.out.log(_summary(manifest))
        manifest["cached"] = False
        loaded = Artifact.load(folder / "artifact")
        loaded.module = saved.module  # keep the live torch module; no need to rebuild it
        return loaded, manifest

    # -- probes ------------------------------------------------------------
    def _samples(self, n: int) -> list[dict[str, np.ndarray]]:
        if self.data is not None:
            split = self.data.split("calibration")
            feeds = split.feeds(min(n, len(split)))
            return [feeds[i % len(feeds)] for i in range(n)]
        return [{s.name: s.random(self.dims, seed=i) for s in self.source.inputs} for i in range(n)]

    def _probe(self, artifact: Artifact, decoding: bool = False) -> dict[str, Any]:
        from edgekit.profile import profile_artifact

        metrics: dict[str, Any] = {}
        prof = profile_artifact(artifact, self.dims)
        metrics.update(params=prof["params"], macs=prof["macs"], size_bytes=prof["size_bytes"])
        if self.data is not None and self.data.has_split("eval"):
            metrics["accuracy"] = self._evaluate(artifact)
        if self.recipe.bench is not None and "generation" in artifact.meta:
            metrics["generation"] = self._bench_generation(artifact)
        elif self.recipe.bench is not None:
            bench = self._bench(artifact)
            if bench:
                metrics["bench"] = bench
        if decoding and self.recipe.bench is not None and self.recipe.bench.decoding is not None and artifact.format == "torch":
            drafting = self._bench_decoding(artifact)
            if drafting:
                metrics["decoding"] = drafting
        return metrics

    def _bench_decoding(self, artifact: Artifact) -> dict[str, Any] | None:
        """Drafters against plain greedy decoding on this step's language model (torch, batch 1)."""
        from edgekit.runtimes.decoding.compare import compare_drafters
        from edgekit.runtimes.decoding.drafters import make_drafter
        from edgekit.runtimes.decoding.target import TorchTarget

        d = self.recipe.bench.decoding
        try:
            target = TorchTarget(artifact.torch_module())
        except UserError as e:
            self.out.log(f"  [dim]skip decoding bench: {e}[/dim]")
            return None
        options = {name: {k: (self.recipe.resolve(v) if k == "weights" else v) for k, v in d.options.get(name, {}).items()} for name in d.drafters}
        for name in d.drafters:
            make_drafter(name, target, **options[name])  # a wrong setting fails here, before any timing
        rows = self._samples(d.prompts) if self.data is None or not self.data.has_split("eval") else self.data.split("eval").feeds(d.prompts)
        prompts = [np.asarray(r["input_ids"]).reshape(-1)[: d.prompt_tokens].tolist() for r in rows]
        threads = min(self.recipe.bench.threads)
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self.out.log(f"  decoding bench torch threads={threads}: plain, {', '.join(d.drafters)} on {len(prompts)} prompts")
            table = compare_drafters(
                target, prompts, {n: (lambda n=n: make_drafter(n, target, **options[n])) for n in d.drafters}, d.max_new_tokens, d.rounds
            )
        finally:
            torch.set_num_threads(previous)
        return {"rows": table, "threads": threads, "prompts": len(prompts), "prompt_tokens": d.prompt_tokens,
                "max_new_tokens": d.max_new_tokens, "rounds": d.rounds}

    def _bench_generation(self, artifact: Artifact) -> list[dict[str, Any]]:
        """A generation export on ONNX Runtime: time to the first token and tokens per second,
        for 32 new tokens after the first eval (or sample) row's source, its padding cut off."""
        import numpy as np

        from edgekit.runtimes.generation import OrtGenerator, first_token_and_throughput

        b = self.recipe.bench
        if "onnxruntime" not in b.runtimes or b.device != "local":
            self.out.log("  [dim]skip generation bench: generation exports are timed on local onnxruntime[/dim]")
            return []
        row = self._samples(1)[0]
        ids = np.asarray(row["input_ids"], dtype=np.int64)[:1]
        mask = np.asarray(row.get("attention_mask", np.ones_like(ids)), dtype=np.int64)[:1]
        n = max(1, int(mask.sum()))  # both kinds read the same unpadded source
        ids, mask = ids[:, :n], (mask[:, :n] if artifact.meta["generation"]["kind"] == "encdec" else None)
        rows = []
        for threads in b.threads:
            gen = OrtGenerator.load(artifact.folder, artifact.files, artifact.meta["generation"], threads=threads)
            for batch in b.batch_sizes:
                self.out.log(f"  generation bench onnxruntime threads={threads} batch={batch}")
                feeds = np.repeat(ids, batch, axis=0)
                m = None if mask is None else np.repeat(mask, batch, axis=0)
                result = first_token_and_throughput(gen, feeds, 32, m, repeats=max(1, min(b.repeats, 10)), warmup=min(b.warmup, 2))
                rows.append({"runtime": "onnxruntime", "threads": threads, "batch_size": batch, **result})
        return rows

    def _evaluate(self, artifact: Artifact) -> dict[str, Any]:
        from edgekit.evaluate import choose_metric, evaluate, run_outputs

        split = self.data.split("eval")
        metric = choose_metric(self.recipe.data.eval.metric, artifact.task, split.labels is not None)
        reference = None
        if metric not in ("top1", "perplexity"):
            if self._reference is None:
                self._reference = run_outputs(self.source, split, 1)
            reference = self._reference
        self.out.log(f"  evaluating {metric} on {len(split)} samples")
        return evaluate(artifact, split, metric, reference)

    def _bench(self, artifact: Artifact) -> list[dict[str, Any]]:
        from edgekit.runtimes import get_runtime, runtime_options, to_model_layout
        from edgekit.runtimes.bench import benchmark, make_batch

        b = self.recipe.bench
        feeds1 = self._samples(1)[0]
        fixed_batch = not isinstance(artifact.inputs[0].shape[0], str)
        results = []
        for rt_name in b.runtimes:
            rt = get_runtime(rt_name)
            if artifact.format not in rt.formats:
                continue
            if (reason := rt.skip_reason(artifact)) is not None:
                self.out.log(f"  [dim]skip {rt_name} bench: {reason}[/dim]")
                continue
            if rt_name == "torch" and b.device != "local":
                self.out.log("  [dim]skip torch bench on the device: devices run exported models (onnx, tflite, tvm)[/dim]")
                continue
            if artifact.format == "torch" and artifact.meta.get("quantized"):
                self.out.log("  [dim]skip torch bench: a quantized torch model simulates integer math; its exports are timed[/dim]")
                continue
            for threads in b.threads:
                for batch in b.batch_sizes:
                    if fixed_batch and batch != artifact.inputs[0].shape[0]:
                        self.out.log(f"  [yellow]skip bench batch {batch}: the model's batch dim is fixed[/yellow]")
                        continue
                    self.out.log(f"  bench {rt_name} threads={threads} batch={batch}")
                    feeds = to_model_layout(artifact, make_batch(feeds1, batch))
                    options = runtime_options(rt_name, b)
                    if b.device == "local":
                        row = benchmark(
                            artifact, rt_name, feeds, threads=threads, warmup=b.warmup, repeats=b.repeats, options=options, isolate=b.isolate
                        )
                    else:
                        from edgekit.runtimes.device import benchmark_remote, parse_device

                        row = benchmark_remote(
                            artifact, rt_name, feeds, parse_device(b.device), threads=threads, warmup=b.warmup, repeats=b.repeats, options=options
                        )
                    results.append(row)
        return results

    # -- report ------------------------------------------------------------
    def _report(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        from edgekit.machine import machine_info, versions

        return {
            "name": self.recipe.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_dir": str(self.run_dir),
            "recipe": self.recipe.canonical(),
            "machine": machine_info(),
            "versions": versions(),
            "steps": records,
        }


def _summary(m: dict[str, Any]) -> str:
    met = m["metrics"]
    parts = [f"  [green]✓[/green] {m['id']} ({m['format']}, {m['seconds']:.1f}s)"]
    acc = met.get("accuracy")
    if acc:
        parts.append(f"{acc['metric']} {acc['value']:.4f}")
    if "verify" in met:
        parts.append(f"parity max abs {met['verify']['max_abs']:.1e}")
    if met.get("size_bytes"):
        parts.append(f"{met['size_bytes'] / 1e6:.2f} MB")
    for b in met.get("bench", [])[:1]:
        parts.append(f"p50 {b['latency_ms']['p50']:.3f} ms ({b['runtime']}, {b['threads']} thr, batch {b['batch_size']})")
    return " · ".join(parts)


def _version() -> str:
    from edgekit import __version__

    return __version__
