"""The ``edgekit`` command line.

User errors print one line and exit with code 2; a step whose result fails a
check (e.g. parity) exits with 1; an interrupt exits with 130 and says how to
resume. Heavy imports happen inside commands so ``edgekit --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgekit import __version__
from edgekit.errors import EdgekitError

SET_HELP = "Override a recipe field, e.g. --set export[0].onnx.opset=18 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: compress, export, verify and benchmark models for edge devices."""


@cli.command()
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where steps and the report go (default: runs/NAME).")
@click.option("--resume", is_flag=True, help="Reuse finished steps of an earlier run of this recipe; redo the rest.")
@click.option("--force", is_flag=True, help="Discard what the run folder holds and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout when done.")
def compress(recipe_file: Path, overrides: tuple[str, ...], run_dir: Path | None, resume: bool, force: bool, quiet: bool, as_json: bool) -> None:
    """Run RECIPE: load the model, compress, export, verify, benchmark, report."""
    from edgekit.pipeline import Pipeline
    from edgekit.progress import Reporter
    from edgekit.recipe import load_recipe

    if resume and force:
        raise click.UsageError("--resume and --force contradict each other; pick one")
    recipe = load_recipe(recipe_file, list(overrides))
    reporter = Reporter(quiet=quiet or as_json)
    pipeline = Pipeline(recipe, run_dir or Path("runs") / recipe.name, resume=resume, force=force, reporter=reporter)
    pipeline.prepare()
    report = pipeline.run()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))


@cli.group()
def recipe() -> None:
    """Check recipes and show the recipe reference."""


