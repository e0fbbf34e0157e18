#!/usr/bin/env python
"""Starts N local processes joined by jax.distributed on localhost (CPU devices).

Each process runs the same command with ELSA_JAX_COORDINATOR, ELSA_JAX_NUM_PROCESSES,
ELSA_JAX_PROCESS_ID and ELSA_JAX_LOCAL_DEVICES set, as a real multi-host job would.

  python scripts/launch_local.py --processes 2 --devices-per-process 4 -- \
      elsa-jax prune --distributed --mesh 4x2 --model runs/tiny-model ...

Exits with the first non-zero exit status of the processes (and stops the others).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(command: list[str], processes: int, devices_per_process: int, *, timeout: float | None = None,
           env: dict[str, str] | None = None) -> int:
  port = free_port()
  procs = []
  for i in range(processes):
    penv = dict(os.environ if env is None else env)
    penv.update(
        ELSA_JAX_COORDINATOR=f"127.0.0.1:{port}",
        ELSA_JAX_NUM_PROCESSES=str(processes),
        ELSA_JAX_PROCESS_ID=str(i),
        ELSA_JAX_LOCAL_DEVICES=str(devices_per_process),
        JAX_PLATFORMS="cpu",
    )
    penv.pop("XLA_FLAGS", None)
    procs.append(subprocess.Popen(command, env=penv))
  deadline = None if timeout is None else time.time() + timeout
  status = 0
  while procs:
    for p in list(procs):
      rc = p.poll()
      if rc is None:
        continue
      procs.remove(p)
      if rc and not status:
        status = rc
        for q in procs:
          q.kill()
    if deadline is not None and time.time() > deadline:
      for q in procs:
        q.kill()
      return 124
    time.sleep(0.1)
  return status


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--processes", type=int, default=2)
  ap.add_argument("--devices-per-process", type=int, default=4)
  ap.add_argument("command", nargs=argparse.REMAINDER)
  args = ap.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    ap.error("give the command to run after --")
  sys.exit(launch(command, args.processes, args.devices_per_process))


if __name__ == "__main__":
  main()
