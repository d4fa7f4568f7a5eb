"""BlockMask: which (q block, kv block) tiles a kernel must visit, and which of them need mask_mod.

Layout (same as PyTorch's): for every (b, h, q block) row, ``kv_num_blocks`` counts the *partial*
kv blocks (mask_mod is true somewhere, false somewhere) and ``kv_indices`` lists them first, in
ascending order; ``full_kv_*`` do the same for *full* blocks (mask_mod true at every valid
position, so a kernel may skip evaluating it). The ``q_*`` tensors are the transpose, used by the
backward kernels that walk query blocks for a fixed kv block.

Building one never materialises the (Q_LEN, KV_LEN) mask: mask_mod is evaluated one chunk of
query blocks at a time and immediately reduced to per-block any/all.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from .mods import check_arity, eval_mask_blocks, eval_mask_grid, mod_name, noop_mask

# Elements of the bool grid evaluated per chunk while building a mask (about 32 MB).
_BUILD_CHUNK_ELEMS = 1 << 25


def _normalize_block_size(BLOCK_SIZE) -> Tuple[int, int]:
    if isinstance(BLOCK_SIZE, int) and not isinstance(BLOCK_SIZE, bool):
        pair = (BLOCK_SIZE, BLOCK_SIZE)
    elif isinstance(BLOCK_SIZE, (tuple, list)) and len(BLOCK_SIZE) == 2:
        pair = tuple(BLOCK_SIZE)
    else:
        raise ValueError(f"BLOCK_SIZE must be a positive int or a (q, kv) pair of them, got {BLOCK_SIZE!r}")
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"BLOCK_SIZE must be a positive int or a (q, kv) pair of them, got {BLOCK_SIZE!r}")
    return pair  # type: ignore[return-value]


def _ordered_indices(blocks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """bool (..., n) -> (count int32 (...), indices int32 (..., n)) with the True columns first."""
    num = blocks.sum(-1, dtype=torch.int32)
    # stable sort on "not selected" keeps selected columns first and in ascending order
    idx = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    # the q side sorts a transposed view: stored contiguous, so no launch has to copy it
    return num.contiguous(), idx.contiguous()


def _dense_from_indices(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Inverse of _ordered_indices: (count, indices) -> bool (..., n_cols)."""
    n_idx = idx.shape[-1]
    valid = torch.arange(n_idx, device=idx.device) < num.unsqueeze(-1).to(torch.int64)
    dense = torch.zeros(*idx.shape[:-1], n_cols + 1, dtype=torch.bool, device=idx.device)
    # invalid slots scatter into a spare column that is dropped afterwards
    target = torch.where(valid, idx.to(torch.int64), torch.full_like(idx, n_cols, dtype=torch.int64))
    dense.scatter_(-1, target, torch.ones_like(target, dtype=torch.bool))
    return dense[..., :n_cols]


