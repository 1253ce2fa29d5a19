"""A stand-in for torch with CUDA: only what simulator/gpu_work.py and scripts/gpu_kit.py call (see README.txt).

Each product takes OP_S of a virtual GPU's time, queued behind the work before it; synchronising waits (sleeps)
until the queue is empty. The queue is shared with the pynvml stand-in through the file $STANDIN_GPU_STATE.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__version__ = "0.0.0+standin"
float16 = "float16"
OP_S = 0.005
_state = {"busy_until": 0.0, "busy_s": 0.0}


class version:  # torch.version.cuda
    cuda = "standin"


def _save() -> None:
    path = os.environ.get("STANDIN_GPU_STATE")
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(_state, fh)
        os.replace(tmp, path)


class device:
    def __init__(self, spec: Any) -> None:
        self.spec = spec


def _tensor(*_shape: int, device: Any = None, dtype: Any = None) -> object:
    return object()


randn = empty = ones = _tensor


def mm(_a: Any, _b: Any, out: Any = None) -> object:
    now = time.time()
    _state["busy_until"] = max(now, _state["busy_until"]) + OP_S
    _state["busy_s"] += OP_S
    return out if out is not None else object()


class cuda:
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def get_device_name(_i: int = 0) -> str:
        return "Stand-in GPU (CPU rehearsal)"

    @staticmethod
    def synchronize(_device: Any = None) -> None:
        _save()
        time.sleep(max(0.0, _state["busy_until"] - time.time()))

    class device:  # a context manager
        def __init__(self, _d: Any) -> None:
            pass

        def __enter__(self) -> None:
            return None

        def __exit__(self, *_exc: object) -> None:
            return None

    class Event:
        def record(self) -> None:
            self.until = _state["busy_until"]
            _save()

        def synchronize(self) -> None:
            time.sleep(max(0.0, self.until - time.time()))
