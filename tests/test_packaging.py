"""Every folder with an __init__.py is a listed, importable subpackage."""

import importlib
import tomllib
from pathlib import Path

ROOTS = {"edgekit": "edgekit", "compress": "edgekit.compress", "export": "edgekit.export",
         "runtimes": "edgekit.runtimes", "fpga": "edgekit.fpga", "models": "edgekit.models"}


def test_every_subpackage_is_listed_and_importable(root):
    config = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    for folder, package in ROOTS.items():
        for init in sorted((root / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(root / folder).parts
            name = ".".join((package, *rel))
            assert name in listed, f"{name} is missing from pyproject.toml [tool.setuptools] packages"
            importlib.import_module(name)


def test_every_builtin_pass_module_registers(root):
    from edgekit.passes import BUILTIN_PASS_MODULES, registry

    reg = registry()
    assert {"train.supervised", "export.onnx"} <= set(reg)
    for module in BUILTIN_PASS_MODULES:
        importlib.import_module(module)
