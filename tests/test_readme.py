"""The README's examples run as written, so the README cannot rot.

A fenced block right after an HTML comment ``<!-- test NAME -->`` is run, in document order, in one
fresh folder, as a user would paste it:

- ``python`` blocks in one Python session (a worker subprocess: later blocks see the names earlier
  ones defined, as in the README's prose);
- ``bash`` blocks with ``bash -euo pipefail`` (``oq`` is this interpreter's console script);
- any other block (YAML) is written to the file ``NAME``, for the blocks after it to use.

Each block is one test (id ``NAME``). The subprocesses get the user's environment: no
``TRITON_INTERPRET`` (which tests set so Triton kernels run on the CPU) and no ``OQ_*`` switches.
A block that fails because of a known bug being fixed elsewhere is listed in ``KNOWN_FAILURES``
with the text its failure must contain: it is then an expected failure, and once the bug is fixed
the test fails until the entry is removed.

The static checks below keep the README's two Quickstart commands, ``.ci/run`` and the
requirements files in agreement (the user install pulls no test or benchmark extras).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCK_TIMEOUT = 900  # seconds per block: torch.compile of the tiny model takes ~30 s on 2 busy cores

# name -> (why it fails today, text the failure output must contain). Example entry, for a block
# that fails because of a bug being fixed elsewhere:
#   "compile": ("torch.compile of fp8_per_block with K % 128 != 0 gives NaN", "Greatest absolute difference: nan")
KNOWN_FAILURES: dict[str, tuple[str, str]] = {}

# The blocks this file exists for: removing their markers must not make the test vacuous.
REQUIRED = {"q.yaml", "config-api", "make-model", "forward-generate", "compile", "save-load", "save-compressed-tensors", "overlay", "transformers", "reload"}

# Packages the user install must not pull (requirements.txt and oqcore's own dependencies).
TEST_AND_BENCH_ONLY = ("triton", "torchao", "matplotlib", "pytest", "hypothesis")

_MARKER = re.compile(r"^<!--\s*test\s+(\S+)\s*-->\s*$")
_FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    name: str
    lang: str
    code: str
    line: int  # README line of the block's first code line


def readme_blocks(text: str) -> list[Block]:
    """The ``<!-- test NAME -->`` blocks of README ``text``, in order. A marker not followed by a
    fenced block, or a name used twice, is an error (so a marker cannot silently test nothing)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i].strip())
        i += 1
        if not m:
            continue
        while i < len(lines) and not lines[i].strip():
            i += 1
        fence = _FENCE.match(lines[i].strip()) if i < len(lines) else None
        if fence is None:
            raise AssertionError(f"README.md line {i}: marker <!-- test {m.group(1)} --> is not followed by a ``` block")
        start = i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"README.md line {start}: the block of <!-- test {m.group(1)} --> is never closed")
        if any(b.name == m.group(1) for b in blocks):
            raise AssertionError(f"README.md line {start}: test name {m.group(1)!r} is used twice")
        blocks.append(Block(m.group(1), fence.group(1), "\n".join(lines[start:end]) + "\n", start + 1))
        i = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())

# The worker: executes each block it is sent in one namespace, as one interactive session would.
# Protocol on a private copy of stdout (fd 1 and 2 both go to the log file): one JSON line per block.
_WORKER = textwrap.dedent(
    """
    import json, os, sys, traceback
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ns = {"__name__": "__main__"}
    for line in sys.stdin:
        req = json.loads(line)
        # pad with newlines so tracebacks show README line numbers and source lines
        src = "\\n" * (req["line"] - 1) + req["code"]
        try:
            exec(compile(src, req["file"], "exec"), ns)
            res = {"ok": True}
        except BaseException:
            res = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush(); sys.stderr.flush()
        out.write(json.dumps(res) + "\\n"); out.flush()
    """
)


