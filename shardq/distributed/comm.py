"""Point-to-point messages between pipeline ranks over `torch.distributed`: a fixed-size int64 header (kind, dtype,
shape) then the payload. Kinds: a tensor (activations, logits), a pickled command from rank 0, an error text that
travels down the chain to rank 0, and shutdown. Every pair of ranks carries one ordered stream, so one tag serves
(NCCL ignores tags)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TENSOR, COMMAND, ERROR, SHUTDOWN = 0, 1, 2, 3
MAX_DIMS = 8
HEADER = 3 + MAX_DIMS
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.int8,
    torch.bool,
]


class RemoteError(RuntimeError):
    """A rank of the pipeline failed; the message names the rank and its error."""


@dataclass
class Link:
    """Sends and receives of this rank; `device` is where tensors travel ("cpu" for gloo, a GPU for NCCL)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pending: list[tuple[Any, list[torch.Tensor]]] = field(default_factory=list)

    def _send(self, parts: list[torch.Tensor], dst: int) -> None:
        parts = [p.to(self.device).contiguous() for p in parts]
        self.pending.append(([dist.isend(p, dst) for p in parts], parts))

    def send_tensor(self, t: torch.Tensor, dst: int) -> None:
        if t.dim() > MAX_DIMS or t.dtype not in DTYPES:
            raise ValueError(f"cannot send a {t.dtype} tensor of {t.dim()} dims between ranks")
        shape = list(t.shape) + [0] * (MAX_DIMS - t.dim())
        header = torch.tensor([TENSOR, DTYPES.index(t.dtype), t.dim()] + shape, dtype=torch.int64)
        self._send([header, t.detach()], dst)

    def send_bytes(self, kind: int, data: bytes, dst: int) -> None:
        header = torch.tensor([kind, DTYPES.index(torch.uint8), 1, len(data)] + [0] * (MAX_DIMS - 1), dtype=torch.int64)
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(1, dtype=torch.uint8)
        self._send([header, payload], dst)

    def send_object(self, obj: Any, dst: int) -> None:
        self.send_bytes(COMMAND, pickle.dumps(obj), dst)

    def send_error(self, text: str, dst: int) -> None:
        self.send_bytes(ERROR, text.encode(), dst)

    def send_shutdown(self, dst: int) -> None:
        self.send_bytes(SHUTDOWN, b"", dst)

    def recv(self, src: int, idle: bool = False) -> tuple[int, Any]:
        """(kind, payload) of the next message from `src`: a tensor, an unpickled command, an error text or None.
        `idle`: wait without the process group's timeout (a worker between requests)."""
        header = torch.empty(HEADER, dtype=torch.int64, device=self.device)
        _wait(dist.irecv(header, src), idle)
        kind, code, ndim = (int(v) for v in header[:3].tolist())
        shape = [int(v) for v in header[3 : 3 + max(ndim, 1)].tolist()][:ndim]
        buf = torch.empty(shape if kind == TENSOR else [max(shape[0], 1)], dtype=DTYPES[code], device=self.device)
        _wait(dist.irecv(buf, src), False)
        if kind == TENSOR:
            return kind, buf
        data = bytes(buf.cpu().numpy().tobytes()[: shape[0]])
        if kind == COMMAND:
            return kind, pickle.loads(data)
        return kind, data.decode(errors="replace") if kind == ERROR else None

    def flush(self) -> None:
        """Wait for every send posted so far (their buffers are released after)."""
        for works, _ in self.pending:
            for w in works:
                w.wait()
        self.pending.clear()


IDLE = timedelta(days=365)


def _wait(work: Any, idle: bool) -> None:
    """Wait for `work`: within the process group's timeout, or (`idle`: a worker between requests) without one;
    a peer that exits still ends the wait with the transport's error."""
    if idle:
        work.wait(IDLE)
    else:
        work.wait()
