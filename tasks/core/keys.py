"""Stage keys and the code versions they are made of.

A stage's key = its name + its code version + its inputs, where an upstream `StageOutput` contributes only its
content digest (else its key), a `Fingerprint` only its content digest and a config section its key material.
Nothing else — not the run id, not the flow parameters, not where the artifacts root is — so a change reruns
exactly the stages downstream of it.

A code version is computed from the code itself, never from a hand-kept list of names: the syntax tree of the
stage's body and of every definition it reaches inside the project (a helper of its module, a function or
constant of another stage module it imports, at module or function level, and what those reach in turn),
with docstrings and type annotations left out and comments never seen (they are not in the tree). So
- a helper added to a stage's module and called is covered without being listed;
- a comment or docstring edit changes no key, and nor does an edit of infrastructure (tasks/core/), a
  `summary()` or `links()` of a manifest type, or a `show()` that no body calls;
- a name the code refers to that exists nowhere fails when the stage is declared, at import
  (`CodeReferenceError`), instead of when a run reaches it.
What cannot be seen by reading names — a whole program started as a child process (the training child) — is
declared on the stage as a module (`code=[train_worker]`): its whole tree is covered.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import types
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.core.manifest import Fingerprint, StageOutput

# Modules whose code is part of no key: infrastructure (how outputs are stored and shown, not what they hold).
INFRASTRUCTURE = "tasks.core"
# Methods of manifest types that only present an output (log lines, what to open): part of no key.
PRESENTATION = frozenset({"summary", "links", "show"})


class CodeReferenceError(NameError):
    """A stage's code refers to a name defined nowhere (a renamed or deleted helper)."""


@dataclasses.dataclass(frozen=True)
class CodeSpec:
    version: int
    digest: str  # of the code the stage reaches, worked out when it is declared
    libraries: tuple[str, ...]
    key_exclude: frozenset[str]
    covered: tuple[str, ...]  # "module:name" of every definition in the digest (for `cpt` developers, tests)
    entry: str  # "module:name" of its first root: a stage whose code reaches it includes this one's version


_SPECS: dict[str, CodeSpec] = {}
_VERSIONS: dict[str, str] = {}


def register_code_version(stage: str, version: int, roots: list, libraries: list[str] = (),
                          key_exclude: frozenset[str] | set[str] = frozenset()) -> None:
    """Declare a stage (or a per-file piece of one): its explicit `version` (bump it when the output changes
    for the same inputs and code: tests/test_golden.py fails until you do), the code it runs (`roots`:
    functions, classes or modules; everything they reach in the project is found by reading them), the
    libraries whose versions shape its output, and the inputs that are not part of its key (`key_exclude`:
    inputs that say where something is or describe an input already keyed by content)."""
    digest, covered = _remembered(stage, roots)
    entry = _label(roots[0]) if roots else ""
    _SPECS[stage] = CodeSpec(version, digest, tuple(libraries), frozenset(key_exclude), tuple(covered), entry)
    _VERSIONS.clear()  # a stage that reaches this one includes its version


ALGORITHM = 2  # bump when what a code digest is made of changes (2: no module names)

