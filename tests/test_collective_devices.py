"""Every tensor a collective sees must live on the rank's device (NCCL takes CUDA tensors only).

gloo accepts CPU tensors, so a CPU-only CI never notices a collective fed a tensor that was made
on the host: plain data parallel on NCCL all-reduced the CPU `figures` tensor of
`LocalStepExecutor.run` (issue 9, defect 5). Two complementary checks catch that class of bug
without a GPU.

1. A static lint (ast) over every .py file of megads/, pipeline/ and data/ (not megads/testing/).
   Rules:

   C1  A *collective* is a call of one of `COLLECTIVES` as `dist.X` / `torch.distributed.X` (any
       alias of torch.distributed), as a name imported from torch.distributed, or as a callback
       parameter named like one (`update_expert_bias(all_reduce=...)` calls `all_reduce(t)`).
       `barrier` and the object collectives (`all_gather_object`, ...) are not checked: they carry
       no tensor of ours (NCCL's object collectives stage through the current CUDA device).
   C2  One level of wrappers: a function or method whose body passes one of its parameters to a
       collective is a collective for that argument. Methods match `self.name(...)` in the same
       class; functions match `name(...)` in their module or where they are imported by name
       from another linted module.
   C3  Tensor arguments: every positional argument and keyword value except `NON_TENSOR_KW`
       (group=, op=, src=, split sizes, ...). List/tuple displays are checked element by element.
   H   An expression is *host-made* when it contains, outside a placing call (P):
         - a torch factory of `FACTORIES` (torch.zeros/ones/empty/full/tensor/arange/rand/... and
           those names imported from torch) called without a `device=` keyword;
         - a `.cpu()` / `.pin_memory()` call;
         - a local name (or `self.attr` of the enclosing class) one of whose assignments before
           this point is host-made (followed through `MAX_DEPTH` assignments).
       `*_like` factories and `t.new_*` inherit their input's device and are not factories.
   P   A placing call hides what is inside it: `.to(...)` given a device (a positional argument
       that does not look like a dtype, or `device=`), `.cuda()`, and any factory with `device=`.
       Scalar reads (`.item()`, `.tolist()`, `.numel()`, `.shape`, `float()`, `len()`, ...) end
       the search too: what they return is not a tensor.
   Findings of a host-made tensor argument of a collective fail the test, unless allow-listed in
   `ALLOWED` with a reason. Known limits: assignments through subscripts (`x[i] = ...`), loop
   targets and attributes of objects other than `self` are not followed; reaching definitions
   are approximated by "assigned earlier in the function (or anywhere in an enclosing one)".

2. A dynamic check: real `ParallelExecutor`s (and the trainer's overlapped one, `overlap_fb=True`) on 2
   gloo ranks, under a `HostTracker` (a TorchFunctionMode) and with torch.distributed's tensor
   collectives wrapped by a recorder. On a CPU-only machine every tensor's device is "cpu", so
   comparing devices alone cannot bite; the tracker therefore simulates an accelerator: the
   executor's device stands for the accelerator and the tracker marks the storage of every
   tensor that would be on the host there (a factory without `device=`, `.cpu()`, the input
   batches), propagates the mark through ops whose tensor inputs are all marked, and clears it
   on `.to(device)` / `.cuda()` (which then return a fresh copy, as a host-to-device copy would).
   The recorder checks that each tensor argument is on the executor's device and unmarked, and
   records (rather than raises, which would hang the peer) every violation with the line that
   made the tensor. `torch.set_default_device("meta")` was considered and rejected: the model
   would be built on meta (`.to("cpu")` of a meta tensor has no data to copy) and gloo cannot
   send meta tensors.

Shapes: none (tiny_config model, see megads/testing/parallel.py).
"""

from __future__ import annotations

import ast
import json
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
LINTED = ("megads", "pipeline", "data")
SKIPPED = ("megads/testing",)

COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather_single", "reduce_scatter_single",
    "broadcast", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv",
    "isend", "irecv", "P2POp", "batch_isend_irecv",
})
NON_TENSOR_KW = frozenset({
    "group", "op", "src", "dst", "async_op", "output_split_sizes", "input_split_sizes", "peer", "tag",
    "group_src", "group_dst", "group_peer", "async_ops",
})
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "tensor", "arange", "range", "linspace", "logspace", "eye",
    "rand", "randn", "randint", "randperm", "normal", "as_tensor", "asarray", "from_numpy",
    "scalar_tensor", "empty_strided", "frombuffer",
})
DTYPES = frozenset({
    "float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "uint8", "int16",
    "int32", "int64", "int", "long", "short", "bool", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2",
})
SCALAR_METHODS = frozenset({
    "item", "tolist", "numel", "nelement", "size", "dim", "element_size", "data_ptr", "stride",
    "is_contiguous", "get_device",
})
SCALAR_ATTRS = frozenset({"shape", "device", "dtype", "ndim", "is_cuda", "requires_grad", "is_leaf"})
SCALAR_FUNCS = frozenset({"float", "int", "len", "bool", "round", "str", "range", "isinstance", "id"})
HOST_METHODS = frozenset({"cpu", "pin_memory"})
MAX_DEPTH = 6

# (path, function qualname, argument text) -> why a host tensor is fine there. Keep it short.
ALLOWED: dict[tuple[str, str, str], str] = {}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    function: str
    collective: str
    argument: str
    reason: str

    def key(self) -> tuple[str, str, str]:
        return (self.path, self.function, self.argument)

    def __str__(self) -> str:
        return f"{self.path}:{self.line} in {self.function}: {self.collective}({self.argument}) gets {self.reason}"


_Scope = ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.Module


def _params(fn: ast.AST) -> list[str]:
    if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return []
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return names


def _target_names(t: ast.AST) -> Iterator[str]:
    if isinstance(t, ast.Name):
        yield t.id
    elif isinstance(t, ast.Tuple | ast.List):
        for e in t.elts:
            yield from _target_names(e)
    elif isinstance(t, ast.Starred):
        yield from _target_names(t.value)


def _self_attrs(t: ast.AST) -> Iterator[str]:
    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
        yield t.attr
    elif isinstance(t, ast.Tuple | ast.List):
        for e in t.elts:
            yield from _self_attrs(e)


def _pos(node: ast.AST) -> tuple[int, int]:
    return (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))