@recipe.command("validate")
@click.argument("recipe_file", metavar="RECIPE", type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def recipe_validate(recipe_file: Path, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE against the schema (no model is loaded)."""
    from edgekit.recipe import load_recipe

    r = load_recipe(recipe_file, list(overrides))
    steps = ", ".join(s.name for s in r.steps()) or "no steps"
    click.echo(f"{recipe_file}: valid ({r.model.source}; {steps})")


@recipe.command("schema")
def recipe_schema() -> None:
    """Print the recipe reference (every key and pass config) as Markdown."""
    from edgekit.recipe import schema_reference

    click.echo(schema_reference())


@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE", help="Size of a named dynamic dim for the MAC count, e.g. --dim seq=128 (others count as 1).")
@click.option("--quant-debug", is_flag=True, help="For a quantized step: per-layer SQNR (and sensitivity), to find the layer that hurts.")
def inspect(target: str, as_json: bool, dim_items: tuple[str, ...], quant_debug: bool) -> None:
    """Show inputs, outputs, params, MACs, ops and size of an ONNX file, a saved step/artifact folder, or zoo:NAME."""
    from edgekit.profile import format_inspect, inspect_target

    dims = _parse_dims(dim_items)
    if quant_debug:
        from edgekit.quant_debug import quant_debug_report

        info = quant_debug_report(target, dims)
        click.echo(json.dumps(info, indent=2, default=str) if as_json else info["text"])
        return
    info = inspect_target(target, dims)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(format_inspect(info))


@cli.command("bench")
@click.argument("target", metavar="ARTIFACT")
@click.option("--runtime", help="Runtime to time it on (default: the format's own: onnxruntime, litert or tvm).")
@click.option("--device", default="local", show_default=True, help="local, or ssh://user@host[:port][?python=PATH] to time it on that device.")
@click.option("--threads", multiple=True, type=click.IntRange(min=1), default=(1,), show_default=True,
              help="Threads; repeat to compare (--threads 1 --threads 4).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per call.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed calls first.")
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True, help="Timed calls.")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE", help="Size of a named dynamic dim other than the batch (others are 1).")
@click.option("--input", "input_items", multiple=True, metavar="NAME=SHAPE[:DTYPE]",
              help="An input of a model file that does not say, e.g. x=1x3x224x224:float32 (a .so needs these).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def bench(target: str, runtime: str | None, device: str, threads: tuple[int, ...], batch: int, warmup: int, repeats: int,
          dim_items: tuple[str, ...], input_items: tuple[str, ...], as_json: bool) -> None:
    """Time ARTIFACT (a step's artifact folder, or a .onnx / .tflite / .so file) here or on a device over SSH."""
    import contextlib

    from edgekit.errors import UserError
    from edgekit.runtimes import default_runtime, get_runtime, runtime_names, to_model_layout
    from edgekit.runtimes.bench import benchmark

    where = None
    if device != "local":
        from edgekit.runtimes.device import benchmark_remote, parse_device

        try:
            where = parse_device(device)
        except ValueError as e:
            raise UserError(f"--device: {e}") from None
    with contextlib.ExitStack() as stack:
        artifact = _bench_artifact(target, [_parse_input(i) for i in input_items], stack)
        rt = runtime or default_runtime(artifact.format)
        if rt not in runtime_names():
            get_runtime(rt)  # raises, naming the nearest runtime
        feeds = to_model_layout(artifact, _synthetic_feeds(artifact, batch, _parse_dims(dim_items)))
        rows = []
        for n in threads:
            if not as_json:
                click.echo(f"timing {artifact.format} on {rt}, threads {n}, batch {batch}, {where or 'local'}", err=True)
            if where is None:
                rows.append(benchmark(artifact, rt, feeds, threads=n, warmup=warmup, repeats=repeats, options={}))
            else:
                rows.append(benchmark_remote(artifact, rt, feeds, where, threads=n, warmup=warmup, repeats=repeats, options={}))
    if as_json:
        click.echo(json.dumps({"artifact": target, "format": artifact.format, "results": rows}, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(_bench_table(rows, warmup, repeats))


def _parse_dims(items: tuple[str, ...]) -> dict[str, int]:
    dims = {}
    for item in items:
        name, _, size = item.partition("=")
        if not name or not size.isdigit():
            raise click.BadParameter(f"{item!r} must look like NAME=SIZE, e.g. seq=128", param_hint="--dim")
        dims[name] = int(size)
    return dims


def _parse_input(item: str):
    from edgekit.artifact import DTYPES, TensorSpec

    name, _, rest = item.partition("=")
    shape, _, dtype = rest.partition(":")
    dims = shape.split("x")
    if not name or not all(d.isdigit() for d in dims) or (dtype and dtype not in DTYPES):
        raise click.BadParameter(f"{item!r} must look like NAME=1x3x224x224 or NAME=1x128:int64 (dtypes: {', '.join(DTYPES)})", param_hint="--input")
    return TensorSpec(name=name, shape=[int(d) for d in dims], dtype=dtype or "float32")


def _bench_artifact(target: str, declared: list, stack):
    """An artifact folder as saved, or a minimal artifact (in a temporary folder) around one model file."""
    import tempfile

    from edgekit.artifact import ARTIFACT_FILE, Artifact
    from edgekit.errors import UserError

    path = Path(target)
    if path.is_dir():
        if declared:
            raise UserError(f"{target} is an artifact folder, which names its inputs; --input is for model files")
        return Artifact.load(path)
    fmt = {".onnx": "onnx", ".tflite": "tflite", ".so": "tvm"}.get(path.suffix.lower())
    if not path.is_file() or fmt is None:
        raise UserError(f"{target} is neither an artifact folder nor a .onnx, .tflite or .so file; pass a step's artifact folder or a model file")
    if (path.parent / ARTIFACT_FILE).is_file() and not declared:
        saved = Artifact.load(path.parent)
        if saved.files.get("model") == path.name:
            return saved
    files = {"model": path.name}
    found = []
    if fmt == "onnx":
        found, extra = _onnx_inputs(path)
        files.update(extra)
    elif fmt == "tflite":
        found = _tflite_inputs(path)
    inputs = declared or found
    if not inputs:
        raise UserError(f"{path.name} does not say what its inputs are; name them with --input NAME=1x3x224x224:float32")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgekit-bench-")))
    for name in files.values():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to((path.parent / name).resolve())
    return Artifact(format=fmt, inputs=inputs, files=files, folder=folder, meta={"source": str(path)}).save(folder)


def _onnx_inputs(path: Path):
    """Input specs of an ONNX file, and its external data files by role."""
    import onnx

    from edgekit.artifact import TensorSpec
    from edgekit.errors import UserError
    from edgekit.sources import _ONNX_DTYPES

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise UserError(f"{path} is not an ONNX model ({type(e).__name__}); export one or check the file") from None
    initializers = {i.name for i in proto.graph.initializer}
    specs = []
    for gi in proto.graph.input:
        if gi.name in initializers:
            continue
        tt = gi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or ("batch" if k == 0 else f"{gi.name}_dim{k}"))
                 for k, d in enumerate(tt.shape.dim)]
        if tt.elem_type not in _ONNX_DTYPES:
            raise UserError(f"input {gi.name!r} of {path.name} has element type {tt.elem_type}, which synthetic inputs do not cover")
        specs.append(TensorSpec(name=gi.name, shape=shape, dtype=_ONNX_DTYPES[tt.elem_type]))
    locations = sorted({e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"})
    return specs, {f"data{i}": loc for i, loc in enumerate(locations)}


def _tflite_inputs(path: Path):
    """Input specs of a .tflite file's default signature (float for a full-integer input: the session quantizes)."""
    import re

    import numpy as np

    from edgekit.artifact import DTYPES, TensorSpec
    from edgekit.errors import UserError
    from edgekit.runtimes.litert import find_interpreter

    module, _, _ = find_interpreter()
    try:
        it = module.Interpreter(model_path=str(path))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not load in LiteRT ({(str(e).strip().splitlines() or [''])[0][:200]}); check the file") from None
    sig = it.get_signature_list()
    if not sig:
        raise UserError(f"{path.name} has no signature; name its inputs with --input NAME=1x224x224x3:float32")
    key = next(iter(sig))
    details = it.get_signature_runner(key).get_input_details()
    specs = []
    for name in sorted(sig[key]["inputs"], key=lambda n: (int(m.group(1)) if (m := re.search(r"(\d+)$", n)) else 0, n)):
        d = details[name]
        dtype = np.dtype(d["dtype"]).name
        if np.issubdtype(d["dtype"], np.integer) and d.get("quantization", (0.0, 0))[0]:
            dtype = "float32"  # a full-integer input: the session quantizes float feeds
        if dtype not in DTYPES:
            raise UserError(f"input {name!r} of {path.name} is {dtype}, which synthetic inputs do not cover")
        specs.append(TensorSpec(name=name, shape=[int(x) for x in d["shape"]], dtype=dtype))
    return specs


def _synthetic_feeds(artifact, batch: int, dims: dict[str, int]):
    from edgekit.errors import UserError

    dims = dict(dims)
    for spec in artifact.inputs:
        first = spec.shape[0] if spec.shape else None
        if isinstance(first, str):
            dims[first] = batch
        elif first is not None and first != batch:
            raise UserError(f"input {spec.name} has a fixed batch of {first}; pass --batch {first} or export with a dynamic batch")
    return {s.name: s.random(dims, seed=i) for i, s in enumerate(artifact.inputs)}


def _bench_table(rows: list[dict], warmup: int, repeats: int):
    from rich.table import Table

    first = rows[0]
    device = first.get("device")
    where = f"{device['url']} ({device.get('cpu')}, {device.get('cores')} cores, {device.get('machine')})" if device else "this machine"
    table = Table(title=f"{first['runtime']} {first.get('runtime_version') or ''} on {where}",
                  caption=f"latency of one call: {warmup} warm-up calls, then {repeats} timed calls")
    for col in ("Threads", "Batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "Peak RSS"):
        table.add_column(col, justify="right")
    for r in rows:
        lat = r["latency_ms"]
        table.add_row(str(r["threads"]), str(r["batch_size"]), *(f"{lat[k]:.3f}" for k in ("p50", "p90", "p99")),
                      f"{r['throughput_sps']:.1f}" if r.get("throughput_sps") else "-", f"{r['peak_rss_mb']:.0f} MB")
    return table


@cli.group()
def fpga() -> None:
    """Work with the HLS projects of fpga.hls steps."""


@fpga.command("csim")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option("--images", type=click.IntRange(min=1), help="Check this many generated images instead of the step's csim_images.")
@click.option("--no-sanitize", is_flag=True, help="Build without -fsanitize=address,undefined (faster).")
def fpga_csim(run_dir: Path, images: int | None, no_sanitize: bool) -> None:
    """C-simulate the HLS project of a run's fpga.hls step against the integer reference.

    RUN_DIR is a run folder (runs/NAME) or one fpga.hls step folder. Exits 1
    if any output value differs.
    """
    from edgekit.fpga.export_hls import csim_run_dir

    csim_run_dir(run_dir, images, sanitize=not no_sanitize, log=click.echo)


@cli.command("passes")
def list_passes() -> None:
    """List the registered passes."""
    from edgekit.passes import registry

    for name, cls in sorted(registry().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        click.echo(f"{name:24s} {cls.kind:8s} {doc[0] if doc else ''}")


@cli.command("models")
@click.argument("pattern", default="*")
def list_zoo(pattern: str) -> None:
    """List zoo models matching PATTERN (e.g. '*cnn*'): name, task, first input, description."""
    from edgekit.models import list_models, model_info

    for name in list_models(pattern):
        info = model_info(name)
        shape = "x".join(str(d) for d in info.inputs[0].shape) if info.inputs else ""
        click.echo(f"{name:26s} {info.task:15s} {shape:20s} {info.description}")


@cli.command("datasets")
def list_generated() -> None:
    """List the datasets edgekit generates (data source synth:NAME:N)."""
    from edgekit.models.datasets import list_datasets

    for name, doc in list_datasets().items():
        if not name.startswith("_"):
            click.echo(f"{name:16s} {doc}")


@cli.command("generate")
@click.argument("model", metavar="MODEL")
@click.option("--prompt", help="Text to continue (needs a tokenizer: byte-level zoo LMs and HF folders bring one).")
@click.option("--prompt-ids", help="Token ids to continue instead, comma-separated, e.g. 1,45,72.")
@click.option("--drafter", default="none", show_default=True, help="none, ngram, aded, swift or head (see `edgekit generate --help`).")
@click.option("--drafter-option", "drafter_options", multiple=True, metavar="KEY=VALUE", help="A drafter setting, e.g. size=32 (repeatable).")
@click.option("--drafter-weights", type=click.Path(path_type=Path), help="head: the .npz from `edgekit train-drafter`.")
@click.option("--drafter-data", type=click.Path(path_type=Path), help="aded: a text file whose tri-grams seed the table.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0: greedy; else sampled (same distribution with any drafter).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--runtime", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True)
@click.option("--arch", help="Zoo architecture for a torch:FILE state dict.")
@click.option("--tokenizer", help="bytes, or a folder with Hugging Face tokenizer files (default: what the model says).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for the model.")
@click.option("--compare", is_flag=True, help="Also decode plainly (greedy) and report the speed-up and whether the output is identical.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def generate_cmd(model: str, prompt: str | None, prompt_ids: str | None, drafter: str, drafter_options: tuple[str, ...], drafter_weights: Path | None,
                 drafter_data: Path | None, max_new_tokens: int, temperature: float, seed: int, runtime: str, arch: str | None,
                 tokenizer: str | None, threads: int | None, compare: bool, as_json: bool) -> None:
    """Generate from MODEL with speculative decoding (output identical to plain greedy, or the same sampling distribution).

    MODEL: zoo:NAME, hf:DIR (Llama family), torch:FILE with --arch, a step's artifact folder, or a verifier export folder.
    Drafters: ngram (prompt lookup), aded (adaptive tri-gram tree), swift (layer-skip self-draft, torch), head (trained head).
    """
    import tempfile

    from edgekit.errors import UserError
    from edgekit.runtimes.decoding.load import load_target, tokenizer_for

    options = _parse_options(drafter_options)
    if drafter_weights is not None:
        options["weights"] = drafter_weights
    if (prompt is None) == (prompt_ids is None):
        raise UserError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    with tempfile.TemporaryDirectory(prefix="edgekit-generate-") as scratch:
        target, meta = load_target(model, runtime, arch, threads, Path(scratch) / "verifier")
        tok = tokenizer_for(meta, tokenizer)
        if prompt is not None and tok is None:
            raise UserError(f"{model} names no tokenizer; pass --tokenizer bytes or a tokenizer folder, or --prompt-ids")
        ids = tok.encode(prompt) if prompt is not None else _parse_ids(prompt_ids)
        if drafter_data is not None:
            if tok is None:
                raise UserError("--drafter-data is text and this model has no tokenizer; pass --tokenizer")
            if not drafter_data.is_file():
                raise UserError(f"--drafter-data {drafter_data} does not exist; pass a text file")
            import numpy as np

            options["corpus"] = np.asarray(tok.encode(drafter_data.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
        result = _generate(target, drafter, options, ids, max_new_tokens, temperature, seed, tok, compare)
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(result["text"] if result["text"] is not None else ",".join(map(str, result["tokens"])))
    click.echo(f"{result['new_tokens']} tokens in {result['seconds']:.3f} s ({result['tokens_per_s']:.1f} tokens/s), "
               f"{result['passes']} verification passes, {result['tokens_per_pass']:.2f} tokens per pass from "
               f"{result['draft_tokens_per_pass']:.1f} draft tokens fed (drafter {drafter})", err=True)
    if compare:
        same = "identical to" if result["identical_to_plain"] else "DIFFERENT from"
        click.echo(f"plain greedy: {result['plain_tokens_per_s']:.1f} tokens/s; speed-up {result['speedup']:.2f}x; output {same} plain greedy", err=True)


def _generate(target, drafter_name, options, ids, max_new_tokens, temperature, seed, tok, compare) -> dict:
    from edgekit.errors import UserError
    from edgekit.runtimes.decoding import generate
    from edgekit.runtimes.decoding.drafters import make_drafter

    eos = tok.eos if tok is not None else None
    drafter = None if drafter_name == "none" else make_drafter(drafter_name, target, **options)
    if drafter is None and options:
        raise UserError("drafter settings were given but --drafter is none; pick a drafter")
    generate(target, None, ids, min(4, max_new_tokens), eos=eos)  # warm-up: first calls pay for allocations
    if drafter is not None:  # and the first budgeted draft profiles the target's passes
        generate(target, drafter, ids, min(8, max_new_tokens), eos=eos)
    g = generate(target, drafter, ids, max_new_tokens, temperature, seed, eos)
    out = {
        "tokens": g.tokens, "text": tok.decode(g.tokens) if tok is not None else None, "new_tokens": len(g.tokens),
        "seconds": g.seconds, "tokens_per_s": g.tokens_per_s, "passes": g.steps, "tokens_per_pass": g.mean_accepted,
        "draft_tokens_per_pass": sum(g.drafted) / g.steps if g.steps else 0.0,
        "drafter": drafter_name, "temperature": temperature,
    }
    if compare:
        if temperature > 0:
            raise UserError("--compare checks identity with plain greedy; drop --temperature")
        plain = generate(target, None, ids, max_new_tokens, eos=eos)
        out.update(plain_tokens_per_s=plain.tokens_per_s, speedup=plain.seconds / g.seconds if g.seconds else 0.0, identical_to_plain=plain.tokens == g.tokens)
    return out


@cli.command("train-drafter")
@click.argument("model", metavar="MODEL")
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Text to train on (the model's own domain).")
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help="Where the head's .npz goes.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--depth", type=click.IntRange(min=1), default=4, show_default=True, help="Tokens the head drafts per pass.")
@click.option("--arch", help="Zoo architecture for a torch:FILE state dict.")
@click.option("--tokenizer", help="bytes, or a folder with Hugging Face tokenizer files (default: what the model says).")
@click.option("--seed", type=int, default=0, show_default=True)
def train_drafter(model: str, text_file: Path, out_file: Path, steps: int, depth: int, arch: str | None, tokenizer: str | None, seed: int) -> None:
    """Train the Chimera-style draft head (--drafter head) for MODEL on a text file; the model stays frozen."""
    import numpy as np

    from edgekit.errors import UserError
    from edgekit.runtimes.decoding.drafters.head import train_head
    from edgekit.runtimes.decoding.load import tokenizer_for, torch_module

    if not text_file.is_file():
        raise UserError(f"--text {text_file} does not exist; pass a text file")
    if not out_file.parent.is_dir():
        raise UserError(f"--out: the folder {out_file.parent} does not exist; create it first")
    module, meta = torch_module(model, arch)
    tok = tokenizer_for(meta, tokenizer)
    if tok is None:
        raise UserError(f"{model} names no tokenizer; pass --tokenizer bytes or a tokenizer folder")
    tokens = np.asarray(tok.encode(text_file.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
    weights = train_head(module, tokens, steps=steps, depth=depth, seed=seed, log=lambda m: click.echo(m, err=True))
    weights.save(out_file)
    click.echo(f"wrote {out_file} (depth {weights.depth}, width {weights.dim}, vocabulary {weights.vocab})")


def _parse_options(items: tuple[str, ...]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} must look like KEY=VALUE, e.g. size=32", param_hint="--drafter-option")
        out[key] = yaml.safe_load(value)
    return out


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.BadParameter(f"{text!r} must be comma-separated integers, e.g. 1,45,72", param_hint="--prompt-ids") from None


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="edgekit", standalone_mode=False)
    except EdgekitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted; rerun with --resume to continue from the last finished step", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted; rerun with --resume to continue from the last finished step", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    sys.exit(0)


if __name__ == "__main__":
    main()
