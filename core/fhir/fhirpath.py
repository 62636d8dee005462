"""FHIRPath that clients write (FHIRPath Patch paths), evaluated in bounded time.

Two guards, because fhirpathpy is plain Python over Python's backtracking `re`:
- Regular expressions (`matches()`, `replaceMatches()`) run on RE2, whose matching time is
  linear in the input: `matches('^(a|a)*$')` cannot backtrack for minutes. RE2 has no
  backreferences or lookaround; such a pattern is refused (400), never run on `re`.
  `replace()` and `replaceMatches()` refuse results longer than FHIRQ_MAX_STRING_BYTES before
  building them, so a short path cannot grow a string exponentially.
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
from fhirpathpy import apply_parsed_path
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
    """Evaluate `path` on `resource` (R4 model, raw nodes) with the linear-time string
    functions. Call it inside `bounded`. Errors → 400 at `expression`."""
    try:
        return _metered(
            apply_parsed_path, resource, parse(path), None, fhirpath_models["r4"],
            {"returnRawData": True, "userInvocationTable": _STRING_FUNCTIONS},
        )
    except FhirError as err:
        if not err.expression and expression:
            err.expression = [expression]
        raise
    except Exception as exc:  # fhirpathpy raises bare Exceptions for unknown functions etc.
        raise BadRequest(f"The path {path!r} cannot be evaluated: {exc}", code="value",
                         expression=expression) from None


# --------------------------------------------------------------------------------------------
# String functions on RE2 (fhirpathpy calls user functions with the input's plain values)
# --------------------------------------------------------------------------------------------


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


def _string(inputs: list[Any], fn: str) -> str:
    if len(inputs) != 1 or not isinstance(inputs[0], str):
        raise BadRequest(f"{fn}() needs a single string, got {inputs!r:.100}", code="value")
    return inputs[0]


def _check_length(n: int, fn: str) -> None:
    limit = get_settings().max_string_bytes
    if n > limit:
        raise Unprocessable(
            f"{fn}() would build a string of {n} characters; at most {limit} are allowed "
            "(FHIRQ_MAX_STRING_BYTES)", code="too-costly",
        )


def _matches(inputs: list[Any], regex: Any) -> Any:
    if not regex or not inputs:
        return []
    return _compile(regex).search(_string(inputs, "matches")) is not None


def _replace_matches(inputs: list[Any], regex: Any, repl: Any) -> Any:
    if isinstance(regex, list) or isinstance(repl, list):
        return []
    text = _string(inputs, "replaceMatches")
    pattern = _compile(regex)
    # FHIRPath writes groups as $1; RE2 (like re) as \1.
    template = re2.sub(r"\$(\d+)", r"\\\1", repl.replace("\\", "\\\\"))
    groups = repl.count("$")
    found = sum(1 for _ in pattern.finditer(text))
    _check_length(len(text) + found * (len(repl) + groups * len(text)), "replaceMatches")
    return pattern.sub(template, text)


def _replace(inputs: list[Any], pattern: Any, repl: Any) -> Any:
    if isinstance(pattern, list) or isinstance(repl, list):
        return []
    text = _string(inputs, "replace")
    if pattern == "":  # FHIRPath: the replacement goes around every character
        _check_length((len(text) + 1) * len(repl) + len(text), "replace")
        return repl + repl.join(text) + repl
    if not text:
        return []
    _check_length(len(text) + text.count(pattern) * (len(repl) - len(pattern)), "replace")
    return text.replace(pattern, repl)


_STRING_FUNCTIONS: dict[str, dict[str, Any]] = {
    "matches": {"fn": _matches, "arity": {1: ["String"]}, "nullable_input": True},
    "replaceMatches": {"fn": _replace_matches, "arity": {2: ["String", "String"]},
                       "nullable_input": True},
    "replace": {"fn": _replace, "arity": {2: ["String", "String"]}, "nullable_input": True},
}
