"""The math layers import no NumPyro and rebind no JAX names (docs/design.md, Layers)."""

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "numpyro_svae"
PURE = ["expfam", "messages", "meanfield"]
FORBIDDEN = {"numpyro", "arviz", "equinox", "flax", "wandb", "optax", "matplotlib"}
JAX_NAMES = {"jit", "vmap", "grad"}


def _files(layer):
    return sorted((PKG / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", PURE)
def test_pure_layers_do_not_import_front(layer):
    files = _files(layer)
    assert files, f"layer {layer} has no modules"
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                assert top not in FORBIDDEN, f"{f.relative_to(PKG)} imports {n}"
                # pure layers may not reach up into the front modules either
                assert not n.startswith("numpyro_svae.") or n.split(".")[1] in (
                    PURE + ["_linalg"]
                ), f"{f.relative_to(PKG)} imports front module {n}"


@pytest.mark.parametrize("layer", PURE)
def test_no_module_level_jax_rebinding(layer):
    for f in _files(layer):
        tree = ast.parse(f.read_text())
        for node in tree.body:
            targets = []
            if isinstance(node, ast.FunctionDef):
                targets = [node.name]
            elif isinstance(node, ast.Assign):
                targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
            for t in targets:
                assert t not in JAX_NAMES, f"{f.relative_to(PKG)} rebinds `{t}`"