def user_env() -> dict[str, str]:
    """The environment a user has: this interpreter's scripts first on PATH, no test switches."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("OQ_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Session:
    """Runs the README's blocks in order in ``folder``; each block once, on first need."""

    folder: Path
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)
    worker: subprocess.Popen | None = None
    log: Path | None = None

    def _python(self, b: Block) -> tuple[bool, str]:
        if self.worker is None:
            self.log = self.folder.parent / "readme-python.log"
            self.worker = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                cwd=self.folder,
                env=user_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.log.open("w"),
                text=True,
            )
        start = self.log.stat().st_size
        self.worker.stdin.write(json.dumps({"code": b.code, "line": b.line, "file": str(README)}) + "\n")
        self.worker.stdin.flush()
        ready, _, _ = select.select([self.worker.stdout], [], [], BLOCK_TIMEOUT)
        line = self.worker.stdout.readline() if ready else ""
        with self.log.open() as f:
            f.seek(start)
            output = f.read()
        if not line:
            self.worker.kill()
            self.worker = None
            return False, f"the Python session died or took over {BLOCK_TIMEOUT} s\n{output}"
        res = json.loads(line)
        return res["ok"], output + res.get("error", "")

    def _bash(self, b: Block) -> tuple[bool, str]:
        try:
            p = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", b.code],
                cwd=self.folder,
                env=user_env(),
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            return False, f"took over {BLOCK_TIMEOUT} s"
        return p.returncode == 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"

    def run_through(self, name: str) -> tuple[bool, str]:
        """Run every block up to and including ``name`` not run yet; ``(ok, output)`` of ``name``."""
        for b in BLOCKS:
            if b.name not in self.results:
                if b.lang == "python":
                    self.results[b.name] = self._python(b)
                elif b.lang == "bash":
                    self.results[b.name] = self._bash(b)
                else:
                    (self.folder / b.name).write_text(b.code)
                    self.results[b.name] = (True, "")
            if b.name == name:
                return self.results[name]
        raise AssertionError(f"no README block named {name!r}")

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stdin.close()
            try:
                self.worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    s = Session(tmp_path_factory.mktemp("readme") / "work")
    s.folder.mkdir()
    yield s
    s.close()


@pytest.mark.parametrize("name", [b.name for b in BLOCKS])
def test_readme_block(session, name):
    ok, output = session.run_through(name)
    known = KNOWN_FAILURES.get(name)
    if known is None:
        assert ok, f"README block {name!r} failed:\n{output}"
    elif ok:
        pytest.fail(f"README block {name!r} passes now: remove its KNOWN_FAILURES entry ({known[0]})")
    elif known[1] in output:
        pytest.xfail(known[0])
    else:
        pytest.fail(f"README block {name!r} failed, and not with the known failure ({known[1]!r}):\n{output}")


def test_readme_tests_its_examples():
    names = {b.name for b in BLOCKS}
    assert REQUIRED <= names, f"README blocks no longer marked <!-- test NAME -->: {sorted(REQUIRED - names)}"
    for name in KNOWN_FAILURES:
        assert name in names, f"KNOWN_FAILURES names {name!r}, which is no README block"


def test_readme_marker_parser():
    text = "x\n<!-- test a.yaml -->\n```yaml\nk: 1\n```\n\n<!-- test b -->\n\n```python\nprint(1)\nprint(2)\n```\n"
    assert readme_blocks(text) == [Block("a.yaml", "yaml", "k: 1\n", 4), Block("b", "python", "print(1)\nprint(2)\n", 10)]
    with pytest.raises(AssertionError, match="not followed by"):
        readme_blocks("<!-- test a -->\ntext\n")
    with pytest.raises(AssertionError, match="never closed"):
        readme_blocks("<!-- test a -->\n```bash\nls\n")
    with pytest.raises(AssertionError, match="used twice"):
        readme_blocks("<!-- test a -->\n```bash\nls\n```\n<!-- test a -->\n```bash\nls\n```\n")


# ---- the two commands, CI and the requirements files ------------------------------------------


def _quickstart_commands() -> list[str]:
    section = README.read_text().split("## Quickstart", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _requirements(name: str) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in (ROOT / name).read_text().splitlines() if ln.split("#", 1)[0].strip()]


def test_quickstart_has_the_two_commands():
    assert _quickstart_commands() == [
        "pip install -r requirements.txt && oq quantize",
        "pip install -r requirements-dev.txt && python -m pytest",
    ]


def test_ci_runs_the_readme_test_command():
    test_command = _quickstart_commands()[1]
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci, f".ci/run must run the README's test command {test_command!r} as written"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_torch_is_pinned_first(name):
    assert _requirements(name)[0] == "torch==2.13.0"


def test_user_install_pulls_no_test_or_bench_extras():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    user = " ".join(_requirements("requirements.txt") + project["dependencies"]).lower()
    for pkg in TEST_AND_BENCH_ONLY:
        assert pkg not in user, f"the user install (requirements.txt, oqcore's dependencies) pulls {pkg}"
    assert "[" not in " ".join(_requirements("requirements.txt")), "requirements.txt must not name extras"
    assert any(d.startswith("transformers") for d in project["dependencies"]), "oqcore.load needs transformers"
    assert any(d.startswith("compressed-tensors") for d in project["dependencies"]), "the serving format needs compressed-tensors"
    dev = _requirements("requirements-dev.txt")
    assert "-r requirements.txt" in dev
    test_extra = " ".join(project["optional-dependencies"]["test"]).lower()
    for pkg in ("pytest", "hypothesis", "triton", "torchao"):
        assert pkg in test_extra, f"the [test] extra must name {pkg}"
    assert any(re.fullmatch(r"-e \.\[(\w+,)*test(,\w+)*\]", d) for d in dev), "requirements-dev.txt must install .[test]"
