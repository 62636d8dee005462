"""FHIRPath that clients write (FHIRPath Patch paths), evaluated in bounded time.

Three guards, because fhirpathpy is plain Python over Python's backtracking `re`:
- Regular expressions (`matches()`, `replaceMatches()`) run on RE2, whose matching time is
  linear in the input: `matches('^(a|a)*$')` cannot backtrack for minutes. RE2 has no
  backreferences or lookaround; such a pattern is refused (400), never run on `re`.
- Results that could double an operand in one C call, which no time check can interrupt, are
  sized before they are built: strings (`replace()`, `replaceMatches()`, `&`, `+`, `join()`)
  up to FHIRQ_MAX_STRING_BYTES, collections (`combine()`, `union()`, `|`) up to MAX_ITEMS.
  Otherwise `aggregate($total.combine($total))` would need terabytes after 40 steps.
- A budget (`FHIRQ_ENTRY_TIME_BUDGET` seconds of the evaluating thread's CPU) bounds everything
  else. A `sys.settrace` hook, installed for the evaluating thread only and only while it
  evaluates, looks at the clock on Python function calls and stops the evaluation with
  `OutOfTime` once the budget is spent. Signals would not do: the API serves requests from
  gthread threads, and only the main thread receives signals. CPU time, not wall time, so that
  a busy machine does not fail a healthy patch; the thread's own cost is what is bounded.

`OutOfTime` derives from BaseException so that fhirpathpy's `except Exception` blocks cannot
swallow it; `bounded` turns it into a 422 `too-costly` OperationOutcome at the caller's
expression.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from types import FrameType
from typing import Any

import re2
from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from antlr4.tree.Tree import ParseTreeWalker
from fhirpathpy.engine import do_eval
from fhirpathpy.engine.invocations import invocation_registry as _BASE
from fhirpathpy.engine.invocations.constants import constants
from fhirpathpy.engine.invocations.strings import ensure_string_singleton
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.engine.util import arraify, get_data
from fhirpathpy.models import models as fhirpath_models
from fhirpathpy.parser.ASTPathListener import ASTPathListener
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from core.config import get_settings
from core.errors import BadRequest, FhirError, Unprocessable

__all__ = ["OutOfTime", "Budget", "bounded", "evaluate", "parse"]

# The clock is read once per this many calls: reading a thread's CPU clock is a system call.
_CALLS_PER_CHECK = 32


class OutOfTime(BaseException):
    """The evaluation spent its budget (a BaseException: see the module docstring)."""


class Budget:
    """The CPU time an entry may still spend; `where` names what is being evaluated, for the
    error."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.thread_time() + seconds
        self.where: str | None = None
        self._calls = 0
        self._previous: Callable[..., Any] | None = None

    def spent(self) -> bool:
        return time.thread_time() > self.deadline

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        self._calls += 1
        if self._calls % _CALLS_PER_CHECK == 0 and self.spent():
            raise OutOfTime
        # Chain to a debugger or coverage tracer that was already installed.
        return self._previous(frame, event, arg) if self._previous is not None else None


# The budget of the entry this thread is working on, if any.
_local = threading.local()


@contextmanager
def bounded(seconds: float | None = None, *, expression: str | None = None) -> Iterator[Budget]:
    """Give `parse` and `evaluate` in the block a CPU-time budget (default
    FHIRQ_ENTRY_TIME_BUDGET) on this thread.

    Past the budget they are interrupted and a 422 `too-costly` is raised, naming
    `budget.where` (set it as the block moves on) or else `expression`.
    """
    budget = Budget(get_settings().entry_time_budget if seconds is None else seconds)
    outer: Budget | None = getattr(_local, "budget", None)
    if outer is not None:  # a block inside a bounded block ends no later than it
        budget.deadline = min(budget.deadline, outer.deadline)
    _local.budget = budget
    try:
        yield budget
    except OutOfTime:
        raise Unprocessable(
            f"Evaluating this took more than its budget of {budget.seconds:g} s of CPU "
            "(FHIRQ_ENTRY_TIME_BUDGET); simplify the expression",
            code="too-costly", expression=budget.where or expression,
        ) from None
    finally:
        _local.budget = outer