class _ModuleLint:
    """The lint over one parsed module (`wrappers` of every linted module resolve imported wrappers)."""

    def __init__(self, tree: ast.Module, path: str, module: str) -> None:
        self.tree, self.path, self.module = tree, path, module
        self.parent: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
        self.dist_aliases: set[str] = set()
        self.torch_aliases: set[str] = set()
        self.imported_collectives: dict[str, str] = {}
        self.imported_factories: dict[str, str] = {}
        self.imported_functions: dict[str, tuple[str, str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "torch.distributed" and a.asname:
                        self.dist_aliases.add(a.asname)
                    elif a.name.split(".")[0] == "torch" and a.asname is None:
                        self.torch_aliases.add("torch")
                    elif a.name == "torch":
                        self.torch_aliases.add(a.asname or "torch")
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    local = a.asname or a.name
                    if node.module == "torch" and a.name == "distributed":
                        self.dist_aliases.add(local)
                    elif node.module.startswith("torch.distributed") and a.name in COLLECTIVES:
                        self.imported_collectives[local] = a.name
                    elif node.module == "torch" and a.name in FACTORIES:
                        self.imported_factories[local] = a.name
                    elif node.module.split(".")[0] in LINTED:
                        self.imported_functions[local] = (node.module, a.name)
        # assignments: scope -> name -> [(position, value)]; class -> self attribute -> [values]
        self.assigned: dict[ast.AST, dict[str, list[tuple[tuple[int, int], ast.AST]]]] = {}
        self.class_attrs: dict[ast.ClassDef, dict[str, list[ast.AST]]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign | ast.NamedExpr) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            scope = self.scope_of(node)
            for t in targets:
                for name in _target_names(t):
                    self.assigned.setdefault(scope, {}).setdefault(name, []).append((_pos(node), value))
                cls = self.class_of(node)
                if cls is not None:
                    for attr in _self_attrs(t):
                        self.class_attrs.setdefault(cls, {}).setdefault(attr, []).append(value)
        self.wrappers: dict[tuple[str | None, str], dict[str, str]] = {}  # (class, fn) -> param -> collective
        self.offsets: dict[tuple[str | None, str], int] = {}  # positional args skipped (self/cls)
        self.params_of: dict[tuple[str | None, str], list[str]] = {}

    # ------------------------------------------------------------------ structure
    def scope_of(self, node: ast.AST) -> _Scope:
        p = self.parent.get(node)
        while p is not None and not isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            p = self.parent.get(p)
        return p if p is not None else self.tree

    def scopes(self, node: ast.AST) -> list[_Scope]:
        out: list[_Scope] = []
        s = self.scope_of(node)
        while not isinstance(s, ast.Module):
            out.append(s)
            s = self.scope_of(s)
        out.append(self.tree)
        return out

    def class_of(self, node: ast.AST) -> ast.ClassDef | None:
        p = self.parent.get(node)
        while p is not None and not isinstance(p, ast.ClassDef):
            p = self.parent.get(p)
        return p

    def qualname(self, node: ast.AST) -> str:
        names = []
        p: ast.AST | None = node
        while p is not None:
            if isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.append(p.name)
            p = self.parent.get(p)
        return ".".join(reversed(names)) or "<module>"

    # ------------------------------------------------------------------ what a call is
    def _is_dist(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.dist_aliases
        return (
            isinstance(node, ast.Attribute) and node.attr == "distributed"
            and isinstance(node.value, ast.Name) and node.value.id in self.torch_aliases
        )

    def collective(self, call: ast.Call) -> str | None:
        f = call.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and self._is_dist(f.value):
            return f.attr
        if isinstance(f, ast.Name):
            if f.id in self.imported_collectives:
                return self.imported_collectives[f.id]
            if f.id in COLLECTIVES and any(f.id in _params(s) for s in self.scopes(call)):
                return f.id  # a callback parameter named like a collective
        return None

    def factory(self, call: ast.Call) -> str | None:
        f = call.func
        if isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name):
            if f.value.id in self.torch_aliases:
                return f"torch.{f.attr}"
        if isinstance(f, ast.Name) and f.id in self.imported_factories:
            return f"torch.{self.imported_factories[f.id]}"
        return None

    @staticmethod
    def tensor_args(call: ast.Call) -> Iterator[tuple[str | int, ast.AST]]:
        yield from enumerate(call.args)
        for k in call.keywords:
            if k.arg is not None and k.arg not in NON_TENSOR_KW:
                yield k.arg, k.value

    def find_wrappers(self) -> None:
        """C2: functions/methods whose body hands one of their parameters to a collective."""
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            owner = self.parent.get(node)
            if isinstance(owner, ast.ClassDef):
                cls: str | None = owner.name
                static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
                skip = 0 if static else 1
            elif isinstance(owner, ast.Module):
                cls, skip = None, 0
            else:
                continue
            params = _params(node)
            found: dict[str, str] = {}
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and (name := self.collective(call)) is not None:
                    for _, a in self.tensor_args(call):
                        for e in a.elts if isinstance(a, ast.List | ast.Tuple) else [a]:
                            if isinstance(e, ast.Name) and e.id in params[skip:]:
                                found[e.id] = name
            if found:
                self.wrappers[(cls, node.name)] = found
                self.offsets[(cls, node.name)] = skip
                self.params_of[(cls, node.name)] = params

    # ------------------------------------------------------------------ H / P
    def _moves(self, call: ast.Call) -> bool:
        f = call.func
        if not isinstance(f, ast.Attribute):
            return False
        if f.attr == "cuda":
            return True
        if f.attr != "to":
            return False
        if any(k.arg == "device" for k in call.keywords):
            return True
        for a in call.args:
            dtype_like = (
                (isinstance(a, ast.Attribute) and (a.attr in DTYPES or a.attr == "dtype"))
                or (isinstance(a, ast.Name) and "dtype" in a.id.lower())
            )
            if not dtype_like:
                return True
        return False

    def host_reason(self, expr: ast.AST, at: ast.AST, depth: int = 0, seen: frozenset[Any] = frozenset()) -> str | None:
        """Why `expr` (evaluated at node `at`) would be a host tensor under rules H/P, or None."""
        if isinstance(expr, ast.Call):
            f = expr.func
            if self._moves(expr):
                return None
            fac = self.factory(expr)
            if fac is not None:
                if any(k.arg == "device" for k in expr.keywords):
                    return None
                return f"{fac}(...) without device= (line {expr.lineno})"
            if isinstance(f, ast.Attribute):
                if f.attr in HOST_METHODS:
                    return f".{f.attr}() (line {expr.lineno})"
                if f.attr in SCALAR_METHODS:
                    return None
            if isinstance(f, ast.Name) and f.id in SCALAR_FUNCS:
                return None
        if isinstance(expr, ast.Attribute):
            if expr.attr in SCALAR_ATTRS:
                return None
            if isinstance(expr.value, ast.Name) and expr.value.id == "self":
                cls = self.class_of(at)
                key = ("self", id(cls), expr.attr)
                if cls is None or key in seen or depth >= MAX_DEPTH:
                    return None
                for value in self.class_attrs.get(cls, {}).get(expr.attr, []):
                    r = self.host_reason(value, value, depth + 1, seen | {key})
                    if r is not None:
                        return f"self.{expr.attr} <- {r}"
                return None
        if isinstance(expr, ast.Name):
            return self._name_reason(expr.id, at, depth, seen)
        if isinstance(expr, ast.Subscript):
            return self.host_reason(expr.value, at, depth, seen)
        if isinstance(expr, ast.Lambda | ast.FunctionDef):
            return None
        for child in ast.iter_child_nodes(expr):
            r = self.host_reason(child, at, depth, seen)
            if r is not None:
                return r
        return None

    def _name_reason(self, name: str, at: ast.AST, depth: int, seen: frozenset[Any]) -> str | None:
        for i, scope in enumerate(self.scopes(at)):
            defs = self.assigned.get(scope, {}).get(name, [])
            if i == 0:  # innermost: only assignments before this point
                defs = [(p, v) for p, v in defs if p < _pos(at)]
            if defs:
                key = (id(scope), name)
                if key in seen or depth >= MAX_DEPTH:
                    return None
                for _, value in defs:
                    r = self.host_reason(value, value, depth + 1, seen | {key})
                    if r is not None:
                        return f"{name} <- {r}"
                return None
            if name in _params(scope):
                return None
        return None

    # ------------------------------------------------------------------ the lint
    def check(self, all_wrappers: dict[str, _ModuleLint]) -> list[Finding]:
        out: list[Finding] = []
        for call in ast.walk(self.tree):
            if not isinstance(call, ast.Call):
                continue
            checked: list[tuple[str, ast.AST]] = []
            name = self.collective(call)
            if name is not None:
                checked = [(name, a) for _, a in self.tensor_args(call)]
            else:
                checked = self._wrapper_args(call, all_wrappers)
            for coll, arg in checked:
                for e in arg.elts if isinstance(arg, ast.List | ast.Tuple) else [arg]:
                    r = self.host_reason(e, call)
                    if r is not None:
                        out.append(Finding(self.path, call.lineno, self.qualname(call), coll, ast.unparse(e), r))
        return out

    def _wrapper_args(self, call: ast.Call, all_wrappers: dict[str, _ModuleLint]) -> list[tuple[str, ast.AST]]:
        f = call.func
        owner: _ModuleLint | None = None
        key: tuple[str | None, str] | None = None
        shown = ""
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "self":
            cls = self.class_of(call)
            if cls is not None and (cls.name, f.attr) in self.wrappers:
                owner, key, shown = self, (cls.name, f.attr), f"self.{f.attr}"
        elif isinstance(f, ast.Name):
            if (None, f.id) in self.wrappers:
                owner, key, shown = self, (None, f.id), f.id
            elif f.id in self.imported_functions:
                mod, fn = self.imported_functions[f.id]
                other = all_wrappers.get(mod)
                if other is not None and (None, fn) in other.wrappers:
                    owner, key, shown = other, (None, fn), f.id
        if owner is None or key is None:
            return []
        params, skip, wanted = owner.params_of[key], owner.offsets[key], owner.wrappers[key]
        out = []
        for i, a in enumerate(call.args):
            if skip + i < len(params) and params[skip + i] in wanted:
                out.append((f"{shown} -> {wanted[params[skip + i]]}", a))
        for k in call.keywords:
            if k.arg in wanted:
                out.append((f"{shown} -> {wanted[k.arg]}", k.value))
        return out


def lint_sources(sources: dict[str, str]) -> list[Finding]:
    """Rules C1-C3, H, P over {relative path: source}; the findings, allow-list not applied."""
    mods: dict[str, _ModuleLint] = {}
    for path, src in sources.items():
        module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        mods[module] = _ModuleLint(ast.parse(src, filename=path), path, module)
    for m in mods.values():
        m.find_wrappers()
    return [f for m in mods.values() for f in m.check(mods)]


def repo_sources() -> dict[str, str]:
    out = {}
    for top in LINTED:
        for p in sorted((REPO / top).rglob("*.py")):
            rel = p.relative_to(REPO).as_posix()
            if not rel.startswith(SKIPPED):
                out[rel] = p.read_text()
    return out


# ------------------------------------------------------------------------------------------------
# 1. the lint


def test_lint_catches_the_plain_dp_figures_pattern() -> None:
    """The shape of issue 9's defect 5: a wrapper method, a host factory inside torch.cat."""
    src = '''
import torch
import torch.distributed as dist

class Ex:
    def _sum(self, t):
        if self.group is not None:
            dist.all_reduce(t, group=self.group)

    def run(self, sums, n, tokens):
        figures = torch.cat([sums / n, torch.tensor([float(tokens)], dtype=torch.float64)])
        self._sum(figures)
        return figures.tolist()
'''
    found = lint_sources({"x/ex.py": src})
    assert [(f.line, f.function, f.collective, f.argument) for f in found] == [
        (12, "Ex.run", "self._sum -> all_reduce", "figures")
    ], found
    assert "torch.tensor(...) without device=" in found[0].reason


def test_lint_rules_one_by_one() -> None:
    bad = '''
import torch
from torch import distributed as d
from torch.distributed import broadcast as bc

def direct(group):
    d.all_reduce(torch.zeros(3), group=group)                       # factory as the argument

def through_name(x, group):
    y = torch.ones(4, dtype=torch.float64)
    z = y * x.sum()
    d.all_gather_into_tensor(z, x, group=group)                     # y <- factory, two levels

def imported(x):
    h = x.detach().cpu()
    bc(h, src=0)                                                    # .cpu() result

def p2p(x, peer):
    buf = torch.empty(8)
    ops = [d.P2POp(d.isend, x, peer), d.P2POp(d.irecv, buf, peer)]  # receive buffer on the host
    return d.batch_isend_irecv(ops)                                 # ... and the list holding it

def callback(counts, all_reduce=None):
    stats = torch.stack([counts, torch.arange(3.0)])
    all_reduce(stats)                                               # callback named like a collective

def helper(t, *, group=None):
    torch.distributed.reduce_scatter_tensor(t[:1], t, group=group)

def uses_helper():
    helper(torch.full((2,), 1.0))                                   # module-level wrapper

class Stage:
    def __init__(self):
        self.stats = torch.zeros(3)

    def sync(self):
        d.all_reduce(self.stats)                                    # self attribute made on the host
'''
    got = sorted((f.line, f.argument) for f in lint_sources({"x/bad.py": bad}))
    assert got == [
        (7, "torch.zeros(3)"), (12, "z"), (16, "h"), (20, "buf"), (21, "ops"), (25, "stats"), (31, "torch.full((2,), 1.0)"),
        (38, "self.stats"),
    ], got

    clean = '''
import torch
import torch.distributed as dist

def placed(x, device, group):
    a = torch.zeros(3, dtype=torch.float64, device=device)
    b = torch.cat([x, torch.tensor([1.0], dtype=x.dtype)]).to(device)
    c = torch.tensor([float(x.numel())]).cuda()
    d = torch.zeros_like(x)
    e = x.new_empty(4)
    f = torch.empty(int(x.shape[0]), device=x.device)
    for t in (a, b, c, d, e, f):
        dist.all_reduce(t, group=group)
    g = torch.stack([x.sum(), x.max()]).to(x.device, non_blocking=True)
    dist.all_reduce(g)
    g = g.cpu()  # after the collective: fine
    dist.all_gather_object([None, None], g.tolist())
    dist.barrier()

def not_a_collective(all_reduce_fn, x):
    y = torch.zeros(3)
    all_reduce_fn(y)                                                 # unknown callback name
    return torch.distributed.get_rank(), x
'''
    assert lint_sources({"x/clean.py": clean}) == []


def test_lint_sees_the_repository() -> None:
    """The lint is not vacuous on the tree: it finds the collectives the executors really run."""
    sources = repo_sources()
    assert "megads/parallel/zero1.py" in sources and "pipeline/runtime.py" in sources
    assert not any(p.startswith("megads/testing/") for p in sources)
    seen = set()
    for path, src in sources.items():
        m = _ModuleLint(ast.parse(src), path, path)
        for call in ast.walk(m.tree):
            if isinstance(call, ast.Call) and (name := m.collective(call)) is not None:
                seen.add(name)
    assert {"all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "all_to_all_single",
            "P2POp", "batch_isend_irecv"} <= seen, seen


def test_no_host_tensor_reaches_a_collective() -> None:
    findings = lint_sources(repo_sources())
    stale = [k for k in ALLOWED if k not in {f.key() for f in findings}]
    assert not stale, f"allow-list entries that match nothing any more (remove them): {stale}"
    bad = [f for f in findings if f.key() not in ALLOWED]
    assert not bad, "tensors made on the host reach a collective (NCCL needs them on the rank's device; " \
        "create them with device=, or .to(device) the whole expression):\n" + "\n".join(map(str, bad))


# ------------------------------------------------------------------------------------------------
# 2. the dynamic check


_INTERNAL = frozenset({"_site", "__torch_function__", "mark", "_check", "_check_tensor", "wrapped"})


def _site() -> str:
    """The innermost frame of repository code (not torch, not this tracker) that is running."""
    f: Any = sys._getframe(1)
    here = Path(__file__).resolve()
    while f is not None:
        p = Path(f.f_code.co_filename)
        if p.is_absolute() and REPO in p.parents and p != here and ".venv" not in p.parts:
            return f"{p.relative_to(REPO).as_posix()}:{f.f_lineno}"
        if p == here and f.f_code.co_name not in _INTERNAL:
            return f"{p.relative_to(REPO).as_posix()}:{f.f_lineno}"
        f = f.f_back
    return "?"


_FACTORY_FUNCS = {getattr(torch, n) for n in FACTORIES if hasattr(torch, n)}  # with a tensor input: an op
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_HOST = {torch.Tensor.cpu, torch.Tensor.pin_memory}


class HostTracker(TorchFunctionMode):
    """Marks the storages of tensors that would live on the host if the executor's device were an
    accelerator (see the module docstring). `site(t)` is where a marked tensor was made, or None."""

    def __init__(self) -> None:
        super().__init__()
        # storage data_ptr -> [live marked tensors, the storage (kept so the address is not reused), site]
        self._marked: dict[int, list[Any]] = {}

    @staticmethod
    def _ptr(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return 0

    def mark(self, t: torch.Tensor, site: str) -> None:
        ptr = self._ptr(t)
        if not ptr:
            return
        entry = self._marked.setdefault(ptr, [0, t.untyped_storage(), site])
        entry[0] += 1
        weakref.finalize(t, self._unmark, ptr)

    def _unmark(self, ptr: int) -> None:
        entry = self._marked.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._marked[ptr]

    def site(self, t: torch.Tensor) -> str | None:
        entry = self._marked.get(self._ptr(t))
        return entry[2] if entry is not None else None

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) and not any(isinstance(x, torch.Tensor) for x in tree_leaves(out)):
            return out
        if func in _MOVES and self.site(args[0]) is not None:
            moved = func is torch.Tensor.cuda or "device" in kwargs or any(
                isinstance(a, torch.device | str) or (isinstance(a, torch.Tensor) and self.site(a) is None)
                for a in args[1:]
            )
            if moved:  # a host->device copy is a new tensor on the device
                return out.clone() if out is args[0] else out
        if func in _HOST:
            out = out.clone() if out is args[0] else out
            self.mark(out, _site())
            return out
        leaves_in = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        outs = [x for x in tree_leaves(out) if isinstance(x, torch.Tensor) and not any(x is i for i in leaves_in)]
        if func in _FACTORY_FUNCS and not leaves_in:
            if kwargs.get("device") is None:
                site = _site()
                for x in outs:
                    self.mark(x, site)
            return out
        if kwargs.get("device") is not None:
            return out  # *_like / new_* / a factory placed explicitly
        if leaves_in:  # an op: on the host iff all its tensor inputs are (an in-place op keeps its storage)
            sites = [self.site(x) for x in leaves_in]
            if all(s is not None for s in sites):
                for x in outs:
                    self.mark(x, sites[0])  # type: ignore[arg-type]
        return out


_WRAPPED = tuple(name for name in (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "all_gather_single", "reduce_scatter_single",  # torch >= 2.13's names of the two before
    "broadcast", "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv",
    "isend", "irecv", "batch_isend_irecv") if hasattr(dist, name))
_ORIG: dict[str, Any] = {name: getattr(dist, name) for name in _WRAPPED}
_ORIG_P2POP = dist.P2POp


class CollectiveRecorder:
    """Wraps torch.distributed's tensor collectives; records every call and every misplaced tensor."""

    def __init__(self, tracker: HostTracker, device: torch.device) -> None:
        self.tracker, self.device = tracker, device
        self.calls: dict[str, int] = {}
        self.violations: list[str] = []
        self._undo: list[tuple[Any, str, Any]] = []

    def _check(self, name: str, obj: Any) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        for t in tree_leaves(obj, is_leaf=lambda x: isinstance(x, _ORIG_P2POP)):
            if isinstance(t, _ORIG_P2POP):
                self._check_tensor(f"{name}/{'isend' if t.op is _ORIG['isend'] else 'irecv'}", t.tensor)
            elif isinstance(t, torch.Tensor):
                self._check_tensor(name, t)

    def _check_tensor(self, name: str, t: torch.Tensor) -> None:
        site = self.tracker.site(t)
        caller = _site()
        if t.device != self.device:
            self.violations.append(f"{name} at {caller}: tensor on {t.device}, the rank's device is {self.device}")
        elif site is not None:
            self.violations.append(f"{name} at {caller}: tensor made on the host at {site}")

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._check(name, [a for a in args if not isinstance(a, dist.ProcessGroup)] + [
                v for k, v in kwargs.items() if k not in NON_TENSOR_KW])
            return fn(*args, **kwargs)

        wrapped.__wrapped__ = fn  # type: ignore[attr-defined]
        return wrapped

    def install(self) -> None:
        orig_p2p = _ORIG_P2POP

        class P2POp(orig_p2p):  # type: ignore[misc, valid-type]
            """torch's P2POp accepts only the real isend/irecv: unwrap ours."""

            def __new__(cls, op: Any, *args: Any, **kwargs: Any) -> Any:
                return super().__new__(cls, getattr(op, "__wrapped__", op), *args, **kwargs)

            def __init__(self, op: Any, *args: Any, **kwargs: Any) -> None:
                super().__init__(getattr(op, "__wrapped__", op), *args, **kwargs)

        replace = {name: self._wrap(name, _ORIG[name]) for name in _WRAPPED}
        replace["P2POp"] = P2POp
        targets = [dist] + [m for n, m in list(sys.modules.items()) if n.split(".")[0] in LINTED and m is not None]
        for mod in targets:
            for name, new in replace.items():
                old = getattr(mod, name, None)
                if old is not None and old is (orig_p2p if name == "P2POp" else _ORIG[name]):
                    self._undo.append((mod, name, old))
                    setattr(mod, name, new)

    def uninstall(self) -> None:
        for mod, name, old in reversed(self._undo):
            setattr(mod, name, old)
        self._undo.clear()


DYN_LAYOUTS = (  # (pp, ep, schedule, executor)
    (1, 1, "1f1b", "ParallelExecutor"),  # plain data parallel, dp = 2
    (1, 2, "1f1b", "ParallelExecutor"),
    (2, 1, "1f1b", "ParallelExecutor"),
    (2, 1, "dualpipev", "overlapped"),  # what the trainer builds for pp > 1 DualPipeV
)


def _device_worker(rank: int, world: int, outdir: str) -> None:
    from megads.parallel.config import pieces_per_rank
    from megads.parallel.executor import OptimSettings, ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout
    from megads.testing.parallel import make_batches, tiny_config

    cfg = tiny_config()
    optim = OptimSettings(lr=1e-3, max_grad_norm=0.5, bias_update_speed=1e-3, bucket_numel=3000)
    batches = make_batches(cfg, steps=2, global_batch=8, seq_len=8)
    device = torch.device("cpu")  # stands for the rank's accelerator
    results = []
    for pp, ep, schedule, kind in DYN_LAYOUTS:
        tracker = HostTracker()
        rec = CollectiveRecorder(tracker, device)
        rec.install()
        t0 = time.perf_counter()
        try:
            with tracker:
                plan = plan_layout(
                    world_size=world, pp=pp, ep=ep, num_layers=cfg.num_hidden_layers,
                    n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
                    pieces_per_rank=pieces_per_rank(schedule) if pp > 1 else 1,
                )
                mesh = ParallelMesh.build(plan)
                ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, schedule=schedule, micro_batch_size=2, seed=3,
                                      optim=optim, device=device, overlap_fb=kind == "overlapped")
                losses = []
                for ids, labels in batches:
                    for t in (ids, labels):
                        tracker.mark(t, "the input batch (host memory)")
                    mbs = [{"input_ids": i, "labels": t} for i, t in ex.split_batch(ids, labels)]
                    m = ex.run(mbs, lr=optim.lr, mtp_weight=0.3, bias_update_speed=optim.bias_update_speed)
                    losses.append(m.loss)
                before = len(rec.violations)
                dist.all_reduce(torch.zeros(1), group=mesh.world_group)  # the canary: must be caught
                canary = rec.violations[before:]
                del rec.violations[before:]
        finally:
            rec.uninstall()
        results.append({
            "layout": f"pp{pp}_ep{ep}_{schedule}_{kind}", "calls": rec.calls, "violations": rec.violations,
            "canary": canary, "losses": losses, "wall_s": time.perf_counter() - t0,
        })
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


def test_tracker_marks_host_tensors() -> None:
    with HostTracker() as tr:
        a = torch.zeros(3)
        b = torch.cat([a / 2, torch.tensor([1.0])])
        c = b.to("cpu")
        d = torch.zeros(3, device="cpu")
        e = torch.cat([d, d]) + 1
        f = torch.zeros_like(b)
        g = d.cpu()
        h = b[1:]
        i = b.to(torch.float64)  # a dtype change stays on the host
        j = torch.as_tensor(d)  # a factory given a tensor follows it
        d += b[:3]  # in place: d stays where it is
        assert tr.site(a) and tr.site(b) and tr.site(f) and tr.site(g) and tr.site(h) and tr.site(i)
        assert tr.site(c) is None and tr.site(d) is None and tr.site(e) is None and tr.site(j) is None
        assert c is not b and torch.equal(c, b)
        assert tr.site(b).startswith("tests/test_collective_devices.py:")


@pytest.mark.timeout(300)
def test_executor_collectives_get_device_tensors(tmp_path: Path) -> None:
    from megads.testing.parallel import spawn

    spawn(2, _device_worker, str(tmp_path))
    problems = []
    for rank in range(2):
        for res in json.loads(Path(tmp_path, f"rank{rank}.json").read_text()):
            tag = f"rank {rank} {res['layout']}"
            assert len(res["canary"]) == 1 and "made on the host at tests/test_collective_devices.py" in \
                res["canary"][0], (tag, res["canary"])
            assert all(x == x for x in res["losses"]), (tag, res["losses"])
            calls = res["calls"]
            assert calls.get("all_reduce", 0) >= 2, (tag, calls)  # stats and expert load at least
            if "ep2" in tag:
                assert calls.get("all_to_all_single", 0) > 0, (tag, calls)
            if "pp2" in tag:
                assert calls.get("batch_isend_irecv", 0) > 0, (tag, calls)
            if "pp1_ep1" in tag:
                assert calls.get("reduce_scatter_tensor", 0) + calls.get("reduce_scatter_single", 0) > 0, calls
                assert calls.get("all_gather_into_tensor", 0) + calls.get("all_gather_single", 0) > 0, calls
            problems += [f"{tag}: {v}" for v in res["violations"]]
    assert not problems, "\n".join(dict.fromkeys(problems))
