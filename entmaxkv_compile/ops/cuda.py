"""CUDA implementation of ``entmaxkv::decode_attn``: per-site state and the Triton pipelines.

Each rewritten site (``site`` id) owns :class:`~entmaxkv_compile.kernels.launch.SiteBuffers` sized at the
cache capacity: key sketches (``certified``) or page boxes (``topk``, ``adaptive``), a device watermark per KV
group, and the last step's statistics. The metadata is updated incrementally on device (see
:mod:`entmaxkv_compile.kernels.meta`); it is rebuilt when the cache tensor changes (``data_ptr``, shape,
strides or dtype — checked on the host, so not during CUDA-graph replay), when a group's sequence gets
shorter or jumps ahead by more than one step, or its probed key rows changed (checked on device), and
after :func:`reset_all`.
Working memory (:class:`~entmaxkv_compile.kernels.launch.Scratch`) is shared by sites with the same plan.

CUDA graphs: both are allocated on a site's first call, which must not be inside a stream capture (a
clear error says to run one eager step first, as ``torch.cuda.graph`` users and ``mode="reduce-overhead"``
warm-up both do). The allocation runs on a helper thread, so it never lands in a graph memory pool that the
calling thread may be routed to (cudagraph trees warm up inside their pool, and would later hand that
memory to other graphs), and its initialising fills are never captured. A captured step then only reads
and writes these buffers, with lengths and watermarks on device (no host sync, no data-dependent shapes).

Anything the kernels do not cover returns ``None`` (the op then runs the reference) with the reason
logged once.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from ..config import SUPPORTED_HEAD_DIMS, EntmaxKVConfig
from ..kernels.launch import Plan, Scratch, SiteBuffers, decode, make_plan

log = logging.getLogger("entmaxkv_compile")

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROWS = 64  # query rows per KV group (G·Lq) the kernels score in one tile
PROGRAMS_PER_SM = 4  # scoring passes: 4 warps, ≤ 128 registers (kernels/launch.py MAXNREG) ⇒ 4 per SM

T = TypeVar("T")

_logged: set[str] = set()
_scratch: dict[tuple[torch.device, Plan], Scratch] = {}


@dataclass
class SiteState:
    plan: Plan
    cache_key: tuple
    buffers: SiteBuffers


def _new_state(plan: Plan, key: tuple, k: Tensor) -> SiteState:
    return _persistent(lambda: SiteState(plan, key, SiteBuffers(plan, k.device, k.dtype)), k.device)


_sites: dict[tuple[int, torch.device], SiteState] = {}  # (site, device): one site may run on several GPUs


def _skip(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.info("entmaxkv: decode_attn runs the reference: %s", reason)


def unsupported_reason(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, config: EntmaxKVConfig
) -> str | None:
    """Why the CUDA kernels cannot run this call, or ``None`` if they can."""
    if not 0.0 < scale < math.inf:  # the kernels' bounds and page scores assume scores grow with q·k
        return f"scale {scale}: the kernels need a positive finite scale"
    if not (q.is_cuda and k.device == q.device and v.device == q.device):
        return "q, k, v must be on one CUDA device"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of fp16, bf16, fp32 for q, k and v"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D [B, H, L, D]"
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[3] != d or hq % k.shape[1]:
        return f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do not form GQA"
    if d not in SUPPORTED_HEAD_DIMS or v.shape[3] not in SUPPORTED_HEAD_DIMS:
        return f"head dims {d}/{v.shape[3]}: need one of {SUPPORTED_HEAD_DIMS}"
    if hq // k.shape[1] * lq > MAX_ROWS:
        return f"{hq // k.shape[1]} heads x {lq} query positions per KV head exceed {MAX_ROWS}"
    if k.stride(3) != 1 or v.stride(3) != 1:
        return "k and v need a unit stride on the head dim"
    if bias is not None and (
        bias.dim() != 4
        or bias.shape[-1] != k.shape[2]
        or any(bias.shape[i] not in (1, s) for i, s in enumerate(q.shape[:3]))
    ):
        return f"bias shape {tuple(bias.shape)} does not broadcast to [B, Hq, Lq, S]"
    return None


def _persistent(make: Callable[[], T], device: torch.device) -> T:
    """``make()`` with its CUDA allocations in the ordinary caching-allocator pool, finished on device.

    Runs on a helper thread: pools that graph capture or cudagraph-tree warm-up route allocations to are
    per thread, so long-lived buffers never borrow graph-pool memory."""
    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "entmaxkv: a decode site's first call is being captured in a CUDA graph; run one eager step "
            "before capture (its per-site buffers are allocated then)"
        )
    box: list = []

    def work() -> None:
        try:
            with torch.cuda.device(device):
                box.append(make())
                torch.cuda.current_stream(device).synchronize()
        except BaseException as e:  # re-raised on the calling thread
            box.append(e)

    t = threading.Thread(target=work, name="entmaxkv-alloc")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _cache_key(k: Tensor) -> tuple:
    return (k.data_ptr(), tuple(k.shape), k.stride(), k.dtype, k.device)


def _state(site: int, plan: Plan, k: Tensor) -> SiteState:
    key = _cache_key(k)
    st = _sites.get((site, k.device))
    if st is None or st.plan != plan:
        st = _sites[(site, k.device)] = _new_state(plan, key, k)
    elif st.cache_key != key:
        if k.is_cuda and torch.cuda.is_current_stream_capturing():
            log.warning(
                "entmaxkv: site %d sees a new cache tensor during CUDA-graph capture; every replay "
                "rebuilds its metadata",
                site,
            )
        st.cache_key = key
        st.buffers.wm.fill_(-1)
    return st


def decode_cuda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    site: int,
    config: EntmaxKVConfig,
) -> Tensor | None:
    """One decode step on the GPU under ``config.policy``, or ``None`` when unsupported (reason logged)."""
    reason = unsupported_reason(q, k, v, bias, scale, config)
    if reason is not None:
        _skip(reason)
        return None
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    return decode_site(q, k, v, bias, scale, alpha, site, config, PROGRAMS_PER_SM * sms)


def decode_site(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    site: int,
    config: EntmaxKVConfig,
    n_programs: int,
    block_n: int | None = None,
) -> Tensor:
    """:func:`decode_cuda` without the support checks, on any device the kernels run on (the Triton
    interpreter runs them on CPU tensors); ``n_programs`` sizes the grids."""
    if q.stride(3) != 1:
        q = q.contiguous()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    if bias is not None and bias.stride(3) != 1 and bias.shape[3] > 1:
        bias = bias.contiguous()
    plan = make_plan(tuple(q.shape), tuple(k.shape), v.shape[3], config, n_programs, block_n)
    st = _state(site, plan, k)
    scratch = _scratch.get((q.device, plan))
    if scratch is None:
        scratch = _scratch[(q.device, plan)] = _persistent(lambda: Scratch(plan, q.device), q.device)
    return decode(plan, scratch, st.buffers, q, k, v, bias, scale, alpha, config)


def reset_all() -> None:
    """Make every site rebuild its metadata on its next call (call between unrelated sequences)."""
    for st in _sites.values():
        st.buffers.wm.fill_(-1)


def site_stats(site: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Last step's device statistics of ``site`` (live views, no sync): ``mode`` per KV group (0 sparse /
    certified, 1 dense, 2 dense via the workspace), ``candidates`` per KV group (exact key rows gathered:
    ``certified``'s candidates, the positions of the pages ``topk``/``adaptive`` selected), ``support`` per
    query row, ``watermark`` per KV group. ``device`` is needed only when the site has run on several
    devices."""
    found = [d for s, d in _sites if s == site and (device is None or d == torch.device(device))]
    if len(found) != 1:
        raise KeyError(f"site {site} has state on {len(found)} matching devices; pass device=")
    b = _sites[(site, found[0])].buffers
    return {"mode": b.mode, "candidates": b.candidates, "support": b.support, "watermark": b.wm}
