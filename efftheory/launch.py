"""``efftheory launch``: run an efftheory command in several processes.

    efftheory launch --processes 2 -- compare --activation tanh --depth 4 --out DIR
        starts 2 processes on this machine (coordinator 127.0.0.1 on a free port), each running
        ``python -m efftheory compare ...`` with EFFTHEORY_COORDINATOR, EFFTHEORY_NUM_PROCESSES and
        EFFTHEORY_PROCESS_ID set; their output is forwarded line by line with a "[p<i>]" prefix.  If one
        process fails, the others are stopped and the launcher exits with its status.
    efftheory launch --cluster [--coordinator HOST:PORT] -- compare ...
        one process of a cluster job (e.g. ``srun efftheory launch --cluster -- compare ...``): the
        process count and id come from the EFFTHEORY_* variables or Slurm's (docs/scaling.md).

``--timeout S`` sets EFFTHEORY_DISTRIBUTED_TIMEOUT: a process silent (no heartbeat) for S seconds is
reported dead by name in the others (:mod:`efftheory.distributed`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from . import distributed

__all__ = ["main", "parse", "free_port", "child_env"]

COMMANDS = ("compare", "train")  # the commands whose work is split over processes
MAX_PROCESSES = 1024


class LaunchError(ValueError):
    """A bad launcher command line: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(f"{message} (see 'efftheory launch --help')")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="efftheory launch", description="Run an efftheory command (compare, train, ...) in several "
                                                     "processes with jax.distributed; arguments after '--' are the "
                                                     "command's.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--processes", type=int, metavar="P", help="start P local processes on this machine")
    where.add_argument("--cluster", action="store_true",
                       help="run as one process of a cluster job: EFFTHEORY_NUM_PROCESSES and EFFTHEORY_PROCESS_ID, "
                            "or Slurm's variables, give the count and this process's id")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator (default: 127.0.0.1 and a free port locally; "
                        "EFFTHEORY_COORDINATOR or Slurm's first node with --cluster)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help=f"seconds without a heartbeat before a process is reported dead (default "
                        f"{distributed.ENV_TIMEOUT} or {distributed.DEFAULT_TIMEOUT:g})")
    return p


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, the command after '--'), or LaunchError naming the bad argument."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        own, command = argv[:i], argv[i + 1:]
    else:
        own, command = argv, []
    if any(a in ("-h", "--help") for a in own):
        _parser().print_help()
        raise SystemExit(0)
    args = _parser().parse_args(own)
    if args.processes is not None and not 1 <= args.processes <= MAX_PROCESSES:
        raise LaunchError(f"--processes: expected 1..{MAX_PROCESSES}, got {args.processes}")
    if args.timeout is not None and not (args.timeout > 0 and args.timeout != float("inf")):
        raise LaunchError(f"--timeout: expected a positive number of seconds, got {args.timeout:g}")
    if args.coordinator is not None:
        try:
            distributed.check_address("--coordinator", args.coordinator)
        except ValueError as e:
            raise LaunchError(str(e)) from None
    if not command:
        raise LaunchError("expected the command to run after '--', e.g. 'efftheory launch --processes 2 -- compare "
                          "--activation tanh --out DIR'")
    if command[0] == "launch":
        raise LaunchError("the command after '--' cannot be 'launch' itself")
    if command[0] not in COMMANDS and not command[0].startswith("-"):
        raise LaunchError(f"the command after '--': expected one of {', '.join(COMMANDS)}, got {command[0]!r}")
    return args, command


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_env(base: dict, coordinator: str, count: int, index: int, timeout: float | None) -> dict:
    """The environment of local process ``index``: ``base`` with the EFFTHEORY_* variables set."""
    env = dict(base)
    env[distributed.ENV_COORDINATOR] = coordinator
    env[distributed.ENV_NUM_PROCESSES] = str(count)
    env[distributed.ENV_PROCESS_ID] = str(index)
    if timeout is not None:
        env[distributed.ENV_TIMEOUT] = repr(float(timeout))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        try:
            out.write(prefix + line.decode(errors="replace"))
            out.flush()
        except ValueError:  # our stream closed at exit
            return
    stream.close()


def run_local(command: Sequence[str], processes: int, *, coordinator: str | None = None,
              timeout: float | None = None, python: str = sys.executable, poll_s: float = 0.1) -> int:
    """Run ``python -m efftheory <command>`` in ``processes`` local processes; returns the exit status:
    0 when all succeed, else the first failure's (the others are then terminated)."""
    coordinator = coordinator or f"127.0.0.1:{free_port()}"
    procs, threads = [], []
    try:
        for i in range(processes):
            env = child_env(os.environ, coordinator, processes, i, timeout)
            p = subprocess.Popen([python, "-m", "efftheory", *command], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
            procs.append(p)
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_forward, args=(stream, f"[p{i}] ", out), daemon=True)
                t.start()
                threads.append(t)
        failed = None
        while failed is None and any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    failed = (i, p.returncode)
                    break
            time.sleep(poll_s)
        if failed is None:
            failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            i, rc = failed
            _stop(procs)
            for t in threads:
                t.join(timeout=2)
            what = f"signal {-rc}" if rc < 0 else f"status {rc}"
            print(f"efftheory launch: process {i} of {processes} exited with {what}; stopped the others",
                  file=sys.stderr)
            return rc if rc > 0 else 128 - rc
        for t in threads:
            t.join(timeout=2)
        return 0
    except KeyboardInterrupt:
        _stop(procs)
        return 130


def _stop(procs, grace_s: float = 5.0) -> None:
    """Terminate the processes still running (their own process groups), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
    end = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait()


def main(argv: Sequence[str]) -> int:
    """``efftheory launch ...``; returns the exit status (2: bad launcher arguments)."""
    try:
        args, command = parse(argv)
    except LaunchError as e:
        print(f"efftheory: error: {e}", file=sys.stderr)
        return 2
    if args.processes is not None:
        return run_local(command, args.processes, coordinator=args.coordinator, timeout=args.timeout)
    # --cluster: this process is one of the job's; the command runs here, in this process
    if args.coordinator is not None:
        os.environ[distributed.ENV_COORDINATOR] = args.coordinator
    if args.timeout is not None:
        os.environ[distributed.ENV_TIMEOUT] = repr(float(args.timeout))
    try:
        settings = distributed.settings_from_env()
    except ValueError as e:
        print(f"efftheory: error: {e}", file=sys.stderr)
        return 2
    if settings is None:
        print("efftheory: error: --cluster: found neither EFFTHEORY_NUM_PROCESSES/EFFTHEORY_PROCESS_ID (with "
              "EFFTHEORY_COORDINATOR or --coordinator) nor a Slurm job of several tasks", file=sys.stderr)
        return 2
    from .cli import main as cli_main

    return cli_main(command)