# The stages' code as it was when digests stopped naming modules (ALGORITHM 1 -> 2): stage -> (its digest now,
# the digest the same code had before). Code whose digest is still the one on the left keeps the key it had, so
# that upgrade reruns nothing in a user's cache; code changed since gets a key of the new kind (and nothing here
# matches it again). The left side was re-pointed only for refactors of that same upgrade that change no output,
# each proven so by the golden outputs and the readers' tests: train (the static row length moved from the config
# into the training child's code, unchanged); load-file, load, evaluate-base, evaluate (the readers dispatched by
# a suffix -> reader table on one open file, each the same reader as before); chunk, chunk-part, token-stats,
# token-stats-part, mix, train, evaluate-base, evaluate (the window plan made once and read from the chunk output,
# the same windows); load (the pair decision shared with the drop gate, the same pairs); near-dedup-sig (its key
# no longer holds the threshold: new keys, which no old entry has). A bridge for one upgrade, not a way to keep a
# key: a change of what code does must never be entered here.
_CARRIED = {
    "chunk": ("17d1f6219b8b74f391647944bf95d083", "f96e8cd091c38f0bc8f88dddbd4a2109741abd16c9fdc74185ea3975e040a084"),
    "chunk-part": ("c07db237a4ad8128c86b4f48ec3fd898", "c77bfc59775281a848067a895a1aabe5057490b97221c3a89ce1086115ea1b5b"),
    "evaluate": ("e396ab42f6f493f0d4a0b0cc14d72609", "4a940a3141d355f2bc89ce69bba0dbdf58117f8820646196f3774b30e14eb108"),
    "evaluate-base": ("36ac45c1047796c23ed9ffe494d846a4", "7ef6a8c7742777019aca9dd0e37a4c96cecc57db198c74fea964c1bf877ef1a9"),
    "gate": ("d8e2fb5f13d7a57e03a5b5c16010b2a3", "dd2cda2555e0e02defd149ea181c630673891ac59f23c83ae9778bdd40edf386"),
    "held-out": ("3506a2e94119d04ed90e6869ca63b641", "95281f4e1ad6f3497a2f1ab0ab94c6cb9e8f87ae155f549dd27852df1213aa11"),
    "load": ("df7fcafb9defd4cce111094282bf999c", "66d17c0f62d6dcd88053f3419738ff2d3d1cb64760f7c2b8d692f1aa41ec1328"),
    "load-content": ("d6746de5031209e879098bab7d009f38", "6b4d3c82cf9f23f84bf9ebe8e857254f392893aca9db4b827ea6db986646f54a"),
    "load-file": ("bf02575c8c14b9c184dd58037ed81499", "7c6699df497a5259904b9721ffc9c3ecfb103df3ef1429b1e2ffd723ac668a53"),
    "mix": ("24fc9bfec6abac297f0c0c9dd4840df7", "8c1f9dcaf98898b0c044601c917747f23d2a1d758815d0171b3bd4d1c75e82e8"),
    "near-dedup-sig": ("25efc8f938ca15bd18c8e14bdeec28de", "3bed834900b05e71dadb99d1ce2cbe150a25235b8dc5682afd4a143e4ed060a5"),
    "push": ("05799cf2390bf7f45596bbeada207d93", "e8f3d6c7fedbe8438194f39d5796cf70da2e72cacaad6dfdc1fdfaf0d64b613e"),
    "shuffle": ("cd2332e6f7ccaf247ba845f6b5852af7", "f99c67ab7bbd944c495f089f9958c0d68d82ae66243bfccc3933ebbd0a5d5b20"),
    "token-stats": ("f662a636ba01b5cd46e141932850accf", "04b87fac7d29ecdd023029134b76e45da13cc143324421c1bf93caac07965a67"),
    "token-stats-part": ("208e1216bc0a598e40ebeb77d4beaa3b", "44ad18a4ed7a8ac27f9ae8b1e5537d765579ec14dd5820ed9c48f5e26579dee2"),
    "tokenize": ("4c5289ba9ff9dd4b344fa9b927db0c05", "9bc6137e3ddbf3d0fb37dc1c4ee1b54b8e7e9a37dac1b4048332109191f4366e"),
    "tokenize-file": ("ab1e8fe3b9e570943adb533e0b327ac1", "45e9fc5ad27ba639fc092d113075799897ceb0910f38c9280a486e35db6cc31e"),
    "train": ("f330ddd08c72ca15dc5a2051102575c2", "4d7d436d46658ca07aa3aa3a72222b9c5ad064b56ba9c37c850a5f91235f461f"),
}


