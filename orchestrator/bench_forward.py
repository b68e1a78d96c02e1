"""The raw-ZeroMQ side of the data-plane benchmark: a plain pyzmq forwarder process.

    python bench_forward.py DOWNSTREAM_ADDRESS [BIND_ADDRESS] [--add K]

It binds a PULL socket at BIND_ADDRESS (default: a free loopback TCP port), prints ``ready
ADDRESS``, connects
a PUSH socket to DOWNSTREAM_ADDRESS and passes every multipart message on unchanged and
without a copy, as a tvmpipe identity stage does, minus tvmpipe. With ``--add K`` it sends
the last frame, read as float32, plus K instead: a ``data + k`` stage done with numpy. It exits
when its standard input closes (its parent went away) or on SIGTERM. Run by path, not as part
of the package, so that it imports nothing but pyzmq (and numpy for ``--add``).
"""

from __future__ import annotations

import os
import sys
import threading

import zmq


def _exit_with_parent() -> None:
    while os.read(sys.stdin.fileno(), 4096):
        continue
    os._exit(0)


def main(argv: list[str]) -> int:
    add = None
    if len(argv) >= 2 and argv[-2] == "--add":
        add, argv = float(argv[-1]), argv[:-2]
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    if len(argv) == 2:
        pull.bind(argv[1])
        address = argv[1]
    else:
        address = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    push = context.socket(zmq.PUSH)
    push.connect(argv[0])
    print(f"ready {address}", flush=True)
    if add is not None:
        _add_loop(pull, push, add)
    while True:
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)


def _add_loop(pull: zmq.Socket[bytes], push: zmq.Socket[bytes], k: float) -> None:
    import numpy as np

    value = np.float32(k)
    while True:
        frames = pull.recv_multipart(copy=False)
        result = np.frombuffer(frames[-1].buffer, dtype=np.float32) + value
        push.send_multipart([*frames[:-1], result.data], copy=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
