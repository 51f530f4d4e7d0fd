"""The quick tier, ``pytest -m "not slow"``: which tests are slow, read from their code.

A test is marked slow when its code, or a helper, class or fixture of tests/ that it reaches, starts a
process (a script, a launcher, torchrun: anything through subprocess), or trains more than a few steps:
one training run of more than FEW_STEPS optimizer steps, or several runs. It is read from the code, so a
test added later is sorted without anyone marking it (tests/conftest.py marks them at collection).
"""

import ast
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROCESS_CALLS = {"subprocess.run", "subprocess.Popen", "subprocess.check_call", "subprocess.check_output",
                 "subprocess.call", "os.system", "os.execv", "os.execvp", "pty.spawn"}
TRAINING_CALLS = {"train", "main"}  # trainer.train(), a script's main() run in this process
STEP_FLAGS = {"--max_steps", "max_steps"}
FEW_STEPS = 4


@dataclass
class Reach:
    """What running a function's code comes to."""

    process: str | None = None  # the call that starts a process
    steps: int = 0  # the most optimizer steps a training run in it asks for
    runs: int = 0  # training runs (one in a loop counts as two)

    @property
    def slow(self) -> str | None:
        if self.process:
            return f"starts a process ({self.process})"
        if self.runs > 1:
            return "trains several times"
        if self.runs and self.steps > FEW_STEPS:
            return f"trains {self.steps} steps"
        return None


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _steps_in(values) -> int:
    """The most steps a flag list or keyword arguments ask for: '--max_steps', '40' or max_steps=40."""
    values = list(values)
    return max([int(after) for flag, after in zip(values, values[1:]) if isinstance(flag, str) and
                flag in STEP_FLAGS and isinstance(after, (int, str)) and str(after).isdigit()], default=0)


def _call_steps(call: ast.Call) -> int | None:
    """The steps a call asks for itself (max_steps=N, "--max_steps", "N"), or None when it names none."""
    keywords = [part for k in call.keywords if k.arg in STEP_FLAGS and isinstance(k.value, ast.Constant)
                for part in (k.arg, k.value.value)]
    constants = [node.value for arg in call.args for node in ast.walk(arg) if isinstance(node, ast.Constant)]
    named = any(k.arg in STEP_FLAGS for k in call.keywords) or any(isinstance(c, str) and c in STEP_FLAGS
                                                                    for c in constants)
    return max(_steps_in(keywords), _steps_in(constants)) if named else None


def _is_ours(obj) -> bool:
    try:
        return Path(inspect.getsourcefile(obj)).resolve().is_relative_to(TESTS)
    except TypeError:
        return False


LOOPS = (ast.For, ast.AsyncFor, ast.While, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@functools.cache
def reach(function, fixtures: frozenset = frozenset()) -> Reach:
    """What the code of a function or class of tests/ comes to, with what it calls there; ``fixtures``: the
    (name, function) of the fixtures a test gets, for a fixture that hands it a function to call."""
    found = Reach()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return found
    for definition in tree.body:  # its decorators (@pytest.mark.parametrize) hold data, not what it runs
        definition.decorator_list = []
    names = dict(vars(inspect.getmodule(function) or sys))  # what its module's names stand for
    for node in ast.walk(tree):  # and names imported inside it: `from conftest import run_script`
        if isinstance(node, ast.ImportFrom) and node.module in sys.modules:
            names.update({alias.asname or alias.name: getattr(sys.modules[node.module], alias.name, None)
                          for alias in node.names})
    names.update(fixtures)
    found.steps = _steps_in(node.value for node in ast.walk(tree) if isinstance(node, ast.Constant))
    for node in ast.walk(tree):  # a default: def helper(max_steps=10)
        if isinstance(node, ast.arguments):
            defaults = [*zip([*node.posonlyargs, *node.args][::-1], node.defaults[::-1]),
                        *zip(node.kwonlyargs, node.kw_defaults)]
            pairs = [part for arg, default in defaults if isinstance(default, ast.Constant)
                     for part in (arg.arg, default.value)]
            found.steps = max(found.steps, _steps_in(pairs))

    def ours(node):
        target = names.get(node.id) if isinstance(node, ast.Name) else None
        return target if target is not function and callable(target) and _is_ours(target) else None

    def runs_of_call(call: ast.Call) -> int:
        name = _dotted(call.func)
        found.steps = max(found.steps, _call_steps(call) or 0)
        if name in PROCESS_CALLS:
            found.process = found.process or name
        if isinstance(call.func, ast.Attribute) and call.func.attr in TRAINING_CALLS:
            return 1
        if (target := ours(call.func)) is None:
            return 0
        inner = reach(target)
        found.process = found.process or inner.process
        if _call_steps(call) is None:  # the call's own max_steps replaces the helper's default
            found.steps = max(found.steps, inner.steps)
        return inner.runs

    def runs(node) -> int:
        """Training runs ``node``'s code makes: a loop's twice (at least two), an if's the larger branch's."""
        if isinstance(node, ast.If):
            return runs(node.test) + max(block(node.body), block(node.orelse))
        count = 0
        for _, value in ast.iter_fields(node):
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                count += block(value)
            else:
                count += sum(runs(part) for part in (value if isinstance(value, list) else [value])
                             if isinstance(part, ast.AST))
        if isinstance(node, LOOPS):
            count *= 2
        return count + runs_of_call(node) if isinstance(node, ast.Call) else count

    def block(statements: list) -> int:
        """An if whose branch returns makes the rest of the block its other branch."""
        count = 0
        for k, statement in enumerate(statements):
            if isinstance(statement, ast.If) and isinstance(statement.body[-1], (ast.Return, ast.Raise)):
                return count + runs(statement.test) + max(block(statement.body),
                                                           block(statement.orelse) + block(statements[k + 1:]))
            count += runs(statement)
        return count

    found.runs = runs(tree)
    called = {node.func for node in ast.walk(tree) if isinstance(node, ast.Call)}
    values = dict(fixtures)  # a fixture named but not called is its value, counted once by the caller
    for node in ast.walk(tree):  # names used but not called here: passed on, to be called elsewhere
        if not isinstance(node, ast.Name) or node in called or node.id in values:
            continue
        if (target := ours(node)) is not None:
            inner = reach(target)
            found.process = found.process or inner.process
            found.runs, found.steps = found.runs + inner.runs, max(found.steps, inner.steps)
        elif isinstance(names.get(node.id), (list, tuple)):
            found.steps = max(found.steps, _steps_in(names[node.id]))
    return found


def slow_reason(item) -> str | None:
    """Why a collected test is slow, from its code and its fixtures' code; None for the quick tier."""
    fixtures = {name: defs[-1].func for name, defs in item._fixtureinfo.name2fixturedefs.items() if defs}
    test = getattr(item, "function", None)
    parts = [reach(test, frozenset(fixtures.items())) if test is not None and _is_ours(test) else Reach(),
             *(reach(function) for function in fixtures.values() if _is_ours(function))]
    return Reach(process=next((part.process for part in parts if part.process), None),
                 steps=max(part.steps for part in parts), runs=sum(part.runs for part in parts)).slow