@functools.cache
def _tree_digest() -> str:
    """The project's code as it is on disk now (every .py under tasks/): what a remembered digest holds for."""
    h = hashlib.sha256(f"{ALGORITHM}".encode())
    for path in sorted(_TASKS.rglob("*.py")):
        h.update(path.relative_to(_TASKS).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:24]


def _remembered(stage: str, roots: list) -> tuple[str, list[str]]:
    """`code_digest(roots)`, remembered in the user's cache per state of the code: reading the trees of every
    stage costs a few hundred ms at import, which a fully cached run should not pay again for code it has seen
    (a changed file makes a new state: computed and checked again, so a missing name still fails at import)."""
    if not all(_label(r).startswith("tasks.") for r in roots):  # code outside the project (a test's stage)
        return code_digest(roots)
    from tasks.core.paths import temp_beside, user_cache_dir

    path = user_cache_dir() / "code-versions" / f"{_tree_digest()}.json"
    key = f"{stage}\0" + "\0".join(_label(r) for r in roots)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), list) and len(known[key]) == 2:
        digest, covered = known[key]
        return str(digest), [str(c) for c in covered]
    digest, covered = code_digest(roots)
    known[key] = [digest, covered]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(path)
        tmp.write_text(json.dumps(known))
        os.replace(tmp, path)
    except OSError:  # a read-only cache: computed each time
        pass
    return digest, covered


