"""Head-sharded tensor parallelism for :class:`~entmaxkv_compile.models.llama_entmax.EntmaxLM`.

PyTorch's own plan (``parallelize_module`` with ``ColwiseParallel``/``RowwiseParallel``), Megatron style:
the query/key/value projections and the FFN's ``w1``/``w3`` are split by output features, ``wo`` and
``w2`` by input features (their outputs are all-reduced). Rank ``r`` of ``N`` thus holds query heads
``r·Hq/N … (r+1)·Hq/N − 1`` and KV heads ``r·Hkv/N …`` — the KV heads those query heads read, so GQA
stays local — and, after ``setup_cache``, only the cache of its KV heads. Embedding, norms and the
LM head are replicated. The attention code is unchanged: it sees plain local tensors of ``Hq/N`` and
``Hkv/N`` heads, which is what ``backend="entmaxkv"`` matches and rewrites.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .llama_entmax import EntmaxLM

PLAN = {
    "attn.wq": ColwiseParallel(),
    "attn.wk": ColwiseParallel(),
    "attn.wv": ColwiseParallel(),
    "attn.wo": RowwiseParallel(),
    "ffn.w1": ColwiseParallel(),
    "ffn.w3": ColwiseParallel(),
    "ffn.w2": RowwiseParallel(),
}


def shard_heads(model: EntmaxLM, mesh: DeviceMesh) -> EntmaxLM:
    """Shard ``model`` in place over the 1-D ``mesh`` by attention heads (call before ``setup_cache``).

    Every rank must pass the same full weights (``parallelize_module`` scatters rank 0's).
    """
    n, cfg = mesh.size(), model.cfg
    if cfg.n_kv_heads % n or cfg.ffn_dim % n:
        raise ValueError(
            f"{n} ranks must divide n_kv_heads={cfg.n_kv_heads} and ffn_dim={cfg.ffn_dim} "
            "(each rank holds whole KV heads and the query heads that read them)"
        )
    for blk in model.layers:
        parallelize_module(blk, mesh, PLAN)
        blk.attn.n_heads, blk.attn.n_kv_heads = cfg.n_heads // n, cfg.n_kv_heads // n
    return model
