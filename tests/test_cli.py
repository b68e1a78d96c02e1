"""The command-line tools as a user runs them: ``tvmpipe`` and ``tvmpipe-worker``, as processes.

Every test that starts a process bounds it with a timeout and stops it in a ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import pytest

from tvmpipe.worker.__main__ import parse_args, port_range

RUN_S = 120  # a command that imports TVM takes a few seconds on a busy 2-core machine
READY_S = 60
STOP_S = 10
BIN = Path(sys.executable).parent
COMMANDS = ("info", "plan", "demo", "cluster", "bench", "soak")


def tvmpipe(*args: str) -> list[str]:
    """The ``tvmpipe`` console script, or what it runs where it is not installed."""
    script = BIN / "tvmpipe"
    if script.is_file():
        return [str(script), *args]
    code = "import sys; from tvmpipe.orchestrator.cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def run(argv: Sequence[str], timeout: float = RUN_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def python(code: str) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, stripped."""
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_one_line_error(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    assert result.returncode not in (0, None), result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


# ----- tvmpipe --help, --version


def test_help_lists_every_command_on_one_line() -> None:
    result = run(tvmpipe("--help"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tvmpipe ")
    lines = result.stdout.splitlines()
    for command in COMMANDS:
        listed = [line for line in lines if line.split()[:1] == [command]]
        assert len(listed) == 1, f"{command!r} is not listed once: {result.stdout}"
        assert len(listed[0].split()) > 3, f"{command!r} has no summary on its line"
    assert "--version" in result.stdout


def test_no_arguments_prints_the_help() -> None:
    result = run(tvmpipe())
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in COMMANDS)


def test_version_names_tvmpipe_and_tvm() -> None:
    result = run(tvmpipe("--version"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"tvmpipe {metadata.version('tvmpipe')}")
    assert f"apache-tvm {metadata.version('apache-tvm')}" in result.stdout


def test_unknown_command_is_refused_with_the_valid_ones() -> None:
    result = run(tvmpipe("bogus"))
    assert result.returncode == 2
    assert "invalid choice: 'bogus'" in result.stderr
    assert all(command in result.stderr for command in COMMANDS)


# The package ``tvmpipe.orchestrator`` is set up without running its __init__ (which imports
# the whole controller), so that this checks the CLI module's own imports.
CLI_ALONE = """
import importlib.util, sys
spec = importlib.util.find_spec("tvmpipe.orchestrator")
sys.modules["tvmpipe.orchestrator"] = importlib.util.module_from_spec(spec)
from tvmpipe.orchestrator import cli
cli.build_parser()
cli.version_text()
try:
    cli.main(["--help"])
except SystemExit:
    pass
print("tvm" in sys.modules)
"""


def test_cli_module_imports_no_tvm_for_help_and_version() -> None:
    assert python(CLI_ALONE).splitlines()[-1] == "False"


def test_tvmpipe_help_imports_no_tvm() -> None:
    """The console script imports tvmpipe.orchestrator, whose __init__ must stay light too."""
    package = python("import sys, tvmpipe.orchestrator; print('tvm' in sys.modules)")
    assert package.splitlines()[-1] == "False"
    code = (
        "import sys\nfrom tvmpipe.orchestrator import cli\ncli.build_parser()\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('tvm' in sys.modules)"
    )
    assert python(code).splitlines()[-1] == "False"


# ----- each command's help names the command


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_names_the_command(command: str) -> None:
    result = run(tvmpipe(command, "--help"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: tvmpipe {command} "), result.stdout[:200]


def test_cluster_refuses_bad_arguments_by_name() -> None:
    result = run(tvmpipe("cluster", "--workers", "0"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage: tvmpipe cluster" in result.stderr
    assert "--workers must be at least 1" in result.stderr


# ----- tvmpipe info


def write_package(root: Path, tvm_version: str | None = None) -> Path:
    """A package with one Python stage, written by hand: no compiler needed to read it."""
    root.mkdir()
    source = root / "mod1.py"
    source.write_text("def double(x):\n    return x * 2\n")
    manifest = {
        "schema": 1,
        "tvmpipe": "0.1.0",
        "tvm": tvm_version or metadata.version("apache-tvm"),
        "stages": [
            {
                "name": "mod1",
                "kind": "python",
                "artifact": "mod1.py",
                "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                "inputs": [{"name": "x", "dtype": None, "shape": None}],
                "outputs": None,
                "target": None,
                "device": "cpu",
                "rpc_key": "",
                "cpu_affinity": None,
                "num_threads": None,
                "python": {"module": "mod1", "function": "double"},
                "param_group": None,
                "params_file": None,
                "params_sha256": None,
            }
        ],
        "inputs": [{"name": "x", "stage": "mod1", "param": "x", "dtype": "float32", "shape": [4]}],
        "outputs": [{"stage": "mod1", "index": 0}],
        "connections": [],
        "param_groups": {},
    }
    (root / "pipeline.json").write_text(json.dumps(manifest))
    return root


def edit_manifest(root: Path, **changes: object) -> None:
    path = root / "pipeline.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_info_prints_a_package(tmp_path: Path) -> None:
    package = write_package(tmp_path / "pkg")
    result = run(tvmpipe("info", str(package)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pipeline package {package}")
    assert "mod1: python" in result.stdout
    assert "input  x -> mod1.x (float32[4])" in result.stdout
    assert "output 0 <- mod1.output(0)" in result.stdout


def info_here(package: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``tvmpipe info PACKAGE`` in this process (the command itself, without a new interpreter):
    its one line on stderr, after checking it failed without a traceback."""
    from tvmpipe.orchestrator.cli import main

    code = main(["info", str(package)])
    out, err = capsys.readouterr()
    assert code not in (0, None), out
    assert err.startswith("tvmpipe info: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    return err


def test_info_on_missing_and_damaged_packages_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"  # the real command, once
    line = assert_one_line_error(run(tvmpipe("info", str(missing))), "tvmpipe info: ")
    assert str(missing) in line and "no pipeline.json" in line

    package = write_package(tmp_path / "pkg")
    (package / "mod1.py").write_text("def double(x):\n    return x * 3\n")
    assert "mod1.py is damaged" in info_here(package, capsys)

    not_json = write_package(tmp_path / "not_json")
    (not_json / "pipeline.json").write_text("{ this is not json")
    assert "not valid JSON" in info_here(not_json, capsys)

    wrong_type = write_package(tmp_path / "wrong_type")
    edit_manifest(wrong_type, outputs=[{"stage": "mod1", "index": "first"}])
    info_here(wrong_type, capsys)

    old_tvm = write_package(tmp_path / "old_tvm", tvm_version="0.1.0")
    assert "apache-tvm 0.1.0" in info_here(old_tvm, capsys)


# ----- tvmpipe-worker


def test_worker_flags_are_read_without_importing_tvm() -> None:
    code = (
        "import sys\nfrom tvmpipe.worker.__main__ import parse_args, port_range\n"
        "port_range(parse_args(['--port', '19091']))\nprint('tvm' in sys.modules)"
    )
    assert python(code) == "False"


def test_worker_port_range_from_flags() -> None:
    assert port_range(parse_args([])) == (9091, 9199)
    assert port_range(parse_args(["--port", "19091"])) == (19091, 19092)
    assert port_range(parse_args(["--port", "19091", "--port-end", "19100"])) == (19091, 19100)
    assert port_range(parse_args(["--port-end", "9100"])) == (9091, 9100)
    first, end = port_range(parse_args(["--port", "0"]))
    assert 0 < first < end
    for bad in (
        ["--port", "19091", "--port-end", "19091"],
        ["--port", "0", "--port-end", "9100"],
        ["--port", "70000"],
        ["--tracker", "nowhere", "--key", "k"],
        ["--tracker", "127.0.0.1:9190"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2, bad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_line(process: subprocess.Popen[bytes], deadline: float) -> str:
    """The next stdout line, or '' at EOF or the deadline."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data and time.monotonic() < deadline:
            if selector.select(timeout=0.2):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
            elif process.poll() is not None:
                break
    return data.decode(errors="replace")


def stop(process: subprocess.Popen[bytes]) -> None:
    """Close its stdin (``--exit-with-parent`` makes it exit), then insist."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(STOP_S)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def worker(*args: str) -> subprocess.Popen[bytes]:
    """A worker that exits when this process closes its stdin (or dies)."""
    command = [sys.executable, "-m", "tvmpipe.worker", *args, "--exit-with-parent", "--silent"]
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_worker_listens_on_exactly_the_port_given() -> None:
    for _ in range(3):  # the free port may be taken by someone else before the worker binds it
        port = free_port()
        process = worker("--port", str(port))
        try:
            line = read_line(process, time.monotonic() + READY_S)
            if not line and process.poll() == 1:
                continue
            assert line.strip() == f"tvmpipe-worker ready 127.0.0.1:{port}"
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            return
        finally:
            stop(process)
    pytest.fail("three free ports were taken before the worker could bind them")


def test_worker_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        # Not --exit-with-parent: communicate() closes stdin, which would end it with status 0.
        process = subprocess.Popen(
            [sys.executable, "-m", "tvmpipe.worker", "--port", str(port), "--silent"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            _, stderr = process.communicate(timeout=RUN_S)
        finally:
            stop(process)
    result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr.decode())
    line = assert_one_line_error(result, "tvmpipe-worker: cannot listen on 127.0.0.1")
    assert f"port {port}" in line
