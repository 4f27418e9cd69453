"""PyTorch's block-scaled FP8 GEMM (DeepSeek-V3's 1 x 128 / 128 x 128 scaling) behind one call.

One implementation shared by the `torch` FP8 backend (megads/model/fp8_torch.py) and
`tools/gpu_fp8_check.py`: which API this torch offers, the operand padding and the scale layouts
each API accepts, and whether a device can run it.

The GEMM is `a @ b^T` of two quantised operands (`QOperand`), both row-major with the contraction
dimension (Kc) last:

- `a` [M, Kc] always in 1 x 128 tiles along Kc (scales [M, ceil(Kc/128)]);
- `b` [N, Kc] in 128 x 128 blocks (scales [ceil(N/128), ceil(Kc/128)]: a weight, forward and input
  gradient) or in 1 x 128 tiles along Kc (scales [N, ceil(Kc/128)]: the weight gradient, where
  both operands are activations or gradients quantised along tokens).

APIs, the first that exists is preferred:

- `torch.nn.functional.scaled_mm` (over `torch._scaled_mm_v2`) with `ScalingType` members for
  1 x 128 and 128 x 128: `BlockWise1x128` / `BlockWise128x128` in torch 2.13 (a C++-bound enum),
  `Blockwise_1x128` / `Blockwise_128x128` in its first version (a Python `enum.Enum`, late 2025;
  whether torch 2.10-2.12 ship it is not checked), see `SCALING_NAMES`;
- `torch._scaled_mm` with block-shaped FP32 scales (torch >= 2.9, pytorch PR #158037: it
  recognises the recipe from the scale shapes and strides).

Padding rule (zeros: they change neither a max-abs nor a sum, so the result's [M, N] corner is
the product of the unpadded operands; the quantisation is done before padding, on the unpadded
tensors, with the emulation's own functions):

- Kc (both operands) to a multiple of 128: `F.scaled_mm`'s checks count K // 128 scale columns
  (floor) against the ceil(Kc/128) scales a short last tile has, and every FP8 GEMM needs
  Kc % 16 == 0;
- the rows of a 128 x 128-scaled `b` to a multiple of 128 (the same floor count, N // 128);
- the rows of a 1 x 128-scaled `b` to a multiple of 16 (mat2's dimensions must be multiples of 16);
  its scales padded with ones;
- the rows of `a` (M, tokens) are never padded: no check constrains them.

Scale layouts (checked against torch 2.13's shape/stride checks on meta tensors,
tests/test_fp8_torch.py; the v1 layouts follow its C++ `is_blockwise_1x128_scaling` /
`is_blockwise_128x128_scaling`, which read `scale_b` transposed):

| operand | `F.scaled_mm` | `torch._scaled_mm` |
|---|---|---|
| a, 1 x 128 | [M, Kb], strides (1, M) | [M, Kb], strides (1, M) |
| b, 128 x 128 | [L4, Nb], strides (1, L4); Kb zero-padded to L4 = a multiple of 4 | [Kb, Nb], strides (1, Kb) |
| b, 1 x 128 | [N, Kb], strides (1, N) | [Kb, N], contiguous |
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

BLOCK = 128
E4M3 = torch.float8_e4m3fn

# ScalingType member names of `torch.nn.functional.scaled_mm`, by torch version (see the module
# docstring); the first name that exists wins.
SCALING_NAMES = {"1x128": ("BlockWise1x128", "Blockwise_1x128", "Blockwise1x128"),
                 "128x128": ("BlockWise128x128", "Blockwise_128x128", "Blockwise128x128")}

# An error raised by an optional API that means "not supported here" (CUDA/cuBLAS too old, wrong
# GPU, output dtype not implemented), as opposed to a bug.
UNSUPPORTED = re.compile(r"not supported|unsupported|only supported|requires|required|not implemented|"
                         r"NotImplemented|CUDA >= ?12\.9|CUDA 12\.9|cuBLAS ?(Lt)? version|sm_?90|compute capability",
                         re.IGNORECASE)


class BlockwiseUnavailable(RuntimeError):
    """No block-wise FP8 GEMM in this torch (or none that this device can run): the message says why."""


def cuda_version() -> tuple[int, int] | None:
    """The CUDA version this torch was built with, (major, minor); None for CPU/ROCm builds."""
    v = torch.version.cuda
    if not v:
        return None
    m = re.match(r"(\d+)\.(\d+)", v)
    return (int(m.group(1)), int(m.group(2))) if m else None


def scaling_type_members() -> list[str] | None:
    """The member names of `torch.nn.functional.ScalingType` (None: no such enum), for the record."""
    st = getattr(F, "ScalingType", None)
    if st is None:
        return None
    members = getattr(st, "__members__", None)
    return sorted(members) if members else sorted(n for n in dir(st) if not n.startswith("_"))


@dataclass(frozen=True)
class BlockwiseApi:
    """A block-wise FP8 GEMM of this torch: `name` says which; `recipes` the ScalingType members
    (1 x 128, 128 x 128) for `F.scaled_mm`, None for `torch._scaled_mm`."""

    name: str
    recipes: tuple | None = None


def blockwise_apis() -> list[BlockwiseApi]:
    """The block-wise FP8 GEMMs this torch offers, preferred first (BlockwiseUnavailable if none)."""
    apis, why = [], []
    st = getattr(F, "ScalingType", None)
    if hasattr(F, "scaled_mm") and st is not None:
        found = [next((getattr(st, n) for n in names if hasattr(st, n)), None) for names in SCALING_NAMES.values()]
        if None in found:
            why.append(f"torch.nn.functional.ScalingType has none of {SCALING_NAMES} (members: {scaling_type_members()})")
        else:
            apis.append(BlockwiseApi(f"F.scaled_mm ({', '.join(str(r) for r in found)})", tuple(found)))
    else:
        why.append("no torch.nn.functional.scaled_mm/ScalingType")
    if hasattr(torch, "_scaled_mm"):
        apis.append(BlockwiseApi("torch._scaled_mm (block-shaped scales)"))
    else:
        why.append("no torch._scaled_mm")
    if not apis:
        raise BlockwiseUnavailable(f"torch {torch.__version__} has no block-wise FP8 GEMM: {'; '.join(why)}")
    return apis


def blockwise_missing(device: torch.device) -> str | None:
    """Why torch's block-wise FP8 GEMM cannot run on `device` (None: it could): a CUDA device of
    compute capability 9.0 or newer, a torch built with CUDA >= 12.9 (cuBLASLt's block scaling)
    and one of the APIs above."""
    if device.type != "cuda":
        return f"block-wise scaled_mm runs on CUDA devices only (this run's device is {device.type})"
    try:
        blockwise_apis()
    except BlockwiseUnavailable as e:
        return str(e)
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"block-wise FP8 GEMMs need compute capability 9.0 or newer (this GPU has {major}.{minor})"
    cv = cuda_version()
    if cv is None or cv < (12, 9):
        return (f"block-wise FP8 GEMMs (cuBLASLt block scaling) need a torch built with CUDA >= 12.9; "
                f"this torch {torch.__version__} is built with CUDA {torch.version.cuda}")
    return None


@dataclass(frozen=True)
class QOperand:
    """One quantised GEMM operand, row-major [rows, Kc] with the contraction last: `q` E4M3,
    `scale` FP32, `kind` "tile" (1 x 128 along Kc: scales [rows, ceil(Kc/128)]) or "block"
    (128 x 128: scales [ceil(rows/128), ceil(Kc/128)])."""

    q: torch.Tensor
    scale: torch.Tensor
    kind: str

    def t_block(self) -> QOperand:
        """A 128 x 128-block operand transposed (the weight's blocks for the input gradient): the
        same blocks and scales, as views ([Kc, rows]); `blockwise_fn` copies the E4M3 values
        row-major for the kernel."""
        assert self.kind == "block", self.kind
        return QOperand(self.q.t(), self.scale.t(), "block")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows_cols(t: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    if t.dtype == E4M3:  # F.pad does not take float8: pad the bytes (0x00 is +0.0 in E4M3)
        assert value == 0.0
        return F.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)).view(E4M3)
    return F.pad(t, (0, cols - c, 0, rows - r), value=value)


def blockwise_fn(api: BlockwiseApi, a: QOperand, b: QOperand,
                 out_dtype: torch.dtype = torch.bfloat16) -> Callable[[], torch.Tensor]:
    """`a @ b^T` [M, N] in `out_dtype` through `api`: the operands padded (module docstring) and the
    scales laid out here, once; the returned function runs only the GEMM (and slices the result
    back to [M, N], a view)."""
    assert a.kind == "tile", a.kind
    m, kc = a.q.shape
    n = b.q.shape[0]
    assert b.q.shape[1] == kc, (a.q.shape, b.q.shape)
    kp = _round_up(kc, BLOCK)
    kb = kp // BLOCK
    # row-major E4M3 (a quantised transpose, as the weight gradient's operands, keeps its input's
    # strides through the elementwise quantisation: copied here)
    qa = _pad_rows_cols(a.q, m, kp).contiguous()
    sa = a.scale.t().contiguous().t()  # [M, Kb], outer-dimension-major
    if b.kind == "block":
        np_ = _round_up(n, BLOCK)
        qb = _pad_rows_cols(b.q, np_, kp).contiguous().t()  # [Kp, Np], column-major
        if api.recipes is None:
            sb = b.scale.contiguous().t()  # [Kb, Nb], strides (1, Kb)
        else:
            sb = F.pad(b.scale, (0, _round_up(kb, 4) - kb)).contiguous().t()  # [L4, Nb], strides (1, L4)
    else:
        np_ = _round_up(n, 16)
        qb = _pad_rows_cols(b.q, np_, kp).contiguous().t()
        sb_nk = _pad_rows_cols(b.scale, np_, kb, value=1.0)  # [Np, Kb]
        sb = sb_nk.t().contiguous() if api.recipes is None else sb_nk.t().contiguous().t()
    if api.recipes is None:
        def call() -> torch.Tensor:
            return torch._scaled_mm(qa, qb, sa, sb, out_dtype=out_dtype)
    else:
        r_tile, r_block = api.recipes
        rb = r_block if b.kind == "block" else r_tile

        def call() -> torch.Tensor:
            return F.scaled_mm(qa, qb, sa, r_tile, sb, rb, output_dtype=out_dtype)

    if np_ == n:
        return call
    return lambda: call()[:, :n]


class ScaledMmGemm:
    """The `torch` backend's GEMM of quantised operands (the `gemm` of megads/model/fp8_torch.py):
    `a @ b^T` through the first block-wise API that runs, in FP32 where the build accepts FP32
    output (what the emulation accumulates in), else BF16; the first refusal "unsupported" moves to
    the next API / output dtype for the rest of the run, any other error is raised."""

    def __init__(self) -> None:
        self._apis: list[BlockwiseApi] | None = None
        self._out_dtypes = [torch.float32, torch.bfloat16]
        self.refused: dict[str, str] = {}

    def __call__(self, a: QOperand, b: QOperand) -> torch.Tensor:
        if a.q.device.type != "cuda":
            raise BlockwiseUnavailable(str(blockwise_missing(a.q.device)))
        if a.q.shape[0] == 0 or b.q.shape[0] == 0:
            return torch.zeros(a.q.shape[0], b.q.shape[0], device=a.q.device)
        if self._apis is None:
            self._apis = blockwise_apis()
        while True:
            if not self._apis:
                raise BlockwiseUnavailable(f"no block-wise FP8 GEMM ran: {self.refused}")
            api, dt = self._apis[0], self._out_dtypes[0]
            try:
                return blockwise_fn(api, a, b, dt)()
            except (RuntimeError, TypeError, NotImplementedError) as e:
                if not UNSUPPORTED.search(str(e)):
                    raise
                self.refused[f"{api.name} -> {dt}"] = f"{type(e).__name__}: {e}"[:300]
                if len(self._out_dtypes) > 1:
                    self._out_dtypes.pop(0)
                else:
                    self._apis.pop(0)
                    self._out_dtypes = [torch.float32, torch.bfloat16]

    @property
    def api(self) -> str | None:
        """The API (and output dtype) in use, once a GEMM ran."""
        return f"{self._apis[0].name}, {self._out_dtypes[0]} output" if self._apis else None