class BlockMask:
    """Block-sparse description of an attention mask (see the module docstring for the layout)."""

    # block_runs per side, once known (None: not read yet); create_block_mask reads both, and
    # union_run (the kv side)
    _runs_kv: Optional[bool] = None
    _runs_q: Optional[bool] = None
    _union_kv: Optional[bool] = None
    _union_q: Optional[bool] = None
    # False: built with separate_full_blocks=False, every block partial, mask_mod on all of them
    # (the kernels' 64 x 64 refinement is then left off unless REFINE_BLOCK_MASK asks for it)
    separate_full_blocks: bool = True

    def __init__(
        self,
        seq_lengths: Tuple[int, int],
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: Optional[torch.Tensor],
        full_kv_indices: Optional[torch.Tensor],
        q_num_blocks: torch.Tensor,
        q_indices: torch.Tensor,
        full_q_num_blocks: Optional[torch.Tensor],
        full_q_indices: Optional[torch.Tensor],
        BLOCK_SIZE: Tuple[int, int],
        mask_mod: Optional[Callable],
    ):
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = _normalize_block_size(BLOCK_SIZE)
        self.mask_mod = mask_mod if mask_mod is not None else noop_mask
        # the same mask on 64 x 64 blocks, kept by create_block_mask when that saves the kernels
        # 10% of the area or more (kernel_block_mask); None otherwise
        self.refined: Optional["BlockMask"] = None
        # True when the full blocks are where mask_mod holds everywhere (create_block_mask built
        # them from it): evaluating mask_mod there changes nothing, which a kernel may use
        self.full_from_mask_mod = False

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: Optional[torch.Tensor] = None,
        full_kv_indices: Optional[torch.Tensor] = None,
        BLOCK_SIZE: Union[int, Tuple[int, int]] = 128,
        mask_mod: Optional[Callable] = None,
        seq_lengths: Optional[Tuple[int, int]] = None,
        compute_q_blocks: bool = True,
        *,
        dq_write_order: Optional[torch.Tensor] = None,
        dq_write_order_full: Optional[torch.Tensor] = None,
        dq_kv_order: Union[torch.Tensor, bool, None] = None,
    ) -> "BlockMask":
        """Build a BlockMask from kv-side block lists; the q-side lists are derived by transposing.

        ``compute_q_blocks`` and the keyword-only ``dq_*`` arguments are PyTorch's: accepted for the
        import switch and unused (the backward kernels always need the q-side lists, which cost one
        transpose of the block map; dQ is deterministic here without a write order)."""
        if not isinstance(compute_q_blocks, bool):
            raise ValueError(f"from_kv_blocks: compute_q_blocks must be a bool, got {compute_q_blocks!r}")
        for name, t in (("dq_write_order", dq_write_order), ("dq_write_order_full", dq_write_order_full)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise ValueError(f"from_kv_blocks: {name} must be a tensor or None, got {type(t).__name__}")
        if dq_kv_order is not None and not isinstance(dq_kv_order, (bool, torch.Tensor)):
            raise ValueError(f"from_kv_blocks: dq_kv_order must be a bool, a tensor or None, got {dq_kv_order!r}")
        bs = _normalize_block_size(BLOCK_SIZE)
        if kv_indices.dim() != 4:
            raise ValueError(f"kv_indices must be 4-D (B, H, num_q_blocks, num_kv_blocks), got shape {tuple(kv_indices.shape)}")
        if tuple(kv_num_blocks.shape) != tuple(kv_indices.shape[:3]):
            raise ValueError(
                f"kv_num_blocks must have shape {tuple(kv_indices.shape[:3])} (kv_indices' first 3 dims), "
                f"got {tuple(kv_num_blocks.shape)}"
            )
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be given together")
        n_q, n_kv = kv_indices.shape[2], kv_indices.shape[3]
        if seq_lengths is None:
            seq_lengths = (n_q * bs[0], n_kv * bs[1])
        kv_num_blocks = kv_num_blocks.to(torch.int32)
        kv_indices = kv_indices.to(torch.int32)
        partial = _dense_from_indices(kv_num_blocks, kv_indices, n_kv)
        q_num, q_idx = _ordered_indices(partial.transpose(-1, -2))
        full_q_num = full_q_idx = None
        if full_kv_num_blocks is not None:
            full_kv_num_blocks = full_kv_num_blocks.to(torch.int32)
            full_kv_indices = full_kv_indices.to(torch.int32)
            full = _dense_from_indices(full_kv_num_blocks, full_kv_indices, full_kv_indices.shape[-1])
            full_q_num, full_q_idx = _ordered_indices(full.transpose(-1, -2))
        return cls(
            seq_lengths, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
            q_num, q_idx, full_q_num, full_q_idx, bs, mask_mod,
        )

    # ---- views --------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(B, H, Q_LEN, KV_LEN) the mask was built for (B/H are 1 when broadcast)."""
        return (self.kv_indices.shape[0], self.kv_indices.shape[1], *self.seq_lengths)

    @property
    def num_blocks(self) -> Tuple[int, int]:
        return (self.kv_indices.shape[2], self.kv_indices.shape[3])

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def partial_blocks(self) -> torch.Tensor:
        """bool (B, H, num_q_blocks, num_kv_blocks): blocks that need mask_mod."""
        return _dense_from_indices(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])

    def full_blocks(self) -> torch.Tensor:
        """bool (B, H, num_q_blocks, num_kv_blocks): blocks computed without mask_mod."""
        if self.full_kv_num_blocks is None:
            return torch.zeros_like(self.partial_blocks())
        return _dense_from_indices(self.full_kv_num_blocks, self.full_kv_indices, self.num_blocks[1])

    def to_dense(self) -> torch.Tensor:
        """int32 (B, H, num_q_blocks, num_kv_blocks): 1 where a block is computed at all."""
        return (self.partial_blocks() | self.full_blocks()).to(torch.int32)

    def sparsity(self) -> float:
        """Percentage of blocks skipped."""
        dense = self.to_dense()
        return 100.0 * (1.0 - dense.sum().item() / max(dense.numel(), 1))

    def _carry_facts(self, out: "BlockMask") -> "BlockMask":
        # what a copy, slice or cut of this mask still says about how it was built
        out.full_from_mask_mod = self.full_from_mask_mod
        out.separate_full_blocks = self.separate_full_blocks
        return out

    def numel(self) -> int:
        """Elements of the mask it describes, B * H * Q_LEN * KV_LEN, sparsity not counted."""
        return math.prod(self.shape)

    def _adjust(self, new_q_len: int, new_kv_len: int) -> "BlockMask":
        """The mask cut down to the first new_q_len queries and new_kv_len keys (PyTorch's name, kept
        so that decode loops written for it run): query blocks past the new length are dropped and
        kv blocks past it leave every list. Lengths beyond the mask's own raise: no blocks exist there."""
        Lq, Lkv = self.seq_lengths
        for name, new, old in (("new_q_len", new_q_len, Lq), ("new_kv_len", new_kv_len, Lkv)):
            if isinstance(new, bool) or not isinstance(new, int) or not 0 < new <= old:
                raise ValueError(f"BlockMask._adjust: {name} must be an int in [1, {old}] (the mask's own length), "
                                 f"got {new!r}")
        nq, nk = math.ceil(new_q_len / self.BLOCK_SIZE[0]), math.ceil(new_kv_len / self.BLOCK_SIZE[1])
        partial = self.partial_blocks()[:, :, :nq, :nk]
        full = None if self.full_kv_num_blocks is None else self.full_blocks()[:, :, :nq, :nk]
        out = self._carry_facts(_from_maps(partial, full, (new_q_len, new_kv_len), self.BLOCK_SIZE, self.mask_mod))
        if self.refined is not None:
            out.refined = self.refined._adjust(new_q_len, new_kv_len)
        return out

    def to(self, device: Union[str, torch.device]) -> "BlockMask":
        def mv(t):
            return None if t is None else t.to(device)

        out = BlockMask(
            self.seq_lengths, mv(self.kv_num_blocks), mv(self.kv_indices), mv(self.full_kv_num_blocks),
            mv(self.full_kv_indices), mv(self.q_num_blocks), mv(self.q_indices), mv(self.full_q_num_blocks),
            mv(self.full_q_indices), self.BLOCK_SIZE, self.mask_mod,
        )
        out.refined = self.refined.to(device) if self.refined is not None else None
        self._carry_facts(out)
        out._runs_kv, out._runs_q, out._union_kv, out._union_q = (self._runs_kv, self._runs_q, self._union_kv,
                                                                  self._union_q)
        return out

    def __getitem__(self, index) -> "BlockMask":
        """Slice batch / head / q-block dims; integer indices keep their dimension (size 1)."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3:
            raise IndexError("a BlockMask can be indexed on (batch, head, q_block) only")
        norm = []
        for dim, i in enumerate(index):
            if isinstance(i, int) and not isinstance(i, bool):
                size = self.kv_num_blocks.shape[dim]
                if not -size <= i < size:
                    raise IndexError(f"index {i} out of range for BlockMask dim {dim} of size {size}")
                i = i % size
                norm.append(slice(i, i + 1))
            elif isinstance(i, torch.Tensor) and i.dim() == 0:
                norm.append(i.reshape(1))  # a 0-d index (e.g. input_pos // BLOCK) keeps the dim too, no sync
            elif isinstance(i, slice) or isinstance(i, torch.Tensor):
                norm.append(i)
            else:
                raise IndexError(f"BlockMask indices must be ints, slices or tensors, got {type(i).__name__}")
        idx = tuple(norm)

        def sel(t):
            return None if t is None else t[idx]

        kv_num, kv_idx = sel(self.kv_num_blocks), sel(self.kv_indices)
        q_len = self.seq_lengths[0]
        if len(idx) == 3:
            q_len = min(kv_idx.shape[2] * self.BLOCK_SIZE[0], q_len)
        out = BlockMask.from_kv_blocks(
            kv_num, kv_idx, sel(self.full_kv_num_blocks), sel(self.full_kv_indices),
            BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod, seq_lengths=(q_len, self.seq_lengths[1]),
        )
        self._carry_facts(out)
        # any subset of query blocks keeps each one's kv runs (the q side is read again if needed)
        out._runs_kv, out._union_kv = self._runs_kv or None, self._union_kv or None
        return out

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 40), b: int = 0, h: int = 0,
                  limit: Optional[int] = None) -> str:
        """ASCII picture of one (b, h) slice: '█' full, '░' partial, ' ' skipped; with ``limit``
        (PyTorch's argument), of the first ``limit`` (b, h) slices instead.

        Large masks are shown downsampled: a cell is full only if every block it covers is.
        """
        if isinstance(grid_size, int) and not isinstance(grid_size, bool):
            grid_size = (grid_size, grid_size)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"to_string: limit must be a positive int or None, got {limit!r}")
            B, H = self.kv_num_blocks.shape[:2]
            pairs = [(i, j) for i in range(B) for j in range(H)][:limit]
            return "\n\n".join(self.to_string(grid_size, i, j) for i, j in pairs)
        full = self.full_blocks()[b, h]
        part = self.partial_blocks()[b, h]
        nq, nkv = full.shape
        rq, rk = max(1, math.ceil(nq / grid_size[0])), max(1, math.ceil(nkv / grid_size[1]))
        lines = []
        for i in range(0, nq, rq):
            row = []
            for j in range(0, nkv, rk):
                f, p = full[i:i + rq, j:j + rk], part[i:i + rq, j:j + rk]
                if bool(f.all()):
                    row.append("██")
                elif bool(f.any() | p.any()):
                    row.append("░░")
                else:
                    row.append("  ")
            lines.append("|" + "".join(row) + "|")
        header = f"BlockMask {self.shape} blocks={self.BLOCK_SIZE} sparsity={self.sparsity():.1f}% (b={b}, h={h})"
        if rq > 1 or rk > 1:
            header += f" [each cell = {rq}x{rk} blocks]"
        return header + "\n" + "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, num_blocks={self.num_blocks}, "
            f"sparsity={self.sparsity():.2f}%, mask_mod={mod_name(self.mask_mod)}, device={self.device})"
        )

    def as_tuple(self):
        return (
            self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks, self.full_kv_indices,
            self.q_num_blocks, self.q_indices, self.full_q_num_blocks, self.full_q_indices,
        )


def _block_any_all(mask_mod, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, device):
    """Per-block any/all of mask_mod over valid positions, one chunk of query blocks at a time."""
    n_q, n_kv = math.ceil(Q_LEN / q_bs), math.ceil(KV_LEN / kv_bs)
    b = torch.arange(B, device=device)
    h = torch.arange(H, device=device)
    kv = torch.arange(KV_LEN, device=device)
    any_blk = torch.empty(B, H, n_q, n_kv, dtype=torch.bool, device=device)
    all_blk = torch.empty_like(any_blk)
    pad_kv = n_kv * kv_bs - KV_LEN
    blocks_per_chunk = max(1, _BUILD_CHUNK_ELEMS // max(1, B * H * q_bs * KV_LEN))
    for qb0 in range(0, n_q, blocks_per_chunk):
        qb1 = min(n_q, qb0 + blocks_per_chunk)
        q = torch.arange(qb0 * q_bs, min(qb1 * q_bs, Q_LEN), device=device)
        m = eval_mask_grid(mask_mod, b, h, q, kv)
        pad_q = (qb1 - qb0) * q_bs - q.numel()
        # padding never changes the answer: False for "any", True for "all"
        shape = (B, H, qb1 - qb0, q_bs, n_kv, kv_bs)
        m_any = torch.nn.functional.pad(m, (0, pad_kv, 0, pad_q), value=False).view(shape)
        m_all = torch.nn.functional.pad(m, (0, pad_kv, 0, pad_q), value=True).view(shape)
        any_blk[:, :, qb0:qb1] = m_any.any(dim=5).any(dim=3)
        all_blk[:, :, qb0:qb1] = m_all.all(dim=5).all(dim=3)
    return any_blk, all_blk


def _default_device(device) -> torch.device:
    # PyTorch's create_block_mask / create_mask take device=None too
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_block_mask(
    mask_mod: Optional[Callable],
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device: Union[str, torch.device] = "cuda" if torch.cuda.is_available() else "cpu",
    BLOCK_SIZE: Union[int, Tuple[int, int]] = 128,
    _compile: bool = False,
    separate_full_blocks: bool = True,
    compute_dq_write_order: bool = False,
    dq_kv_order: bool = True,
) -> BlockMask:
    """Evaluate ``mask_mod`` block by block and return the BlockMask.

    B / H may be None to build one mask broadcast over batch / heads. Peak memory is one chunk of
    the bool grid (about 32 MB), never the full (B, H, Q_LEN, KV_LEN) mask.

    ``separate_full_blocks=False`` lists every non-empty block as partial, so the kernels apply
    mask_mod everywhere. ``compute_dq_write_order`` / ``dq_kv_order`` are PyTorch's metadata for
    its deterministic FLASH backward; accepted for the import switch, they change nothing here (the
    dQ kernel owns its query tile, so dQ is deterministic without a write order).
    """
    if mask_mod is None:
        mask_mod = noop_mask
    check_arity(mask_mod, "mask_mod")
    for name, v in (("separate_full_blocks", separate_full_blocks), ("compute_dq_write_order", compute_dq_write_order),
                    ("dq_kv_order", dq_kv_order)):
        if not isinstance(v, bool):
            raise ValueError(f"create_block_mask: {name} must be a bool, got {v!r}")
    q_bs, kv_bs = _normalize_block_size(BLOCK_SIZE)
    B = 1 if B is None else B
    H = 1 if H is None else H
    for name, v in (("B", B), ("H", H), ("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"create_block_mask: {name} must be a positive int (or None for B/H), got {v!r}")
    device = _default_device(device)
    if mask_mod is noop_mask:
        n_q, n_kv = math.ceil(Q_LEN / q_bs), math.ceil(KV_LEN / kv_bs)
        any_blk = all_blk = torch.ones(B, H, n_q, n_kv, dtype=torch.bool, device=device)
    else:
        any_blk, all_blk = _block_any_all(mask_mod, B, H, Q_LEN, KV_LEN, q_bs, kv_bs, device)
    if separate_full_blocks:
        bm = _from_maps(any_blk & ~all_blk, all_blk, (Q_LEN, KV_LEN), (q_bs, kv_bs), mask_mod)
        bm.full_from_mask_mod = True
        _attach_refinement(bm)
    else:
        bm = _from_maps(any_blk, None, (Q_LEN, KV_LEN), (q_bs, kv_bs), mask_mod)
        bm.separate_full_blocks = False
    if not torch.compiler.is_compiling() and bm.kv_indices.device.type != "meta":
        # read now, with the refinement's device reads, so calls (and compiled graphs, which see
        # these as constants) need none
        for mask in (bm, bm.refined):
            if mask is not None:
                block_runs(mask, "kv"), block_runs(mask, "q"), union_run(mask, "kv"), union_run(mask, "q")
    return bm


def refine_block_mask(block_mask: BlockMask, BLOCK_SIZE: Union[int, Tuple[int, int]] = 64) -> BlockMask:
    """The same mask on a finer block grid, for kernels that then walk fewer and cheaper tiles.

    Full and empty blocks split without evaluating anything; mask_mod runs only inside the
    partial blocks, so the cost is (partial blocks) x (block area), never Q_LEN x KV_LEN. A fine
    block comes out partial, full or empty by what mask_mod says over its valid positions.
    Assumes ``block_mask`` describes its own mask_mod (as create_block_mask builds it); a mask
    broadcast over batch or heads is evaluated at b = 0 / h = 0, so refine such a mask only when
    its mask_mod does not read b / h.
    """
    fq, fk = _normalize_block_size(BLOCK_SIZE)
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    if q_bs % fq or kv_bs % fk:
        raise ValueError(f"refine_block_mask: BLOCK_SIZE {(fq, fk)} must divide the mask's BLOCK_SIZE {(q_bs, kv_bs)}")
    partial, full = _refined_maps(block_mask, fq, fk)
    out = _from_maps(partial, full, block_mask.seq_lengths, (fq, fk), block_mask.mask_mod)
    out.full_from_mask_mod = block_mask.full_from_mask_mod  # full fine blocks come from full coarse ones too
    return out


def _refined_maps(block_mask: BlockMask, fq: int, fk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool maps of ``block_mask`` on the (fq, fk) grid (see refine_block_mask)."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    rq, rk = q_bs // fq, kv_bs // fk
    Lq, Lkv = block_mask.seq_lengths
    partial, full = block_mask.partial_blocks(), block_mask.full_blocks()
    B, H, nq, nk = partial.shape
    # fine blocks wholly past the sequence would be walked without load masks: drop them
    nfq, nfk = min(nq * rq, math.ceil(Lq / fq)), min(nk * rk, math.ceil(Lkv / fk))
    fine_full = full.repeat_interleave(rq, 2).repeat_interleave(rk, 3)[:, :, :nfq, :nfk].contiguous()
    fine_partial = torch.zeros_like(fine_full)
    where = partial.nonzero()
    dev = partial.device
    ar_q, ar_k = torch.arange(q_bs, device=dev), torch.arange(kv_bs, device=dev)
    per_chunk = max(1, _BUILD_CHUNK_ELEMS // (q_bs * kv_bs))
    for c0 in range(0, where.shape[0], per_chunk):
        b, h, qb, kb = where[c0:c0 + per_chunk].unbind(1)
        p = b.numel()
        q = qb[:, None] * q_bs + ar_q
        kv = kb[:, None] * kv_bs + ar_k
        # positions past the end are evaluated clamped (a mask_mod may index a tensor with them)
        # and then count as "no answer": False for any, True for all
        valid = (q < Lq)[:, :, None] & (kv < Lkv)[:, None, :]
        m = eval_mask_blocks(block_mask.mask_mod, b, h, q.clamp(max=Lq - 1), kv.clamp(max=Lkv - 1))
        any_ = (m & valid).view(p, rq, fq, rk, fk).any(4).any(2)
        all_ = (m | ~valid).view(p, rq, fq, rk, fk).all(4).all(2) & any_
        fi = (qb[:, None, None] * rq + torch.arange(rq, device=dev)[None, :, None]).expand(p, rq, rk)
        fj = (kb[:, None, None] * rk + torch.arange(rk, device=dev)[None, None, :]).expand(p, rq, rk)
        keep = (fi < nfq) & (fj < nfk)
        bb, hh = b[:, None, None].expand(p, rq, rk)[keep], h[:, None, None].expand(p, rq, rk)[keep]
        fine_partial[bb, hh, fi[keep], fj[keep]] = (any_ & ~all_)[keep]
        fine_full[bb, hh, fi[keep], fj[keep]] = all_[keep]
    return fine_partial, fine_full


def _from_maps(partial: torch.Tensor, full: Optional[torch.Tensor], seq_lengths, block_size, mask_mod) -> BlockMask:
    # full None: a mask with no full-block lists at all (separate_full_blocks=False)
    kv_num, kv_idx = _ordered_indices(partial)
    q_num, q_idx = _ordered_indices(partial.transpose(-1, -2))
    full_kv_num = full_kv_idx = full_q_num = full_q_idx = None
    if full is not None:
        full_kv_num, full_kv_idx = _ordered_indices(full)
        full_q_num, full_q_idx = _ordered_indices(full.transpose(-1, -2))
    return BlockMask(
        seq_lengths, kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx,
        block_size, mask_mod,
    )


# The kernels' refinement (kernel_options REFINE_BLOCK_MASK): 64 x 64 blocks, taken when they cover
# at most REFINE_GAIN of the area of the BlockMask's own. H100, bf16, D=128, 8 causal documents:
# S=1024 (share 0.69) eager fwd 80.6 -> 111.6 TFLOP/s; S=4096 (share 0.84) 142.6 -> 174.9.
# They must also save ROW_SAVING coarse blocks per non-empty coarse row: a causal mask saves 0.25 at
# every length (one corner of each diagonal block) while its share crosses 0.9 between S=512 and
# 640, so without this rule a compiled causal call with dynamic lengths recompiled there (the
# refinement is part of the BlockMask's pytree); the two documents above save 0.97 and 0.64.
FINE_BLOCK = 64
REFINE_GAIN = 0.9
ROW_SAVING = 0.5


def refinement_pays(block_mask: BlockMask, partial: torch.Tensor, full: torch.Tensor) -> bool:
    """Whether fine maps (partial, full) on the FINE_BLOCK grid save enough of the BlockMask's area."""
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    dense = block_mask.to_dense()
    coarse = int(dense.sum())
    fine = int((partial | full).sum()) * FINE_BLOCK * FINE_BLOCK / (q_bs * kv_bs)  # in coarse blocks
    rows = int((dense.sum(-1) > 0).sum())
    return fine <= REFINE_GAIN * coarse and coarse - fine >= ROW_SAVING * rows


def refinable(block_mask: BlockMask) -> bool:
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    return not (q_bs % FINE_BLOCK or kv_bs % FINE_BLOCK or (q_bs, kv_bs) == (FINE_BLOCK, FINE_BLOCK))


def _attach_refinement(bm: BlockMask) -> None:
    """create_block_mask's part: keep the 64 x 64 refinement on the mask when it pays, so compiled
    calls (which cannot evaluate mask_mod while tracing) take it too."""
    if not refinable(bm) or bm.mask_mod is noop_mask or torch.compiler.is_compiling():
        return
    if 1 in bm.shape[:2]:  # maybe broadcast over b or h: not for a mask_mod that reads it
        from .kernel import mask_index_reads

        reads = mask_index_reads(bm.mask_mod, bm.device)
        if (bm.shape[0] == 1 and "b" in reads) or (bm.shape[1] == 1 and "h" in reads):
            return
    partial, full = _refined_maps(bm, FINE_BLOCK, FINE_BLOCK)
    if refinement_pays(bm, partial, full):
        bm.refined = _from_maps(partial, full, bm.seq_lengths, (FINE_BLOCK, FINE_BLOCK), bm.mask_mod)
        bm.refined.full_from_mask_mod = bm.full_from_mask_mod


def kernel_block_mask(block_mask: Optional[BlockMask], opts: dict) -> Optional[BlockMask]:
    """The BlockMask the kernels walk: the attached refinement unless kernel_options say otherwise
    (REFINE_BLOCK_MASK False, or tiles pinned for the BlockMask's own block size)."""
    if block_mask is None or block_mask.refined is None or opts.get("REFINE_BLOCK_MASK") is False:
        return block_mask
    if opts.get("REFINE_BLOCK_MASK") is None and any(k in opts for k in PINNED_TILES):
        return block_mask
    return block_mask.refined


PINNED_TILES = ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")


def create_mask(
    mod_fn: Callable,
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    device: Union[str, torch.device] = "cuda" if torch.cuda.is_available() else "cpu",
) -> torch.Tensor:
    """Dense bool mask (B, H, Q_LEN, KV_LEN) of a mask_mod (or of a score_mod: where it is not -inf).

    This one is O(Q_LEN * KV_LEN) by design: it is for inspection and tests.
    """
    B = 1 if B is None else B
    H = 1 if H is None else H
    device = _default_device(device)
    idx = [torch.arange(n, device=device) for n in (B, H, Q_LEN, KV_LEN)]
    import inspect

    try:
        n_params = len(inspect.signature(mod_fn).parameters)
    except (TypeError, ValueError):
        n_params = 4
    if n_params == 5:
        from .mods import eval_score_grid

        score = torch.zeros(B, H, Q_LEN, KV_LEN, device=device)
        return eval_score_grid(mod_fn, score, *idx) != float("-inf")
    check_arity(mod_fn, "mask_mod")
    return eval_mask_grid(mod_fn, *idx)


def dense_block_maps(block_mask: BlockMask) -> Tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool block maps: the math path's view of a BlockMask."""
    return block_mask.partial_blocks(), block_mask.full_blocks()


def _one_run(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    j = torch.arange(idx.shape[-1], device=idx.device)
    return (((idx - idx[..., :1]) == j) | (j >= num[..., None])).all()


def block_runs(block_mask: BlockMask, side: str = "kv") -> bool:
    """Whether every query block's partial kv blocks, and its full ones, are one ascending run each
    (side "kv"; side "q": every kv block's query blocks). Causal, prefix-LM and narrow windows;
    not packed documents in general. A kernel loop then needs a row's first index only, no index
    load per tile (the warp-specialized forward cannot take one). One device read per BlockMask
    and side, kept on it (create_block_mask reads both)."""
    hit = getattr(block_mask, "_runs_" + side)
    if hit is None:
        if side == "q":
            lists = ((block_mask.q_num_blocks, block_mask.q_indices),
                     (block_mask.full_q_num_blocks, block_mask.full_q_indices))
        else:
            lists = ((block_mask.kv_num_blocks, block_mask.kv_indices),
                     (block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
        ok = _one_run(*lists[0])
        if lists[1][0] is not None:
            ok = ok & _one_run(*lists[1])
        hit = bool(ok.item())
        setattr(block_mask, "_runs_" + side, hit)
    return hit


def union_run(block_mask: BlockMask, side: str = "kv") -> bool:
    """Whether every query block's partial and full kv blocks together are one run of blocks, each
    list ascending (side "kv"; side "q": every kv block's query blocks). A sliding window: partial
    blocks at both ends of its full ones; packed causal documents alike; also causal and prefix-LM.
    A kernel that may evaluate mask_mod on full blocks (full_from_mask_mod) then walks the row in
    one loop from its first block. One device read per BlockMask and side, kept on it."""
    hit = getattr(block_mask, "_union_" + side)
    if hit is None:
        if side == "q":
            num, idx = block_mask.q_num_blocks, block_mask.q_indices
            fnum, fidx = block_mask.full_q_num_blocks, block_mask.full_q_indices
        else:
            num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
            fnum, fidx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
        ok = _ascending(num, idx)
        first, last, count = _ends(num, idx)
        if fnum is not None:
            ok = ok & _ascending(fnum, fidx)
            f_first, f_last, f_count = _ends(fnum, fidx)
            first, last, count = torch.minimum(first, f_first), torch.maximum(last, f_last), count + f_count
        ok = ok & ((count == 0) | (last - first + 1 == count)).all()
        hit = bool(ok.item())
        setattr(block_mask, "_union_" + side, hit)
    return hit


def _ascending(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    j = torch.arange(1, idx.shape[-1], device=idx.device)
    return ((idx[..., 1:] > idx[..., :-1]) | (j >= num[..., None])).all()


def _ends(num: torch.Tensor, idx: torch.Tensor):
    """(first, last, count) of each row's listed blocks (ascending lists); empty rows give
    (large, -1, 0) so they drop out of a min / max."""
    num = num.to(torch.int64)
    first = torch.where(num > 0, idx[..., 0].to(torch.int64), 1 << 40)
    last = torch.where(num > 0, idx.to(torch.int64).gather(-1, (num - 1).clamp(min=0)[..., None])[..., 0], -1)
    return first, last, num


def noop_block_mask(Q_LEN: int, KV_LEN: int, device, BLOCK_SIZE: Sequence[int] = (128, 128)) -> BlockMask:
    return create_block_mask(noop_mask, None, None, Q_LEN, KV_LEN, device=device, BLOCK_SIZE=tuple(BLOCK_SIZE))
