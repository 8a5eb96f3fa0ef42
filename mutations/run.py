"""Proves the safety rules by mutation: each mutation in mutations/rules.toml is applied to a
fresh copy of the working tree, and the tests it names must fail there (docs/mutation.md).

    python -m mutations.run                 all mutations; exit 1 unless every one is killed
    python -m mutations.run --only S5,D3-agent-expiry-linux     some rules or mutation ids
    python -m mutations.run --check         only: does every mutation still apply? (seconds)

Before the mutants it runs a canary (a copy with a marker in `policy`, and a test that must see
that marker: the copy's code is what is imported, not the editable install of the tree it was
copied from) and a baseline (every named test on an unmutated copy; a test that fails there
cannot prove anything). Mutants run two at a time: each pytest session starts its own
PostgreSQL and Mosquitto.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RULES_FILE = HERE / "rules.toml"
RULES = [f"S{n}" for n in range(1, 13)] + [f"D{n}" for n in range(1, 10)]
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-q"]
SESSION_TIMEOUT_SEC = 900
MAX_JOBS = 2
# "FAILED <node id> - <message>"; a parametrized node id may hold spaces.
SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)
ASSERTION_LINE = re.compile(r"^E\s+(.+)$", re.M)


class MutationError(Exception):
    """A mutation that cannot be applied as recorded: the run fails and says which and why."""


# -- the recorded mutations -----------------------------------------------------------------
@dataclass(frozen=True)
class Edit:
    file: str
    search: str
    replace: str
    count: int = 1


@dataclass(frozen=True)
class Mutation:
    id: str
    rule: str
    description: str
    edits: tuple[Edit, ...]
    killed_by: tuple[str, ...]


def load(path: Path = RULES_FILE) -> list[Mutation]:
    """The mutations in `path`, checked for shape: any mistake names the mutation and field."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    unknown = set(data) - {"mutation"}
    if unknown:
        raise MutationError(f"{path}: unknown top-level keys {sorted(unknown)}")
    mutations, seen = [], set()
    for n, entry in enumerate(data.get("mutation", []), 1):
        where = f"{path.name}: mutation {entry.get('id', f'#{n}')}"
        allowed = {"id", "rule", "description", "file", "search", "replace", "count",
                   "killed_by", "also"}
        if set(entry) - allowed:
            raise MutationError(f"{where}: unknown keys {sorted(set(entry) - allowed)}")
        for key in ("id", "rule", "description", "file", "search", "replace", "killed_by"):
            if key not in entry:
                raise MutationError(f"{where}: `{key}` is missing")
        if entry["id"] in seen:
            raise MutationError(f"{where}: id used twice")
        seen.add(entry["id"])
        if entry["rule"] not in RULES:
            raise MutationError(f"{where}: rule {entry['rule']!r} is not one of {RULES}")
        killed_by = entry["killed_by"]
        if isinstance(killed_by, str):
            killed_by = [killed_by]
        if not killed_by or not all(isinstance(t, str) and t.startswith("tests/") and "::" in t
                                    for t in killed_by):
            raise MutationError(f"{where}: killed_by must name tests as pytest node ids "
                                "(tests/test_x.py::test_y)")
        edits = [_edit(where, entry)] + [_edit(where, also) for also in entry.get("also", [])]
        mutations.append(Mutation(entry["id"], entry["rule"], entry["description"].strip(),
                                  tuple(edits), tuple(killed_by)))
    return mutations


def _edit(where: str, entry: dict) -> Edit:
    for key in ("file", "search", "replace"):
        if not isinstance(entry.get(key), str):
            raise MutationError(f"{where}: `{key}` must be a string")
    if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
        raise MutationError(f"{where}: file must be a path inside the tree: {entry['file']}")
    if not entry["search"].split():
        raise MutationError(f"{where}: search is empty")
    count = entry.get("count", 1)
    if not isinstance(count, int) or count < 1:
        raise MutationError(f"{where}: count must be a positive integer")
    return Edit(entry["file"], entry["search"], entry["replace"], count)


