"""Run the fenced shell blocks of README.md and of the docs/ walkthroughs, as written
(``make test-readme``; CI's e2e step).

Why a runner of our own: byexample and prysk/cram need a prompt (``$ ``) and the expected
output under every command, and mktestdocs runs each block in a fresh process; our README's
blocks are typed as a user types them (no prompts, no outputs), share the variables an earlier
block set, and start servers that later blocks talk to. This file is the whole runner: it
parses Markdown with markdown-it-py (rich's own parser) and runs each block with bash.

What a run does
---------------
1. ``git clone`` the repository (HEAD, committed files only) into a scratch folder; its
   ``.venv`` is a link to the checkout's (built by make's set-up recipe, the README's install
   steps), so the installed code is the checkout's: run from a clean clone, as CI does.
2. When run as root with ``unshare`` (CI), everything runs in a fresh network namespace with
   only loopback, so the README's fixed ports cannot clash with anything else on the machine;
   otherwise it says so and runs on the host's network (one run at a time then).
3. Each document (README.md, then every docs/**/*.md in name order) is run top to bottom in
   the clone's root, with ``HOME`` inside the scratch folder. Every fenced block whose info
   string is ``bash``, ``sh`` or ``shell`` runs under ``bash -e -o pipefail``; the variables,
   functions, exports and working directory it leaves behind are the next block's (so
   ``. .venv/bin/activate`` and ``COORD=...`` carry on). Other fences (python, text, plain)
   are not run.
4. It prints one line per block (ran, failed, skipped with its reason), every figure checked,
   and a summary: how many blocks ran, how many were skipped and why. Exit 1 on any failure.

Conventions for writers of README.md and docs/
----------------------------------------------
Write commands as a user types them: one command per line (``\\`` continuations are fine),
paths relative to the repository root, servers each in their own block ("in its own
terminal"). Then, right before a fence:

Skipping (VISIBLE: a reader must see that a block is not run)
    A blockquote whose text starts with ``Not run by `make test-readme`:`` followed by the
    reason, e.g.::

        > Not run by `make test-readme`: it needs a GPU.

    Accepted reasons are things the CI machine cannot do (a GPU, real separate hosts, long
    full-size runs, installing from the network, CI's own steps); everything else runs.

Directives (invisible HTML comments, ``<!-- readme-run: ... -->``, shell-style words)
    ``background ready=REGEX [parallel] [timeout=S]``
        The block is a long-running server, typed in its own terminal: it starts in the
        background in its own process group once every server started before it is ready
        (with ``parallel``: at once, e.g. two owners that train side by side). A block that
        is not a background one first waits until every server is ready: it has printed a
        line matching REGEX (stdout or stderr; ``timeout`` default 300 s). A server that
        exits or is not ready in time fails the run. Servers are stopped (SIGTERM to their
        process group, by PID; SIGKILL after 10 s) at the end of the document. Variables set
        in a background block do not carry on.
    ``stop=REGEX``
        Before this block runs, stop the running servers whose block text matches REGEX, as a
        user would press Ctrl-C in their terminals (the prose must say so).
    ``status=N expect=REGEX``
        The block must end with exit status N (default 0), and its output must match REGEX:
        for blocks that show an error (say, Predict after ``forget``: NOT_FOUND).
    ``figures=REGEX quoted=V1[,V2...] tolerance=T``
        Checks figures the prose quotes: the n-th match of REGEX (group 1, a number) in the
        block's output must lie within T of Vn. The quoted values must be the ones the prose
        shows (tests keep them equal to their results files).
    ``timeout=S``
        Seconds a foreground block may take (default 300).

Several directives may share one comment. The conventions are documented for readers in
docs/readme-runner.md; tests/test_readme_runner.py checks the runner itself, including that a
renamed option in a copy of the README fails the run.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.token import Token

ROOT = Path(__file__).resolve().parents[1]
SHELLS = {"bash", "sh", "shell"}
SKIP_PREFIX = "Not run by `make test-readme`:"
_KEYS = {"background", "parallel", "ready", "timeout", "stop", "status", "expect"}
_KEYS |= {"figures", "quoted", "tolerance"}
DIRECTIVE = re.compile(r"<!--\s*readme-run:(?P<body>.*?)-->", re.S)
DEFAULT_TIMEOUT = 300.0
READY_TIMEOUT = 300.0
STOP_GRACE = 10.0

# Shell variables that are bash's own (or per-process): never carried between blocks.
_BASH_OWN = (
    "BASH BASHOPTS BASHPID BASH_ALIASES BASH_ARGC BASH_ARGV BASH_ARGV0 BASH_CMDS BASH_COMMAND "
    "BASH_LINENO BASH_SOURCE BASH_SUBSHELL BASH_VERSINFO BASH_VERSION BASH_EXECUTION_STRING "
    "BASH_LOADABLES_PATH BASH_REMATCH COLUMNS COMP_WORDBREAKS DIRSTACK EPOCHREALTIME "
    "EPOCHSECONDS EUID FUNCNAME GROUPS HISTCMD HOSTNAME HOSTTYPE IFS LINENO LINES MACHTYPE "
    "OLDPWD OPTERR OPTIND OSTYPE PIPESTATUS PPID PS4 PWD RANDOM SECONDS SHELLOPTS SHLVL SRANDOM "
    "UID _ JF_README_STATE"
)


class ReadmeError(Exception):
    """A block failed, a figure is off, or a document breaks the conventions."""


@dataclass(frozen=True)
class Figures:
    pattern: str
    quoted: tuple[float, ...]
    tolerance: float


@dataclass(frozen=True)
class Block:
    """One fenced shell block and what the document says about it."""

    doc: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None = None  # the visible marker's reason
    background: bool = False
    parallel: bool = False
    ready: str | None = None
    timeout: float = DEFAULT_TIMEOUT  # foreground: run time; background: time to be ready
    stop: str | None = None
    status: int = 0
    expect: str | None = None
    figures: Figures | None = None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def _parse_directive(text: str, where: str) -> dict[str, str]:
    words: dict[str, str] = {}
    for match in DIRECTIVE.finditer(text):
        for word in shlex.split(match.group("body")):
            key, sep, value = word.partition("=")
            if key not in _KEYS:
                raise ReadmeError(f"{where}: unknown readme-run directive {key!r}")
            words[key] = value if sep else ""
    return words


def _block(doc: str, line: int, code: str, skip: str | None, words: dict[str, str]) -> Block:
    where = f"{doc}:{line}"
    figures = None
    try:
        for key in ("figures", "ready", "stop", "expect"):
            if key in words:
                re.compile(words[key])
        if "figures" in words:
            if "quoted" not in words or "tolerance" not in words:
                raise ReadmeError(f"{where}: figures= needs quoted= and tolerance=")
            quoted = tuple(float(v) for v in words["quoted"].split(","))
            figures = Figures(words["figures"], quoted, float(words["tolerance"]))
        background = "background" in words
        if background and not words.get("ready"):
            raise ReadmeError(f"{where}: a background block needs ready=REGEX")
        default = READY_TIMEOUT if background else DEFAULT_TIMEOUT
        return Block(
            doc=doc,
            line=line,
            code=code,
            skip=skip,
            background=background,
            parallel="parallel" in words,
            ready=words.get("ready"),
            timeout=float(words.get("timeout") or default),
            stop=words.get("stop"),
            status=int(words.get("status") or 0),
            expect=words.get("expect"),
            figures=figures,
        )
    except (re.error, ValueError) as exc:
        raise ReadmeError(f"{where}: bad readme-run directive: {exc}") from None


def parse(text: str, doc: str) -> list[Block]:
    """The shell blocks of one Markdown document, with their skip markers and directives.

    A skip marker (a blockquote) and directives (HTML comments) apply to the fence that comes
    right after them; anything else in between is a mistake and raises :class:`ReadmeError`.
    """
    tokens = MarkdownIt("commonmark").parse(text)
    blocks: list[Block] = []
    pending: dict[str, str] = {}
    skip: str | None = None
    for i, tok in enumerate(tokens):
        line = (tok.map or (0, 0))[0] + 1
        where = f"{doc}:{line}"
        if tok.type == "fence":
            lang = tok.info.split()[0] if tok.info.strip() else ""
            if lang in SHELLS:
                blocks.append(_block(doc, line, tok.content, skip, pending))
            elif pending or skip:
                raise ReadmeError(f"{where}: a directive or skip marker before a {lang!r} fence")
            pending, skip = {}, None
            continue
        if tok.level != 0 or tok.type.endswith("_close"):
            continue
        if tok.type == "html_block" and "readme-run:" in tok.content:
            pending |= _parse_directive(tok.content, where)
        elif tok.type == "blockquote_open" and _quote_text(tokens, i).startswith(SKIP_PREFIX):
            reason = _quote_text(tokens, i)[len(SKIP_PREFIX) :].strip()
            if not reason:
                raise ReadmeError(f"{where}: a skip marker needs its reason")
            skip = reason
        elif pending or skip:
            raise ReadmeError(
                f"{where}: a readme-run directive or skip marker must come right before a fence"
            )
    return blocks


def _quote_text(tokens: Sequence[Token], start: int) -> str:
    """The text of the first paragraph of the blockquote opened at ``tokens[start]``."""
    for tok in tokens[start + 1 :]:
        if tok.type == "inline":
            return " ".join(tok.content.split())
        if tok.type == "blockquote_close":
            break
    return ""


# --- running ---------------------------------------------------------------------------------


@dataclass
class Server:
    block: Block
    process: subprocess.Popen[bytes]
    log: Path
    ready: bool = False


@dataclass
class Outcome:
    ran: list[Block] = field(default_factory=list)
    skipped: list[Block] = field(default_factory=list)
    unselected: list[Block] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def _prelude(state: Path, cwd: Path, *, save: bool) -> str:
    """Restore the previous block's shell state (and save this block's on exit)."""
    own = "|".join(_BASH_OWN.split())
    st = shlex.quote(str(state))
    lines = [
        f"cd {shlex.quote(str(cwd))}",
        f"if [ -f {st} ]; then . {st}; fi",
    ]
    if save:
        lines += [
            "__jf_save() {",
            "  local __n",
            "  {",
            "    for __n in $(compgen -v); do",
            f"      case $__n in {own}|__*) ;;",
            '      *) declare -p "$__n" 2>/dev/null | grep -v "^declare -[a-zA-Z]*r" || true ;;',
            "      esac",
            "    done",
            "    declare -f",
            "    printf 'cd %q\\n' \"$PWD\"",
            f"  }} > {st}.new && mv {st}.new {st}",
            "}",
            "trap __jf_save EXIT",
        ]
    return "\n".join([*lines, ""])


def _tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in text[-lines:])


def _numbers(block: Block, output: str) -> list[float]:
    assert block.figures is not None
    found = []
    for match in re.finditer(block.figures.pattern, output):
        found.append(float(match.group(1)))
    return found


def check_figures(block: Block, output: str) -> list[str]:
    """Compare each quoted figure with the matching one in ``output``; ReadmeError if off."""
    if block.figures is None:
        return []
    fig = block.figures
    measured = _numbers(block, output)
    if len(measured) < len(fig.quoted):
        raise ReadmeError(
            f"{block.where}: expected {len(fig.quoted)} figure(s) matching {fig.pattern!r} in "
            f"the output, found {len(measured)}"
        )
    report = []
    for quoted, value in zip(fig.quoted, measured, strict=False):
        ok = abs(value - quoted) <= fig.tolerance
        report.append(
            f"{block.where}: figure {value:g} vs quoted {quoted:g} "
            f"(tolerance {fig.tolerance:g}): {'ok' if ok else 'OFF'}"
        )
        if not ok:
            raise ReadmeError("\n".join(report))
    return report


class DocumentRun:
    """Runs one document's blocks in ``cwd`` with its own shell state and servers."""

    def __init__(self, cwd: Path, work: Path, env: dict[str, str]) -> None:
        self.cwd, self.work, self.env = cwd, work, env
        self.state = work / "state.sh"
        self.servers: list[Server] = []
        self.count = 0

    def _script(self, block: Block) -> Path:
        self.count += 1
        path = self.work / f"block-{self.count:03d}.sh"
        path.write_text(_prelude(self.state, self.cwd, save=not block.background) + block.code)
        return path

    def _wait_ready(self) -> None:
        for server in self.servers:
            if server.ready:
                continue
            assert server.block.ready is not None
            pattern = re.compile(server.block.ready)
            deadline = time.monotonic() + server.block.timeout
            while True:
                if pattern.search(server.log.read_text(errors="replace")):
                    server.ready = True
                    break
                if server.process.poll() is not None:
                    raise ReadmeError(
                        f"{server.block.where}: the server exited ({server.process.returncode}) "
                        f"before printing {server.block.ready!r}:\n{_tail(server.log)}"
                    )
                if time.monotonic() > deadline:
                    raise ReadmeError(
                        f"{server.block.where}: not ready within {server.block.timeout:g} s "
                        f"(waiting for {server.block.ready!r}):\n{_tail(server.log)}"
                    )
                time.sleep(0.2)

    def _start(self, script: Path, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", str(script)],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopped by its PID
            )

    def _stop_matching(self, pattern: str) -> None:
        keep = []
        for server in self.servers:
            if re.search(pattern, server.block.code):
                _stop_group(server.process)
            else:
                keep.append(server)
        self.servers = keep

    def run(self, block: Block) -> list[str]:
        """Run (or start) one block; the figure checks it passed. ReadmeError on failure."""
        if block.stop is not None:
            self._stop_matching(block.stop)
        script = self._script(block)
        log = self.work / f"block-{self.count:03d}.log"
        if not (block.background and block.parallel):
            self._wait_ready()
        if block.background:
            self.servers.append(Server(block, self._start(script, log), log))
            return []
        process = self._start(script, log)
        try:
            code = process.wait(timeout=block.timeout)
        except subprocess.TimeoutExpired:
            _stop_group(process)
            raise ReadmeError(
                f"{block.where}: still running after {block.timeout:g} s:\n{_tail(log)}"
            ) from None
        output = log.read_text(errors="replace")
        if code != block.status:
            raise ReadmeError(
                f"{block.where}: exit status {code} (expected {block.status}):\n{_tail(log)}"
            )
        if block.expect is not None and not re.search(block.expect, output):
            raise ReadmeError(f"{block.where}: no {block.expect!r} in the output:\n{_tail(log)}")
        for server in self.servers:  # a server that died meanwhile fails the block after it
            if server.process.poll() is not None:
                raise ReadmeError(
                    f"{server.block.where}: the server exited ({server.process.returncode}) "
                    f"while {block.where} ran:\n{_tail(server.log)}"
                )
        return check_figures(block, output)

    def stop(self) -> None:
        """Stop every server of this document by PID (its process group)."""
        for server in reversed(self.servers):
            _stop_group(server.process)
        self.servers.clear()


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def documents(root: Path) -> list[Path]:
    """README.md, then every Markdown file under docs/ (name order)."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def clone(source: Path, dest: Path) -> Path:
    """A clean clone of ``source``'s HEAD with the checkout's ``.venv`` linked in."""
    subprocess.run(["git", "clone", "--quiet", str(source), str(dest)], check=True)
    venv = source / ".venv"
    if venv.is_dir():
        (dest / ".venv").symlink_to(venv.resolve())
    return dest


def run_documents(
    docs: Sequence[Path],
    repo: Path,
    work: Path,
    *,
    select: str | None = None,
    echo: Callable[[str], object] = print,
) -> Outcome:
    """Run the blocks of ``docs`` (paths inside ``repo``) in ``repo``; ReadmeError on failure."""
    outcome = Outcome()
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    # HOME in the scratch folder (a block must not write the user's ~/.flwr); the built-in
    # data's cache stays the user's (it is a cache: content-addressed, safe to share)
    cache = os.environ.get("JACFUSION_CACHE") or str(Path.home() / ".cache" / "jacfusion-fed")
    env = dict(os.environ) | {"HOME": str(home), "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    env["JACFUSION_CACHE"] = cache
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "COLUMNS"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p + "/"
    )
    for doc in docs:
        rel = str(doc.relative_to(repo)) if doc.is_relative_to(repo) else doc.name
        blocks = parse(doc.read_text(), rel)
        if not blocks:
            continue
        doc_work = work / rel.replace("/", "_")
        doc_work.mkdir(parents=True, exist_ok=True)
        runner = DocumentRun(repo, doc_work, env)
        try:
            for block in blocks:
                if select is not None and not re.search(select, block.code):
                    outcome.unselected.append(block)
                    continue
                if block.skip is not None:
                    outcome.skipped.append(block)
                    echo(f"skipped  {block.where}: {block.skip}")
                    continue
                started = time.monotonic()
                try:
                    report = runner.run(block)
                except ReadmeError:
                    echo(f"FAILED   {block.where}")
                    raise
                outcome.ran.append(block)
                outcome.figures.extend(report)
                kind = "started " if block.background else "ran     "
                echo(f"{kind} {block.where} ({time.monotonic() - started:.1f} s)")
                for line in report:
                    echo(f"         {line}")
        finally:
            runner.stop()
    return outcome


def summary(outcome: Outcome) -> str:
    lines = [f"{len(outcome.ran)} block(s) ran, {len(outcome.skipped)} skipped"]
    reasons: dict[str, list[str]] = {}
    for block in outcome.skipped:
        reasons.setdefault(block.skip or "", []).append(block.where)
    for reason, where in reasons.items():
        lines.append(f"  skipped ({len(where)}): {reason} [{', '.join(where)}]")
    if outcome.unselected:
        lines.append(f"  not selected by --select: {len(outcome.unselected)}")
    lines.append(f"{len(outcome.figures)} quoted figure(s) checked")
    return "\n".join(lines)


def _isolate(argv: Sequence[str]) -> None:
    """Re-run this command in a fresh network namespace when we can (root and unshare)."""
    tools = shutil.which("unshare") and shutil.which("ip")
    if os.environ.get("JF_README_NETNS") or os.geteuid() != 0 or not tools:
        if not os.environ.get("JF_README_NETNS"):
            print(
                "note: not root (or no unshare/ip): running on the host's network; the "
                "README's fixed ports must be free (one run at a time)",
                file=sys.stderr,
            )
        return
    env = dict(os.environ) | {"JF_README_NETNS": "1"}
    script = 'ip link set lo up && exec "$@"'
    command = ["unshare", "--net", "--", "sh", "-c", script, "sh", sys.executable, __file__, *argv]
    sys.exit(subprocess.run(command, env=env).returncode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("docs", nargs="*", type=Path, help="Markdown files (default: all)")
    parser.add_argument("--repo", type=Path, default=ROOT, help="repository to clone")
    parser.add_argument("--in-place", action="store_true", help="run in --repo, no clone")
    parser.add_argument("--select", help="run only the blocks whose text matches this regex")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-netns", action="store_true", help="stay on the host's network")
    args = parser.parse_args(argv)
    if not args.no_netns:
        _isolate(sys.argv[1:] if argv is None else list(argv))
    # SIGTERM (CI's timeout, kill PID) unwinds like Ctrl-C: the servers are stopped by PID
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    repo = args.repo.resolve()
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="readme-run-"))
    try:
        target = repo if args.in_place else clone(repo, scratch / "repo")
        docs = [d.resolve() for d in args.docs] or documents(repo)
        # documents are read from the checkout given (a copy may be edited); run in the clone
        docs = [target / d.relative_to(repo) if d.is_relative_to(repo) else d for d in docs]
        outcome = run_documents(docs, target, scratch / "work", select=args.select)
    except ReadmeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"README run failed after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"scratch folder kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(summary(outcome))
    print(f"README run passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
