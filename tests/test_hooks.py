"""Forward hooks of the locate-then-edit pieces, and the package's import structure around them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from harness.algorithms.hooks import Hooks, StopForward, add_at, module_input, module_output
from harness.models import model_spec, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_module_input_and_output_stop_the_forward_where_read(arch):
    model, tok = tiny_model(arch, n_layers=3)
    spec = model_spec(model)
    enc = tok(["The capital of France is", "Paris"], return_tensors="pt", padding=True)
    seen: dict[str, torch.Tensor] = {}
    ran_last = []
    with Hooks() as hooks:  # the reference: a whole forward with plain recording hooks
        hooks.input(model.get_submodule(spec.mlp_out.format(1)), lambda m, a, kw: seen.__setitem__("in", a[0]))
        hooks.output(model.get_submodule(spec.layer.format(1)), lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
        model(**enc)
    with Hooks() as hooks:
        hooks.output(model.get_submodule(spec.layer.format(2)), lambda m, a, out: ran_last.append(1))
        x = module_input(model, model.get_submodule(spec.mlp_out.format(1)), **enc)
        h = module_output(model, model.get_submodule(spec.layer.format(1)), **enc)
        assert not ran_last  # both forwards ended at layer 1
    assert torch.equal(x, seen["in"]) and torch.equal(h, seen["out"])
    assert _no_hooks(model)


def test_hooks_are_removed_when_the_forward_raises():
    model, tok = tiny_model("llama")
    block = model.get_submodule(model_spec(model).layer.format(0))

    def boom(_m, _a, _out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with Hooks() as hooks:
            hooks.output(block, boom)
            hooks.input(block, lambda m, a, kw: None)
            model(**tok("x", return_tensors="pt"))
    assert _no_hooks(model)
    with pytest.raises(StopForward):  # StopForward is only swallowed by run_to_stop and its users
        with Hooks() as hooks:
            hooks.output(block, lambda m, a, out: (_ for _ in ()).throw(StopForward()))
            model(**tok("x", return_tensors="pt"))
    assert _no_hooks(model)


def test_add_at_adds_one_vector_per_row_out_of_place():
    h = torch.zeros(2, 3, 4)
    out = add_at(h, torch.tensor([2, 0]), torch.tensor([[1.0] * 4, [2.0] * 4], dtype=torch.float64))
    assert out.dtype == h.dtype and not h.any()
    assert out[0, 2].tolist() == [1.0] * 4 and out[1, 0].tolist() == [2.0] * 4 and float(out.abs().sum()) == 12.0


# ----------------------------------------------------------------------------------------------
# structure: no import cycles, no private names across modules, one pad-id fallback


def _modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "harness").rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    """Every import statement of a module, at module level or inside functions (lazy imports count)."""
    return [n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in _imports(path):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names] if node.module else []
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start if one exists."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycle_through_the_algorithms_or_the_token_helpers():
    graph = _graph()
    assert "harness.algorithms.target" in graph and "harness.tokens" in graph
    checked = [m for m in graph if m.startswith("harness.algorithms") or m in ("harness.tokens", "harness.probes.scorer")]
    cycles = {m: c for m in checked if (c := _cycle_through(graph, m))}
    assert not cycles, cycles


def test_no_private_name_is_imported_across_harness_modules():
    bad = [f"{name}: from {node.module} import {a.name}" for name, path in _modules().items()
           for node in _imports(path) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness")
           for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def test_shared_helpers_are_defined_once():
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in _modules().items()}
    defined: dict[str, list[str]] = {}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(name)
    where = {h: defined.get(h) for h in ("pad_id", "pad_batch", "encode_pairs", "encode_right_padded", "target_text",
                                         "StopForward", "hidden_of", "replace_hidden", "model_device")}
    assert all(len(mods or []) == 1 for mods in where.values()), where
    assert not [n for n in defined if n.lstrip("_") in ("Stop", "EncodedPair")], "a second stop exception or pair type"
    # the pad-id fallback is read in one place (tiny.py only passes its tokenizer's pad id to the tiny
    # model's config)
    readers = sorted({name for name, tree in trees.items() for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr == "pad_token_id"})
    assert readers == ["harness.tiny", "harness.tokens"], readers