def _label(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    obj = inspect.unwrap(obj)
    return f"{obj.__module__}:{obj.__qualname__.split('.')[0]}"


def pieces_of(stage: str) -> list[str]:
    """The per-file pieces a stage's code runs (their first root is in its code): their versions are in its
    own, so bumping a piece's version reruns the stage that lists the pieces too."""
    covered_here = set(_SPECS[stage].covered)
    return sorted(name for name, spec in _SPECS.items() if name != stage and spec.entry in covered_here)


@functools.cache
def library_version(name: str) -> str:
    """An installed package's version, looked up once per process: each lookup scans sys.path's distributions
    (~1.4 ms), and every stage's first key named its libraries again (numpy by nearly all of them). The code a
    process runs is what it imported, so a package upgraded under it does not change what it computes."""
    return importlib.metadata.version(name)


def code_version(stage: str, _seen: frozenset[str] = frozenset()) -> str:
    if stage in _VERSIONS:
        return _VERSIONS[stage]
    spec = _SPECS.get(stage)
    if spec is None:
        return "unregistered"
    digest = spec.digest
    carried = _CARRIED.get(stage)
    if carried is not None and digest.startswith(carried[0]):
        digest = carried[1]
    h = hashlib.sha256(f"{stage}@{spec.version}\0{digest}".encode())
    for lib in spec.libraries:
        h.update(f"{lib}=={library_version(lib)}".encode())
    for piece in pieces_of(stage):
        if piece not in _seen:
            h.update(f"\0{piece}={code_version(piece, _seen | {stage})}".encode())
    _VERSIONS[stage] = h.hexdigest()[:16]
    return _VERSIONS[stage]


def stage_version(stage: str) -> int:
    """The explicit version a stage declares."""
    return _SPECS[stage].version


def covered(stage: str) -> tuple[str, ...]:
    """The definitions ("module:name") a stage's code version is made of."""
    return _SPECS[stage].covered


def _canonical(value: Any) -> Any:
    if isinstance(value, (StageOutput, Fingerprint)):
        return value.key_material()
    if isinstance(value, BaseModel):  # a config section: its key material (less output-neutral fields)
        return value.key_material() if hasattr(value, "key_material") else value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    spec = _SPECS.get(stage)
    excluded = spec.key_exclude if spec else frozenset()
    payload = {
        "stage": stage,
        "code": code_version(stage),
        "inputs": {k: _canonical(v) for k, v in sorted(inputs.items()) if k not in excluded},
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


# ------------------------------------------------------------------------------- reading the code


@dataclasses.dataclass
class _Module:
    name: str
    defs: dict[str, ast.AST]  # top-level name -> the statement defining it
    imports: dict[str, tuple[str, str | None]]  # local name -> (module, attribute or None for the module)


def _project(module: str, home: str) -> bool:
    """Whether a module's code counts: the stage's own module and the project's, less infrastructure."""
    if module == INFRASTRUCTURE or module.startswith(INFRASTRUCTURE + "."):
        return False
    return module == home or module.startswith("tasks.")


_TASKS = Path(__file__).resolve().parents[1]  # the `tasks` package


def _source_of(name: str) -> Path | None:
    """The source file of a module, found on disk without importing anything (a project module is looked up
    in the package folder; importlib would import every parent package on the way)."""
    parts = name.split(".")
    if parts[0] == "tasks":
        base = _TASKS.joinpath(*parts[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@functools.cache
def _is_module(name: str) -> bool:
    return _source_of(name) is not None


def _import_map(nodes) -> dict[str, tuple[str, str | None]]:
    out: dict[str, tuple[str, str | None]] = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = (a.name, None)
                else:
                    out[a.name.split(".")[0]] = (a.name.split(".")[0], None)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                # Only the project's own packages are looked into: finding a submodule imports its parent, and
                # a library's (transformers) would cost its whole import.
                project = node.module == "tasks" or node.module.startswith("tasks.")
                out[a.asname or a.name] = (sub, None) if project and _is_module(sub) else (node.module, a.name)
    return out


@functools.cache
def _module(name: str) -> _Module:
    origin = _source_of(name)
    if origin is None:
        raise CodeReferenceError(f"{name}: no Python source to compute a code version from")
    tree = ast.parse(origin.read_text(encoding="utf-8"), filename=str(origin))
    defs: dict[str, ast.AST] = {}
    top_imports = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defs[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            top_imports.append(node)
        elif isinstance(node, (ast.If, ast.Try)):  # `if TYPE_CHECKING:` / `try: import …`
            top_imports += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return _Module(name, defs, _import_map(top_imports))


def _copy(node):
    """A copy of a syntax tree (fields only: positions are never dumped), several times faster than deepcopy."""
    if isinstance(node, ast.AST):
        new = node.__class__()
        for field, value in ast.iter_fields(node):
            setattr(new, field, _copy(value))
        return new
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def _strip(node: ast.AST, root: bool) -> ast.AST:
    """A copy without what does not change behaviour: docstrings and `description=` texts, annotations (but a
    stage body's parameter types), presentation methods of classes, and (for a stage body) the decorator, whose settings are keyed on
    their own."""
    node = _copy(node)
    keep: set[int] = set()  # a stage body's parameter types: they name the manifest types it reads
    if root and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        node.decorator_list = []
        keep = {id(a) for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and body:
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                n.body = body[1:] or [ast.Pass()]
        if isinstance(n, ast.ClassDef):
            n.body = [b for b in n.body if not (isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))
                                                and b.name in PRESENTATION)] or [ast.Pass()]
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n.returns = None
        if isinstance(n, ast.arg) and id(n) not in keep:
            n.annotation = None
        if isinstance(n, ast.AnnAssign):
            n.annotation = ast.Constant(None)
        if isinstance(n, ast.Call):  # pydantic's Field(description=…): documentation, like a docstring
            n.keywords = [k for k in n.keywords if k.arg != "description"]
    return node


def _bound(node: ast.AST) -> set[str]:
    """Every name a definition binds anywhere inside it (arguments, assignments, loops, imports, nested
    definitions, handlers): what it may use without a global."""
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            names.add(n.id)
        elif isinstance(n, ast.arg):
            names.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, ast.alias):
            names.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            names.update(n.names)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            names.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            names.add(n.rest)
    return names


def _parameter_types(node: ast.AST) -> list[str]:
    """Names used in a function's parameter annotations (`chunks: Chunks`): the manifest types it reads."""
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
    return [n.id for a in args if a.annotation is not None for n in ast.walk(a.annotation) if isinstance(n, ast.Name)]


def _references(node: ast.AST, module: _Module, home: str, where: str, root: bool):
    """(module, name) of every project definition `node` (already stripped) uses; a stage body's parameter types
    count too. Raises CodeReferenceError for a name bound nowhere."""
    local_imports = _import_map(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    bound = _bound(node)
    found: list[tuple[str, str]] = []

    def resolve(name: str) -> tuple[str, str | None] | None:
        if name in local_imports:
            return local_imports[name]
        if name in bound:  # a parameter or local of the same name shadows the module's
            return None
        if name in module.defs:
            return (module.name, name)
        return module.imports.get(name)

    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
            target = resolve(n.value.id)
            if target is not None and target[1] is None and _project(target[0], home):
                found.append((target[0], n.attr))  # `modeling.load_pretrained`
        if not (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)):
            continue
        target = resolve(n.id)
        if target is None:
            if n.id not in bound and not hasattr(builtins, n.id) and n.id != "__file__":
                raise CodeReferenceError(f"{where} uses {n.id!r}, which is defined nowhere (renamed or deleted?)")
            continue
        mod, attr = target
        if attr is not None and _project(mod, home):
            found.append((mod, attr))
    for name in _parameter_types(node) if root else []:
        target = module.defs.get(name) and (module.name, name) or module.imports.get(name)
        if target is not None and target[1] is not None and _project(target[0], home):
            found.append(target)
    return found


def _local_def(module: str, obj) -> ast.AST | None:
    """The definition of a function made inside another (a test's stage), found by its first line."""
    code = getattr(obj, "__code__", None)
    spec = importlib.util.find_spec(module)
    if code is None or spec is None or not spec.origin:
        return None
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == obj.__name__:
            first = n.decorator_list[0].lineno if n.decorator_list else n.lineno
            if code.co_firstlineno in (first, n.lineno):
                return n
    return None


def _ours(module: str, home: str) -> bool:
    """Whether a module is this project's (infrastructure included) or the stage's own: where its definitions
    live is not part of what they do."""
    return module == home or module == "tasks" or module.startswith("tasks.")


def _canonical_tree(node: ast.AST, module: _Module, home: str) -> ast.AST:
    """`node` (a stripped copy) with every trace of where the project's code lives taken out, so moving a
    definition to another module, renaming a module or splitting one changes no dump: an import of a project
    module is dropped (what it binds is followed by name), `module.name` becomes `name`, and an alias
    (`from tasks.x import f as g`; `g()`) becomes the name it stands for."""
    local_imports = _import_map(n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    bound = _bound(node)

    def resolve(name: str) -> tuple[str, str | None] | None:
        if name in local_imports:
            return local_imports[name]
        if name in bound:
            return None
        if name in module.defs:
            return (module.name, name)
        return module.imports.get(name)

    def project_import(n: ast.AST) -> bool:
        if isinstance(n, ast.ImportFrom):
            return not n.level and bool(n.module) and _ours(n.module, home)
        return all(_ours(a.name, home) for a in n.names)

    class Canonical(ast.NodeTransformer):
        def visit_Import(self, n):
            return None if project_import(n) else n

        visit_ImportFrom = visit_Import

        def visit_Attribute(self, n):
            if isinstance(n.value, ast.Name):
                target = resolve(n.value.id)
                if target is not None and target[1] is None and _ours(target[0], home):
                    return ast.Name(id=n.attr, ctx=n.ctx)
            return self.generic_visit(n)

        def visit_Name(self, n):
            target = resolve(n.id)
            if target is not None and _ours(target[0], home):
                return ast.Name(id=target[1] or "<module>", ctx=n.ctx)
            return n

    node = Canonical().visit(node)
    for n in ast.walk(node):  # a body left empty by a dropped import
        for field in ("body", "orelse", "finalbody"):
            if isinstance(getattr(n, field, None), list) and not getattr(n, field) \
                    and field == "body":
                setattr(n, field, [ast.Pass()])
    return node


@functools.cache
def _defining(mod_name: str, name: str) -> tuple[str, str]:
    """Where `mod_name`'s `name` is defined: a name a module only imports (a re-export, kept after a move so
    old importers work) is followed to the module that defines it, so the definition counts once."""
    seen = set()
    while (mod_name, name) not in seen:
        seen.add((mod_name, name))
        module = _module(mod_name)
        if name in module.defs or name not in module.imports:
            break
        target = module.imports[name]
        if target[1] is None or not target[0].startswith("tasks"):
            break
        mod_name, name = target
    return mod_name, name


@functools.cache
def _definition(mod_name: str, name: str, home: str, root: bool) -> tuple[str, tuple[tuple[str, str], ...]]:
    """One definition's normalised tree (with nothing of where it lives) and the project definitions it uses
    (stages share most of theirs: each is read once per process)."""
    module = _module(mod_name)
    node = module.defs.get(name)
    if node is None:
        raise CodeReferenceError(f"{mod_name}:{name} is defined nowhere (renamed or deleted?)")
    stripped = _strip(node, root)
    refs = tuple(_references(stripped, module, home, f"{mod_name}:{name}", root))
    return ast.dump(_canonical_tree(stripped, module, home), include_attributes=False), refs


def code_digest(roots: list) -> tuple[str, list[str]]:
    """The digest of the code `roots` reach in the project, and the definitions it covers."""
    todo: list[tuple[str, str, str, bool]] = []  # (module, name, home, is a stage body)
    seen: dict[str, str] = {}
    for i, obj in enumerate(roots):
        if isinstance(obj, types.ModuleType):
            mod = _module(obj.__name__)
            todo += [(obj.__name__, name, obj.__name__, False) for name in mod.defs]
            continue
        obj = inspect.unwrap(obj)
        module_name = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", "")
        if module_name == INFRASTRUCTURE or (module_name or "").startswith(INFRASTRUCTURE + "."):
            continue  # the plain StageOutput of a stage without a manifest type of its own
        if not module_name or not qualname:
            raise CodeReferenceError(f"{obj!r}: only functions, classes and modules have a code version")
        if "<locals>" in qualname:
            # Made inside a function (a test's stage): its own tree; names it takes from the enclosing function
            # cannot be followed, so they are not checked either.
            node = _local_def(module_name, obj)
            if node is None:
                raise CodeReferenceError(f"{obj!r}: its source cannot be found")
            label = f"{module_name}:{qualname}"
            stripped = _strip(node, i == 0)
            module = _module(module_name)
            seen[label] = ast.dump(_canonical_tree(_copy(stripped), module, module_name), include_attributes=False)
            try:
                refs = _references(stripped, module, module_name, label, i == 0)
            except CodeReferenceError:
                refs = []
            todo += [(m, a, module_name, False) for m, a in refs]
            continue
        todo.append((module_name, qualname.split(".")[0], module_name, i == 0))
    while todo:
        mod_name, name, home, root = todo.pop()
        mod_name, name = _defining(mod_name, name)
        label = f"{mod_name}:{name}"
        if label in seen:
            continue
        dump, refs = _definition(mod_name, name, home, root)
        seen[label] = dump
        todo += [(m, a, home, False) for m, a in refs]
    # The definitions' trees alone, in a fixed order: their modules' names are not part of the digest (a
    # definition's tree holds its own name), so where code lives changes no key.
    h = hashlib.sha256(f"code-digest-{ALGORITHM}".encode())
    for dump in sorted(seen.values()):
        h.update(dump.encode())
        h.update(b"\n")
    return h.hexdigest(), sorted(seen)
