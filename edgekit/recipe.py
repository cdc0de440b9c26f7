"""The recipe: a YAML file validated into pydantic models before any work starts.

Every error names its YAML path (``compress[1].quantize.ptq.weights.bits``) and,
for an unknown key or pass, the nearest valid name. Relative file paths in a
recipe resolve against the recipe's own folder.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgekit.artifact import TensorSpec
from edgekit.errors import UserError
from edgekit.passes import Pass, PassConfig, canonical_name, registry, suggest

SOURCE_KINDS = ("zoo", "onnx", "torch", "hf", "python")
DATA_KINDS = ("sklearn", "text", "npz", "images", "synth")
RUNTIMES = ("onnxruntime", "litert", "tvm", "torch")
METRICS = ("top1", "cosine", "max_abs", "mean_abs")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HfOptions(Strict):
    pooling: Literal["mean", "cls", "none"] = Field("mean", description="how token states become one vector")
    normalize: bool = Field(False, description="L2-normalise the pooled vector")
    max_length: int = Field(128, ge=1, description="sequence length used for the seq dim")


class ModelSection(Strict):
    source: str = Field(description="zoo:NAME, onnx:FILE, torch:FILE, hf:DIR or python:pkg.module:factory")
    arch: str | None = Field(None, description="zoo architecture to load a torch:FILE state dict into")
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the zoo or python factory")
    inputs: list[TensorSpec] | None = Field(None, description="input specs; zoo and hf models provide defaults")
    dims: dict[str, int] = Field(default_factory=dict, description="sizes of named dynamic dims, e.g. {batch: 1, seq: 128}")
    task: Literal["classification", "embedding", "generic", "lm", "seq2seq"] | None = None
    trust_python: bool = Field(False, description="must be true for a python: source (it runs your code)")
    hf: HfOptions = Field(default_factory=HfOptions)

    @field_validator("source")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kind, sep, rest = v.partition(":")
        if not sep or not rest:
            raise ValueError(f"{v!r} is not KIND:VALUE; use one of {', '.join(k + ':' for k in SOURCE_KINDS)}")
        if kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source kind {kind!r}{suggest(kind, list(SOURCE_KINDS))}")
        if kind == "python" and rest.count(":") != 1:
            raise ValueError(f"{v!r} must look like python:package.module:factory")
        return v

    @model_validator(mode="after")
    def _python_opt_in(self) -> "ModelSection":
        if self.source.startswith("python:") and not self.trust_python:
            raise ValueError(
                "a python: source runs code from your environment; set model.trust_python: true to allow it"
            )
        if self.source.startswith("torch:") and not self.arch:
            raise ValueError("a torch: state dict needs model.arch, the zoo architecture to load it into")
        return self

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @property
    def value(self) -> str:
        return self.source.partition(":")[2]


class SplitSpec(Strict):
    source: str | None = Field(None, description="overrides data.source for this split")
    samples: int | None = Field(None, ge=1, description="cap on the number of samples")


class EvalSpec(SplitSpec):
    metric: Literal["top1", "perplexity", "exact_match", "cosine", "max_abs", "mean_abs"] | None = Field(
        None,
        description="top1 needs labels; perplexity is for language models (task lm); exact_match scores greedy answers of text-to-text models (task seq2seq); "
        "the others compare with the source model's outputs",
    )


class DataSection(Strict):
    source: str | None = Field(None, description="sklearn:digits, text:FILE, npz:FILE, images:DIR or synth:NAME:N (N samples of a dataset edgekit generates)")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of a single source kept for eval")
    calibration: SplitSpec = Field(default_factory=lambda: SplitSpec(samples=128))
    train: SplitSpec = Field(default_factory=SplitSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("source")
    @classmethod
    def _known_kind(cls, v: str | None) -> str | None:
        if v is None:
            return v
        kind, sep, rest = v.partition(":")
        if not sep or not rest or kind not in DATA_KINDS:
            raise ValueError(f"{v!r} is not a data source; use one of sklearn:digits, text:FILE, npz:FILE, images:DIR, synth:NAME:N")
        return v


class DecodingBench(Strict):
    """Speculative decoding of a language model step, against plain greedy decoding (torch, batch 1)."""

    drafters: list[Literal["ngram", "aded", "swift", "head"]] = Field(
        default_factory=lambda: ["ngram", "aded", "swift"], description="drafters to compare with plain greedy decoding"
    )
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="settings per drafter, e.g. {aded: {size: 32}}; head needs {head: {weights: FILE}}")
    prompts: int = Field(4, ge=1, description="prompts, the starts of the eval (else calibration) samples")
    prompt_tokens: int = Field(64, ge=1, description="tokens of each prompt")
    max_new_tokens: int = Field(64, ge=1)
    rounds: int = Field(3, ge=1, description="rounds of every variant; speed-ups are medians of per-round ratios")

    @model_validator(mode="after")
    def _options_of_chosen(self) -> "DecodingBench":
        extra = [k for k in self.options if k not in self.drafters]
        if extra:
            raise ValueError(f"options for {', '.join(extra)}, which drafters does not list; add it there or drop its options")
        return self


class BenchSection(Strict):
    runtimes: list[Literal["onnxruntime", "litert", "tvm", "torch", "blockffn"]] = Field(
        default_factory=lambda: ["onnxruntime"],
        description="each runtime times the exports it can load; blockffn: torch models with BlockFFN layers on edgekit's sparse kernels",
    )
    device: str = Field(
        "local", description="local, or ssh://user@host[:port] to time the exports on that device (keys or an agent; known_hosts is checked)"
    )
    xnnpack: bool = Field(True, description="litert: run with the XNNPACK delegate")
    blockffn_weights: Literal["fp32", "int8"] = Field("fp32", description="blockffn: expert weights of the sparse kernels")
    blockffn_chunk: int = Field(8, ge=1, description="blockffn: tokens per chunk sharing the union of their active experts")
    threads: list[int] = Field(default_factory=lambda: [1])
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    warmup: int = Field(10, ge=0)
    repeats: int = Field(50, ge=1)
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    isolate: bool = Field(True, description="time each model in its own process (clean peak RSS, no idle thread pools)")
    decoding: DecodingBench | None = Field(None, description="speculative decoding of language-model steps (torch), drafters against plain greedy")


    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if v != "local":
            from edgekit.runtimes.device import parse_device

            parse_device(v)  # raises ValueError naming the expected form
        return v


class ReportSection(Strict):
    formats: list[Literal["json", "md", "png"]] = Field(default_factory=lambda: ["json", "md", "png"])


class Step(BaseModel):
    """One compress or export step after validation."""

    kind: Literal["compress", "export"]
    name: str  # canonical pass name
    config: PassConfig
    path: str  # YAML path, for messages
    of: str | None = None  # export steps: the compress step (pass name) or "source" to export; default the last

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def pass_class(self) -> type[Pass]:
        return registry()[self.name]


class Recipe(Strict):
    name: str = Field(description="names the run folder; letters, digits, - and _")
    seed: int = 0
    model: ModelSection
    data: DataSection | None = None
    compress: list[Step] = Field(default_factory=list)
    export: list[Step] = Field(default_factory=list)
    bench: BenchSection | None = None
    report: ReportSection = Field(default_factory=ReportSection)
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError(f"{v!r} must be letters, digits, '-', '_' or '.' (it names the run folder)")
        return v

    @field_validator("compress", "export", mode="before")
    @classmethod
    def _steps(cls, v: Any, info) -> list[Step]:
        return parse_steps(v, info.field_name)

    @model_validator(mode="after")
    def _exports_of_known_steps(self) -> "Recipe":
        names = ["source", *(s.name for s in self.compress)]
        for i, step in enumerate(self.export):
            if step.of is not None and step.of not in names:
                raise ValueError(f"export[{i}].of: {step.of!r} is not a compress step of this recipe{suggest(step.of, names)}")
        return self

    def resolve(self, path: str) -> Path:
        """A recipe-relative path made absolute; ``pkg:NAME/sub/path`` is a folder
        shipped inside the installed Python package NAME (found without importing it)."""
        if path.startswith("pkg:"):
            return package_path(path[4:])
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def steps(self) -> list[Step]:
        return [*self.compress, *self.export]

    def canonical(self) -> dict[str, Any]:
        """The recipe as plain data, with pass configs filled in (for hashing and the report)."""
        data = self.model_dump(mode="json", exclude={"compress", "export", "base_dir"})
        data["compress"] = [{s.name: s.config.model_dump(mode="json")} for s in self.compress]
        data["export"] = [{s.name: s.config.model_dump(mode="json"), **({"of": s.of} if s.of else {})} for s in self.export]
        return data


def package_path(spec: str) -> Path:
    import importlib.util

    package, _, sub = spec.partition("/")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise UserError(f"pkg:{spec}: Python package {package!r} is not installed; pip install it (see the recipe's comment)")
    return Path(list(found.submodule_search_locations)[0]) / sub


class _StepError(ValueError):
    """A step error whose message is complete (path=None) or needs ``path: `` in front."""

    def __init__(self, path: str | None, message: str):
        super().__init__(message)
        self.path = path


def parse_steps(raw: Any, kind: str) -> list[Step]:
    if raw is None:
        return []
    if isinstance(raw, list) and raw and all(isinstance(s, Step) for s in raw):
        return raw
    if not isinstance(raw, list):
        raise _StepError(kind, f"must be a list of steps like '- {'onnx' if kind == 'export' else 'train.supervised'}: {{...}}'")
    reg = registry()
    valid = sorted(n.removeprefix("export.") if kind == "export" else n for n, p in reg.items() if p.kind == kind)
    steps = []
    for i, item in enumerate(raw):
        path = f"{kind}[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        of = None
        if kind == "export" and isinstance(item, dict) and "of" in item:
            item = dict(item)
            of = item.pop("of")
            if not isinstance(of, str):
                raise _StepError(f"{path}.of", "must name a compress pass of this recipe (e.g. train.supervised) or 'source'")
        if not isinstance(item, dict) or len(item) != 1:
            raise _StepError(path, "each step is a mapping with exactly one pass name, e.g. '- onnx: {opset: 17}'"
                             + (" (export steps may add 'of: STEP')" if kind == "export" else ""))
        (name, cfg), = item.items()
        full = canonical_name(str(name), kind)
        cls_ = reg.get(full)
        if cls_ is None or cls_.kind != kind:
            raise _StepError(path, f"unknown {kind} pass {name!r}{suggest(str(name), valid)}")
        try:
            config = cls_.Config.model_validate(cfg or {})
        except ValidationError as e:
            raise _StepError(None, _format_validation(e, cls_.Config, prefix=f"{path}.{name}")) from None
        steps.append(Step(kind=kind, name=full, config=config, path=f"{path}.{name}", of=of))
    return steps


# -- loading -----------------------------------------------------------------

def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; check the path (examples live in examples/recipes/)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{where}: {problem}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file; a recipe is YAML") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a YAML mapping (name:, model:, ...), not {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return recipe_from_dict(raw, base_dir=path.resolve().parent, origin=str(path))


def recipe_from_dict(raw: dict[str, Any], base_dir: Path = Path("."), origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate({**raw, "base_dir": base_dir})
    except ValidationError as e:
        raise UserError(f"{origin}: {_format_validation(e, Recipe)}") from None


def _format_validation(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """One line for the first (root-cause) error: its YAML path and the fix."""
    e = err.errors()[0]
    loc = list(e["loc"])
    ctx = e.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _StepError):
        return str(inner) if inner.path is None else f"{inner.path}: {inner}"
    path = _yaml_path(loc)
    if prefix:
        path = prefix if path == "(top level)" else prefix + ("" if path.startswith("[") else ".") + path
    if e["type"] == "extra_forbidden":
        fields = _fields_at(root, loc[:-1])
        hint = suggest(str(loc[-1]), fields) if fields else ""
        return f"{path}: unknown key{hint}"
    if e["type"] == "missing":
        return f"{path}: required field is missing"
    msg = e["msg"].removeprefix("Value error, ")
    got = e.get("input")
    if e["type"] in ("literal_error", "enum") and not isinstance(got, (dict, list)):
        msg = f"{got!r} is not one of {ctx.get('expected', '')}".rstrip()
    return f"{path}: {msg}"


def _yaml_path(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _fields_at(model: Any, loc: list[Any]) -> list[str]:
    """Field names of the pydantic model reached by following ``loc`` from ``model``."""
    t: Any = model
    for part in loc:
        t = _unwrap(t)
        if isinstance(part, int):
            args = typing.get_args(t)
            t = args[0] if args else None
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return []
    t = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [n for n in t.model_fields if n != "base_dir"]
    return []


def _unwrap(t: Any) -> Any:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if models else (args[0] if args else t)
    return t


# -- --set a.b=c -------------------------------------------------------------

_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b[0].c=value`` (value parsed as YAML) to the raw recipe dict.

    Pass names contain dots (``train.supervised``): inside a mapping the longest
    existing key that matches the next dotted words wins.
    """
    key, sep, value_text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r} must look like a.b.c=value")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        raise UserError(f"--set {item!r}: the value is not valid YAML") from None
    tokens: list[str | int] = []
    for m in _TOKEN.finditer(key):
        tokens.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    node: Any = raw
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        last = i == len(tokens) - 1
        if isinstance(tok, int):
            if not isinstance(node, list) or tok >= len(node):
                raise UserError(f"--set {key}: index [{tok}] does not exist in the recipe")
            if last:
                node[tok] = value
                return
            node = node[tok]
            i += 1
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {tok!r} is below a value that is not a mapping")
        # longest dotted key that exists here
        j = i
        for k in range(len(tokens), i, -1):
            words = tokens[i:k]
            if all(isinstance(w, str) for w in words) and ".".join(words) in node:  # type: ignore[arg-type]
                j = k - 1
                break
        name = ".".join(str(w) for w in tokens[i : j + 1])
        if j == len(tokens) - 1:
            node[name] = value
            return
        if name not in node or node[name] is None:
            node[name] = [] if isinstance(tokens[j + 1], int) else {}
        node = node[name]
        i = j + 1