def search_pattern(search: str) -> re.Pattern:
    """The search text matched exactly, except that any run of whitespace in it matches any run
    of whitespace in the file: a mutation survives re-indentation and re-wrapping."""
    return re.compile(r"\s+".join(re.escape(word) for word in search.split()))


def mutated_text(text: str, mutation: Mutation, edit: Edit) -> str:
    pattern = search_pattern(edit.search)
    found = len(pattern.findall(text))
    if found != edit.count:
        expected = "once" if edit.count == 1 else f"{edit.count} times"
        where = "not found" if not found else f"found {found} times (expected {expected})"
        raise MutationError(f"mutation {mutation.id} no longer applies: search text {where} "
                            f"in {edit.file}: {_short(edit.search)!r}")
    return pattern.sub(lambda _: edit.replace, text)


def apply(tree: Path, mutation: Mutation) -> None:
    """Apply every edit of `mutation` to the files under `tree`, and check that what it leaves
    is still a program (a mutant that does not even parse proves nothing)."""
    for edit in mutation.edits:
        path = tree / edit.file
        if not path.is_file():
            raise MutationError(f"mutation {mutation.id} no longer applies: {edit.file} is gone")
        path.write_text(mutated_text(path.read_text(encoding="utf-8"), mutation, edit),
                        encoding="utf-8")
    for file in sorted({edit.file for edit in mutation.edits}):
        check_syntax(tree / file, mutation)


def check_syntax(path: Path, mutation: Mutation) -> None:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        try:
            compile(text, str(path), "exec")
        except SyntaxError as exc:
            raise MutationError(f"mutation {mutation.id} leaves invalid Python in "
                                f"{path.name}: {exc}") from None
    elif path.suffix == ".sh" or text.startswith("#!/bin/bash"):
        done = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
        if done.returncode:
            raise MutationError(f"mutation {mutation.id} leaves invalid bash in {path.name}: "
                                f"{done.stderr.strip()}")


