"""Count the operations that read tensor values back to the host (a synchronisation on a GPU).

On CPU nothing ever waits, so a test of "no host synchronisation" counts the operations that
would wait on a GPU:

- `Tensor.tolist` (wrapped in Python: it does not go through the dispatcher);
- `aten._local_scalar_dense`: `item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:`;
- operations whose output size depends on tensor values, which the CUDA kernels read back
  (nonzero and boolean-mask indexing, bincount, unique, masked_select, repeat_interleave
  without `output_size`);

seen through a `TorchDispatchMode`, which also sees the ops autograd runs in the backward.
Host-to-device copies of Python data (`torch.tensor(list, device=...)`) are not counted;
collectives are not either (their split sizes are Python ints already, read by a counted op).

    with count_host_reads() as reads:
        ...
    assert reads.total == 1, reads.where
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# aten overload packets that read values to size their output (or are the read itself)
_READ_OPS = {
    "_local_scalar_dense", "nonzero", "bincount", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "masked_select",
}


@dataclass
class HostReads:
    where: list[str] = field(default_factory=list)  # "op  file:line" of every read, in order

    @property
    def total(self) -> int:
        return len(self.where)


def _caller() -> str:
    """The innermost frame of the project (megads or a test) that issued the read."""
    for fr in reversed(traceback.extract_stack()[:-1]):
        if "/megads/" in fr.filename or "/tests/" in fr.filename:
            if not fr.filename.endswith("host_reads.py"):
                return f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"
    return "?"


class _ReadMode(TorchDispatchMode):
    def __init__(self, reads: HostReads) -> None:
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        # repeat_interleave with tensor repeats sizes its output from their sum unless told it
        sized_by_values = name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") \
            and kwargs.get("output_size") is None
        # indexing with a boolean mask is a nonzero inside the kernel
        masked = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] or ()))
        if name in _READ_OPS or sized_by_values or masked:
            self.reads.where.append(f"{name}  {_caller()}")
        return func(*args, **kwargs)


@contextmanager
def count_host_reads() -> Iterator[HostReads]:
    reads = HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> Any:
        reads.where.append(f"tolist  {_caller()}")
        return tolist(self)

    # torch's CausalBias (the context-parallel attention's bottom-right mask) is a Tensor subclass
    # that cannot be constructed while any dispatch mode is active; it is built from two Python
    # ints, so the counter steps aside for its construction
    from megads.model import attention

    causal_lower_right = attention.causal_lower_right

    def unmoded_causal_lower_right(*size: int) -> Any:
        with _disable_current_modes():
            return causal_lower_right(*size)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    attention.causal_lower_right = unmoded_causal_lower_right  # type: ignore[assignment]
    try:
        with _ReadMode(reads):
            yield reads
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        attention.causal_lower_right = causal_lower_right  # type: ignore[assignment]