def _metered(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` under this thread's budget. Calls are traced only while fhirpathpy or ANTLR
    runs, since tracing makes every Python call slower."""
    budget: Budget | None = getattr(_local, "budget", None)
    if budget is None or sys.gettrace() == budget._trace:
        return fn(*args)
    if budget.spent():
        raise OutOfTime
    budget._previous = previous = sys.gettrace()
    sys.settrace(budget._trace)
    try:
        return fn(*args)
    finally:
        sys.settrace(previous)


class _RaiseOnSyntaxError(ErrorListener):
    def syntaxError(self, recognizer, offendingSymbol, line, column, msg, e):
        raise ValueError(f"at character {column + 1}: {msg}")


def parse(path: str) -> dict[str, Any]:
    """The syntax tree of `path` as fhirpathpy evaluates it; ValueError if it is not FHIRPath.

    Strict: fhirpathpy's own parser silently recovers from syntax errors ("Patient.name.("
    evaluates as "Patient.name"), and a typo would patch the wrong element. Cached, since bulk
    patches repeat their paths and parsing costs ten times the evaluation.
    """
    return _parse_cached(path)


@lru_cache(maxsize=1024)
def _parse_cached(path: str) -> dict[str, Any]:
    return _metered(_parse, path)


def _parse(path: str) -> dict[str, Any]:
    listener = _RaiseOnSyntaxError()
    lexer = FHIRPathLexer(InputStream(path))
    lexer.removeErrorListeners()
    lexer.addErrorListener(listener)
    tokens = CommonTokenStream(lexer)
    parser = FHIRPathParser(tokens)
    parser.removeErrorListeners()
    parser.addErrorListener(listener)
    try:
        tree = parser.expression()
        if tokens.LA(1) != Token.EOF:
            raise ValueError(
                f"unexpected {tokens.LT(1).text!r} at character {tokens.LT(1).column + 1}"
            )
        ast = ASTPathListener()
        ParseTreeWalker().walk(ast, tree)
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    return ast.parentStack[0]


def evaluate(resource: dict[str, Any], path: str, *, expression: str | None = None) -> list[Any]:
    """Evaluate `path` on `resource` (R4 model; element nodes, as fhirpathpy's returnRawData
    gives them) with the bounded functions below. Call it inside `bounded`. Errors → 400 at
    `expression`."""
    try:
        return _metered(_apply, resource, parse(path))
    except FhirError as err:
        if not err.expression and expression:
            err.expression = [expression]
        raise
    except Exception as exc:  # fhirpathpy raises bare Exceptions for unknown functions etc.
        raise BadRequest(f"The path {path!r} cannot be evaluated: {exc}", code="value",
                         expression=expression) from None


def _apply(resource: dict[str, Any], ast: dict[str, Any]) -> list[Any]:
    """fhirpathpy's `apply_parsed_path` (returnRawData), with `_FUNCTIONS` in place of some of
    its own. Built here because its `userInvocationTable` option hands functions plain values,
    losing the element nodes that a patch needs to find what it changes."""
    constants.reset()
    root = arraify(resource)
    ctx = {"dataRoot": root, "vars": {"context": resource, "ucum": "http://unitsofmeasure.org"},
           "model": fhirpath_models["r4"], "userInvocationTable": _FUNCTIONS}
    nodes = arraify(do_eval(ctx, root, ast["children"][0]))
    # Primitives that carry only extensions are not results (as in returnRawData).
    return [n for n in nodes if not (isinstance(n, ResourceNode) and isinstance(n.data, dict)
                                     and list(n.data) == ["extension"])]


# --------------------------------------------------------------------------------------------
# Functions that replace fhirpathpy's: regexes on RE2, and sizes checked before a result that
# could double an operand is built (`a.combine(a)` inside `aggregate()` doubles each turn, in
# one C call the time budget cannot interrupt).
# --------------------------------------------------------------------------------------------

# Most items a collection may have: far more than any resource holds.
MAX_ITEMS = 1_000_000


def _options() -> re2.Options:
    options = re2.Options()
    options.dot_nl = True  # FHIRPath regexes use "single line" mode: `.` matches a newline
    options.log_errors = False
    return options


_OPTIONS = _options()


def _compile(regex: str) -> re2._Regexp:
    try:
        return re2.compile(regex, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise BadRequest(
            f"The regular expression {regex!r} is not supported: {reason} (regular "
            "expressions run in linear time: no backreferences or lookaround)", code="value",
        ) from None


def _check_length(n: int, fn: str) -> None:
    limit = get_settings().max_string_bytes
    if n > limit:
        raise Unprocessable(
            f"{fn} would build a string of {n} characters; at most {limit} are allowed "
            "(FHIRQ_MAX_STRING_BYTES)", code="too-costly",
        )


def _check_items(n: int, fn: str) -> None:
    if n > MAX_ITEMS:
        raise Unprocessable(
            f"{fn} would build a collection of {n} items; at most {MAX_ITEMS} are allowed",
            code="too-costly",
        )


def _matches(ctx: Any, coll: list[Any], regex: Any) -> Any:
    if not regex or not coll:
        return []
    return _compile(regex).search(ensure_string_singleton(coll)) is not None


def _replace_matches(ctx: Any, coll: list[Any], regex: Any, repl: Any) -> Any:
    text = ensure_string_singleton(coll)
    if isinstance(regex, list) or isinstance(repl, list):
        return []
    pattern = _compile(regex)
    # FHIRPath writes groups as $1; RE2 (like re) as \1.
    template = re2.sub(r"\$(\d+)", r"\\\1", repl.replace("\\", "\\\\"))
    found = sum(1 for _ in pattern.finditer(text))
    _check_length(len(text) + found * (len(repl) + repl.count("$") * len(text)),
                  "replaceMatches()")
    return pattern.sub(template, text)


def _replace(ctx: Any, coll: list[Any], pattern: Any, repl: Any) -> Any:
    text = ensure_string_singleton(coll)
    if isinstance(pattern, list) or isinstance(repl, list):
        return []
    if pattern == "":  # FHIRPath: the replacement goes around every character
        _check_length((len(text) + 1) * len(repl) + len(text), "replace()")
        return repl + repl.join(text) + repl
    if not text:
        return []
    _check_length(len(text) + text.count(pattern) * (len(repl) - len(pattern)), "replace()")
    return text.replace(pattern, repl)


def _items_checked(name: str) -> Callable[..., Any]:
    base = _BASE[name]["fn"]

    def fn(ctx: Any, left: list[Any], right: list[Any]) -> Any:
        _check_items(len(arraify(left)) + len(arraify(right)), f"'{name}'")
        return base(ctx, left, right)

    return fn


def _amp(ctx: Any, left: Any, right: Any) -> Any:
    _check_length(sum(len(x) for x in (left, right) if isinstance(x, str)), "'&'")
    return _BASE["&"]["fn"](ctx, left, right)


def _plus(ctx: Any, left: list[Any], right: list[Any]) -> Any:
    texts = [get_data(x[0]) for x in (left, right) if isinstance(x, list) and len(x) == 1]
    _check_length(sum(len(t) for t in texts if isinstance(t, str)), "'+'")
    return _BASE["+"]["fn"](ctx, left, right)


def _join(ctx: Any, coll: list[Any], separator: Any = "") -> Any:
    texts = [t for t in (get_data(n) for n in coll) if isinstance(t, str)]
    sep = separator if isinstance(separator, str) else ""
    _check_length(sum(map(len, texts)) + len(sep) * max(0, len(coll) - 1), "join()")
    return _BASE["join"]["fn"](ctx, coll, separator)


_FUNCTIONS: dict[str, dict[str, Any]] = {
    name: {**_BASE[name], "fn": fn} for name, fn in [
        ("matches", _matches), ("replaceMatches", _replace_matches), ("replace", _replace),
        ("combine", _items_checked("combine")), ("union", _items_checked("union")),
        ("|", _items_checked("|")), ("&", _amp), ("+", _plus), ("join", _join),
    ]
}