def schema_reference() -> str:
    """A Markdown reference of every recipe section and pass config, from the schema."""
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for fname, f in model.model_fields.items():
            if fname in ("base_dir",):
                continue
            ann = _unwrap(f.annotation)
            key = f"{prefix}{fname}"
            if isinstance(ann, type) and issubclass(ann, BaseModel) and ann is not TensorSpec:
                walk(ann, key + ".")
                continue
            default = "required" if f.is_required() else _short(f.get_default(call_default_factory=True))
            lines.append(f"| `{key}` | {_type_name(f.annotation)} | {default} | {f.description or ''} |")

    walk(Recipe, "")
    out = ["### Recipe", "", *lines, ""]
    for name, cls_ in sorted(registry().items()):
        out += [f"### `{name}` ({cls_.kind}; takes {', '.join(cls_.accepts)})", ""]
        doc = (cls_.__doc__ or "").strip().splitlines()
        if doc:
            out += [doc[0], ""]
        lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        walk(cls_.Config, "")
        out += [*lines, ""]
    return "\n".join(out)


def _short(v: Any) -> str:
    if isinstance(v, BaseModel):
        return "{...}"
    return f"`{v!r}`" if v not in (None, {}, []) else f"`{v}`"


def _type_name(t: Any) -> str:
    s = str(t).replace("typing.", "")
    s = re.sub(r"<class '([^']+)'>", r"\1", s)
    s = s.replace("edgekit.artifact.", "").replace("NoneType", "None")
    return s.replace("|", "\\|")