def _short(text: str, limit: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- copies of the tree and pytest sessions in them ----------------------------------------
def tree_files(root: Path) -> list[str]:
    """Tracked and untracked, not ignored: the working tree as the next commit would see it."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                         capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def copy_tree(root: Path, files: list[str], label: str) -> Path:
    copy = Path(tempfile.mkdtemp(prefix=f"mutant-{label}-"))
    for name in files:
        source = root / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet in git
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return copy


@dataclass
class Session:
    returncode: int
    output: str
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [node for kind, node in SUMMARY_LINE.findall(self.output) if kind == "FAILED"]

    @property
    def errored(self) -> list[str]:
        return [node for kind, node in SUMMARY_LINE.findall(self.output) if kind == "ERROR"]

    @property
    def first_assertion(self) -> str:
        found = ASSERTION_LINE.search(self.output)
        return _short(found.group(1), 160) if found else ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])


def pytest_in(copy: Path, args: list[str], timeout: int = SESSION_TIMEOUT_SEC) -> Session:
    """pytest run by this interpreter with the copy as working directory and first on the path,
    so the copy's packages shadow the editable install of the original tree."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("REQUIRE_TIMESCALEDB", "1")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, *PYTEST, *args], cwd=copy, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[mutations] pytest killed after {timeout} s"
        return Session(-1, output, time.monotonic() - started)
    return Session(proc.returncode, output, time.monotonic() - started)


CANARY_TEST = '''\
from pathlib import Path

import policy
import policy.rules
import testbed.mosquitto
import tests.agent_scenarios

COPY = Path(__file__).resolve().parent.parent


def test_the_copy_is_what_runs():
    assert policy.MUTATION_CANARY == "{token}"
    for module in (policy, policy.rules, testbed.mosquitto, tests.agent_scenarios):
        assert Path(module.__file__).resolve().is_relative_to(COPY), module.__file__
    assert policy.rules.SQL_DIR.resolve().is_relative_to(COPY)
    assert tests.agent_scenarios.REPO.resolve() == COPY
'''


def canary(root: Path, files: list[str]) -> str | None:
    """None when a marker put into a copy is seen by a test run there, else what went wrong."""
    copy = copy_tree(root, files, "canary")
    try:
        token = uuid.uuid4().hex
        init = copy / "policy" / "__init__.py"
        init.write_text(init.read_text() + f'\nMUTATION_CANARY = "{token}"\n')
        (copy / "tests" / "test_mutation_canary.py").write_text(CANARY_TEST.format(token=token))
        session = pytest_in(copy, ["-n", "0", "tests/test_mutation_canary.py"], timeout=120)
        if session.returncode != 0:
            return session.tail()
        return None
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# -- running the mutants --------------------------------------------------------------------
@dataclass
class Result:
    mutation: Mutation
    status: str  # killed, survived, error, stale, unproven
    killer: str = ""
    detail: str = ""
    seconds: float = 0.0
    kept: str = ""


def run_mutant(root: Path, files: list[str], mutation: Mutation, keep: bool) -> Result:
    copy = copy_tree(root, files, mutation.id)
    result = None
    try:
        try:
            apply(copy, mutation)
        except MutationError as exc:
            result = Result(mutation, "stale", detail=str(exc))
            return result
        session = pytest_in(copy, ["-n", "0", "-x", *mutation.killed_by])
        if session.returncode == 1 and session.failed:
            result = Result(mutation, "killed", killer=session.failed[0],
                            detail=session.first_assertion, seconds=session.seconds)
        elif session.returncode == 0:
            result = Result(mutation, "survived", seconds=session.seconds,
                            detail="every named test passed with the mutation applied")
        else:
            result = Result(mutation, "error", seconds=session.seconds,
                            detail=f"pytest exit {session.returncode}; errors: "
                                   f"{session.errored or '-'}\n{session.tail()}")
        return result
    finally:
        if keep and result is not None and result.status in ("survived", "error"):
            result.kept = str(copy)
        else:
            shutil.rmtree(copy, ignore_errors=True)


def baseline(root: Path, files: list[str], tests: list[str], jobs: int) -> tuple[set, Session]:
    """Run every named test on an unmutated copy; returns the node ids that did not pass."""
    copy = copy_tree(root, files, "baseline")
    try:
        session = pytest_in(copy, ["-n", str(jobs), *tests])
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return set(session.failed) | set(session.errored), session


def _names(test: str, failing: set) -> bool:
    return any(f == test or f.startswith(test + "[") for f in failing)


def select(mutations: list[Mutation], only: str | None) -> list[Mutation]:
    if not only:
        return mutations
    wanted = {w.strip() for w in only.split(",") if w.strip()}
    chosen = [m for m in mutations if m.id in wanted or m.rule in wanted]
    unknown = wanted - {m.id for m in chosen} - {m.rule for m in chosen}
    if unknown:
        raise MutationError(f"--only: no mutation or rule named {sorted(unknown)}; "
                            "see mutations/rules.toml")
    return chosen


def check(root: Path, mutations: list[Mutation]) -> list[str]:
    """What is wrong with the recorded list against the tree as it is: every mutation must
    apply and leave a program, every named test must exist. No test is run."""
    problems = []
    files = tree_files(root)
    for mutation in mutations:
        copy = Path(tempfile.mkdtemp(prefix=f"mutant-check-{mutation.id}-"))
        try:
            for edit in mutation.edits:
                target = copy / edit.file
                if not target.exists() and (root / edit.file).is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(root / edit.file, target)
            apply(copy, mutation)
        except MutationError as exc:
            problems.append(str(exc))
        finally:
            shutil.rmtree(copy, ignore_errors=True)
    tests = sorted({t for m in mutations for t in m.killed_by})
    copy = copy_tree(root, files, "collect")
    try:
        session = pytest_in(copy, ["-n", "0", "--collect-only", *tests], timeout=300)
        if session.returncode != 0:
            problems.append("named tests that cannot be collected:\n" + session.tail())
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    return problems


# -- reporting ------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    width = max(len(r.mutation.id) for r in results)
    lines = []
    for r in results:
        head = f"{r.mutation.rule:<3} -> {r.mutation.id:<{width}} -> "
        if r.status == "killed":
            lines.append(head + f"killed by {r.killer}")
        else:
            lines.append(head + {"survived": "SURVIVED", "error": "ERROR",
                                 "stale": "NO LONGER APPLIES",
                                 "unproven": "NOT RUN"}[r.status])
            for line in r.detail.splitlines()[:30]:
                lines.append(" " * (len(head) + 2) + line)
            if r.kept:
                lines.append(" " * (len(head) + 2) + f"mutant kept in {r.kept}")
    return "\n".join(lines)


def markdown(results: list[Result]) -> str:
    rows = ["| Rule | Mutation | What it does to the code | Killed by |",
            "| --- | --- | --- | --- |"]
    for r in results:
        killer = r.killer.split("/", 1)[-1] if r.status == "killed" else r.status.upper()
        description = r.mutation.description.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {r.mutation.rule} | `{r.mutation.id}` | {description} | `{killer}` |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutation ids and/or rules (S5, D3)")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutation applies and its tests exist")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--jobs", type=int, default=MAX_JOBS, choices=range(1, MAX_JOBS + 1),
                        help=f"mutants at a time (at most {MAX_JOBS}; default {MAX_JOBS})")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the result table in Markdown (docs/mutation.md)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the copies of surviving and failing mutants for a look")
    parser.add_argument("--rules", type=Path, default=RULES_FILE, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    root = args.root.resolve()
    try:
        mutations = select(load(args.rules), args.only)
    except MutationError as exc:
        print(f"mutations: {exc}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutations:
            print(f"{m.rule:<3} {m.id}: {m.description}")
        return 0
    missing = [r for r in RULES if r not in {m.rule for m in mutations}]
    if missing and not args.only:
        print(f"mutations: no mutation proves {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(root, mutations)
        for problem in problems:
            print(problem)
        print(f"{len(mutations)} mutations checked: "
              f"{'all apply' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0

    files = tree_files(root)
    print(f"mutations: {len(mutations)} from {args.rules.relative_to(root)} "
          f"over {len(files)} files of {root}", flush=True)
    problem = canary(root, files)
    if problem:
        print("canary: a marker put into the copy was not seen by its tests, so a mutant would "
              f"not be what runs:\n{problem}", file=sys.stderr)
        return 2
    print("canary: the copy's code is what runs", flush=True)

    tests = sorted({t for m in mutations for t in m.killed_by})
    failing, session = baseline(root, files, tests, args.jobs)
    if session.returncode not in (0, 1):
        print(f"baseline: pytest exit {session.returncode} on the unmutated tree:\n"
              f"{session.tail(40)}", file=sys.stderr)
        return 2
    print(f"baseline: {len(tests)} named tests, {len(failing)} failing on the unmutated tree "
          f"({session.seconds:.0f} s)", flush=True)
    for node in sorted(failing):
        print(f"  baseline FAILED {node}")

    results: dict[str, Result] = {}
    runnable = []
    for m in mutations:
        bad = [t for t in m.killed_by if _names(t, failing)]
        if bad:
            results[m.id] = Result(m, "unproven", detail="fails without the mutation too: "
                                   + ", ".join(bad))
        else:
            runnable.append(m)
    done = len(results)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_mutant, root, files, m, args.keep) for m in runnable]
        for future in as_completed(futures):
            result = future.result()
            results[result.mutation.id] = result
            done += 1
            print(f"[{done:>3}/{len(mutations)}] {result.mutation.id:<40} {result.status:<9}"
                  f"{result.seconds:6.1f} s", flush=True)

    ordered = [results[m.id] for m in mutations]
    print("\nrule -> mutation -> killed by test")
    print(table(ordered))
    if args.markdown:
        print()
        print(markdown(ordered))
    counts = {s: sum(1 for r in ordered if r.status == s)
              for s in ("killed", "survived", "error", "stale", "unproven")}
    elapsed = time.monotonic() - started
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "killed")
          + f" of {len(ordered)} mutations in {elapsed // 60:.0f} min {elapsed % 60:.0f} s")
    return 0 if counts["killed"] == len(ordered) else 1


if __name__ == "__main__":
    sys.exit(main())
