"""Paged KV cache: K/V of many sequences in one pool of fixed-size pages.

The cache tensors are ``(1, H, n_pages * page_size, D)``; a batch slot owns a list of pages, and the
page table maps its logical pages to physical ones. Attention reads the pool directly: the
BlockMask is converted so that its kv block indices name *physical* blocks (a page is a whole
number of kv blocks, so the kernel's inner loop needs no extra indirection), and the mods are
wrapped so that they still see *logical* kv positions through a captured physical -> logical table.

    cache = PagedKVCache(n_pages, page_size, max_batch_size, device="cuda")
    cache.reserve(slot, seq_len)                                  # grow a slot's pages
    cache.assign(batch_idx, input_pos, k_new, v_new, k_pool, v_pool)
    bm = cache.convert_logical_block_mask(logical_block_mask, batch_idx)
    out = flex_attention(q, k_pool.expand(B, -1, -1, -1), v_pool.expand(B, -1, -1, -1),
                         score_mod=cache.get_score_mod(score_mod, batch_idx), block_mask=bm)
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union

import torch

from .block_mask import BlockMask, _ordered_indices
from .mods import STATIC_MOD_DEPS, noop_mask

IntLike = Union[int, torch.Tensor]


def _as_int(x: IntLike, name: str) -> int:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a single integer, got a tensor of shape {tuple(x.shape)}")
        x = int(x.item())
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return x


class PagedKVCache:
    """Page bookkeeping for ``max_batch_size`` sequences sharing ``n_pages`` pages of ``page_size``."""

    def __init__(self, n_pages: int, page_size: int, max_batch_size: int,
                 device: Union[str, torch.device] = "cuda" if torch.cuda.is_available() else "cpu"):
        for name, v in (("n_pages", n_pages), ("page_size", page_size), ("max_batch_size", max_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {v!r}")
        self.n_pages = n_pages
        self.page_size = page_size
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        # logical page -> physical page, and back; -1 where unassigned
        self.page_table = torch.full((max_batch_size, n_pages), -1, dtype=torch.int32, device=self.device)
        self.physical_to_logical = torch.full((max_batch_size, n_pages), -1, dtype=torch.int32, device=self.device)
        self.free_pages: List[int] = list(range(n_pages - 1, -1, -1))  # pop() hands out low pages first
        self.pages: List[List[int]] = [[] for _ in range(max_batch_size)]
        # one wrapper per (mod, batch_idx, kv_len): a decode loop then reuses one printed kernel
        self._wrappers: Dict[tuple, tuple] = {}

    @property
    def capacity(self) -> int:
        """Tokens the pool holds: the cache tensors' sequence length."""
        return self.n_pages * self.page_size

    def _slot(self, batch_idx: IntLike) -> int:
        b = _as_int(batch_idx, "batch_idx")
        if not 0 <= b < self.max_batch_size:
            raise IndexError(f"batch_idx {b} out of range for max_batch_size {self.max_batch_size}")
        return b

    # ---- page bookkeeping -------------------------------------------------------------------
    def reserve(self, batch_idx: IntLike, seq_len: IntLike) -> None:
        """Make slot ``batch_idx`` hold at least ``seq_len`` tokens (pages are never given back here)."""
        b = self._slot(batch_idx)
        n = _as_int(seq_len, "seq_len")
        if n < 0:
            raise ValueError(f"seq_len must be >= 0, got {n}")
        need = -(-n // self.page_size) - len(self.pages[b])
        if need <= 0:
            return
        if need > len(self.free_pages):
            raise RuntimeError(
                f"PagedKVCache: slot {b} needs {need} more pages for seq_len {n} but only "
                f"{len(self.free_pages)} of {self.n_pages} are free; erase finished slots or use more pages"
            )
        start = len(self.pages[b])
        new = [self.free_pages.pop() for _ in range(need)]
        self.pages[b].extend(new)
        phys = torch.tensor(new, dtype=torch.int64, device=self.device)
        logical = torch.arange(start, start + need, dtype=torch.int32, device=self.device)
        self.page_table[b, start:start + need] = phys.to(torch.int32)
        self.physical_to_logical[b].index_copy_(0, phys, logical)

    def erase(self, batch_idx: IntLike) -> None:
        """Give slot ``batch_idx``'s pages back to the pool."""
        b = self._slot(batch_idx)
        self.free_pages.extend(reversed(self.pages[b]))
        self.pages[b] = []
        self.page_table[b] = -1
        self.physical_to_logical[b] = -1

    def assign(self, batch_idx: torch.Tensor, input_pos: torch.Tensor, k_val: torch.Tensor, v_val: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        """Write k_val / v_val (B, H, S, D) at logical positions input_pos (B, S) of slots batch_idx (B,)
        into the pools k_cache / v_cache (1, H, n_pages * page_size, D)."""
        if batch_idx.dim() != 1 or input_pos.dim() != 2 or input_pos.shape[0] != batch_idx.shape[0]:
            raise ValueError(f"batch_idx must be (B,) and input_pos (B, S); got {tuple(batch_idx.shape)} and "
                             f"{tuple(input_pos.shape)}")
        B, S = input_pos.shape
        for name, val, cache in (("k_val", k_val, k_cache), ("v_val", v_val, v_cache)):
            if cache.dim() != 4 or cache.shape[0] != 1 or cache.shape[2] != self.capacity:
                raise ValueError(f"{name[0]}_cache must be (1, H, {self.capacity}, D), got {tuple(cache.shape)}")
            if val.dim() != 4 or val.shape[0] != B or val.shape[2] != S or val.shape[1] != cache.shape[1] \
                    or val.shape[3] != cache.shape[3]:
                raise ValueError(
                    f"{name} must be ({B}, {cache.shape[1]}, {S}, {cache.shape[3]}), got {tuple(val.shape)}")
        pos = input_pos.to(torch.int64)
        page = self.page_table[batch_idx.to(torch.int64)[:, None], pos // self.page_size].to(torch.int64)
        if not (pos.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            if bool((page < 0).any()):
                raise ValueError("assign: some input_pos lie beyond the pages reserved for their slot; "
                                 "call reserve(batch_idx, seq_len) first")
        addr = (page * self.page_size + pos % self.page_size).flatten()
        for val, cache in ((k_val, k_cache), (v_val, v_cache)):
            H, D = cache.shape[1], cache.shape[3]
            cache[0].index_copy_(1, addr, val.transpose(0, 1).reshape(H, B * S, D).to(cache.dtype))

    # ---- attention over the pool ------------------------------------------------------------
    def _slots(self, batch_idx: Optional[torch.Tensor]) -> torch.Tensor:
        if batch_idx is None:
            return torch.arange(self.max_batch_size, device=self.device)
        return batch_idx.to(device=self.device, dtype=torch.int64)

    def convert_logical_block_mask(self, block_mask: BlockMask, batch_idx: Optional[torch.Tensor] = None) -> BlockMask:
        """The BlockMask of attention over the page pool.

        Its kv indices name physical blocks; blocks of unassigned pages are dropped; its mask_mod is
        the logical one seen through get_mask_mod (logical positions, and nothing at or beyond the
        logical KV_LEN). The page size must be a multiple of the mask's kv block size.
        """
        q_bs, kv_bs = block_mask.BLOCK_SIZE
        if self.page_size % kv_bs:
            raise ValueError(f"page_size {self.page_size} must be a multiple of the BlockMask's kv block size {kv_bs}")
        slots = self._slots(batch_idx)
        B = slots.shape[0]
        bm_b = block_mask.kv_num_blocks.shape[0]
        if bm_b not in (1, B):
            raise ValueError(f"block_mask has batch size {bm_b}; expected 1 or {B} (the batch_idx length)")
        kv_len = block_mask.seq_lengths[1]
        per_page = self.page_size // kv_bs
        n_phys = self.n_pages * per_page
        partial, full = block_mask.partial_blocks(), block_mask.full_blocks()
        n_log = partial.shape[-1]
        if n_log > n_phys:
            raise ValueError(f"block_mask covers {n_log} kv blocks but the pool has only {n_phys}")
        if kv_len % kv_bs:
            # the kernel's bound check sees the pool's length, not the logical one: the ragged
            # last block must go through mask_mod, which masks positions >= KV_LEN
            partial[..., -1] |= full[..., -1]
            full[..., -1] = False
        H, nq = partial.shape[1], partial.shape[2]
        partial = partial.expand(B, H, nq, n_log)
        full = full.expand(B, H, nq, n_log)
        lb = torch.arange(n_log, device=self.device)
        page = self.page_table[slots][:, lb // per_page].to(torch.int64)  # (B, n_log)
        target = torch.where(page >= 0, page * per_page + lb % per_page, torch.full_like(page, n_phys))
        target = target[:, None, None, :].expand(B, H, nq, n_log)

        def to_physical(dense):
            out = torch.zeros(B, H, nq, n_phys + 1, dtype=torch.bool, device=self.device)
            out.scatter_(-1, target, dense)  # blocks without a page land in the spare last column
            return out[..., :n_phys]

        p_phys, f_phys = to_physical(partial), to_physical(full)
        kv_num, kv_idx = _ordered_indices(p_phys)
        f_num, f_idx = _ordered_indices(f_phys)
        q_num, q_idx = _ordered_indices(p_phys.transpose(-1, -2))
        fq_num, fq_idx = _ordered_indices(f_phys.transpose(-1, -2))
        mask_mod = self.get_mask_mod(block_mask.mask_mod, batch_idx, kv_len=kv_len)
        out = BlockMask((block_mask.seq_lengths[0], self.capacity), kv_num, kv_idx, f_num, f_idx,
                        q_num, q_idx, fq_num, fq_idx, (q_bs, kv_bs), mask_mod)
        # made anew every step: its lists are walked as lists, with no device read to learn
        # whether pages happen to lie in runs (block_mask.block_runs)
        out._runs_kv = out._runs_q = out._union_kv = out._union_q = False
        return out

    def _to_logical(self, batch_idx: Optional[torch.Tensor]) -> Callable:
        """(b, physical kv_idx) -> (logical kv_idx, page assigned?) as tensor ops a mod can use."""
        table, page_size = self.physical_to_logical, self.page_size
        slots = None if batch_idx is None else self._slots(batch_idx)

        def to_logical(b, kv_idx):
            slot = b if slots is None else slots[b]
            logical_page = table[slot, kv_idx // page_size]
            ok = logical_page >= 0
            # positions of unassigned pages read as position 0; the caller masks them off
            return torch.where(ok, logical_page * page_size + kv_idx % page_size, 0), ok

        return to_logical

    def get_mask_mod(self, mask_mod: Optional[Callable], batch_idx: Optional[torch.Tensor] = None,
                     kv_len: Optional[int] = None) -> Callable:
        """mask_mod over physical kv positions that calls ``mask_mod`` with logical ones; positions of
        unassigned pages (and, given kv_len, logical positions >= kv_len) are masked."""
        inner = mask_mod if mask_mod is not None else noop_mask
        key = ("mask", id(inner), None if batch_idx is None else id(batch_idx), kv_len)
        hit = self._wrappers.get(key)
        if hit is not None and hit[0] is inner and hit[1] is batch_idx:
            return hit[2]
        to_logical = self._to_logical(batch_idx)

        def paged_mask(b, h, q_idx, kv_idx):
            logical, ok = to_logical(b, kv_idx)
            if kv_len is not None:
                ok = ok & (logical < kv_len)
            return ok & inner(b, h, q_idx, logical)

        paged_mask.__name__ = f"paged_{getattr(inner, '__name__', 'mask')}"
        setattr(paged_mask, STATIC_MOD_DEPS, (inner,))
        self._wrappers[key] = (inner, batch_idx, paged_mask)
        return paged_mask

    def get_score_mod(self, score_mod: Optional[Callable],
                      batch_idx: Optional[torch.Tensor] = None) -> Optional[Callable]:
        """score_mod over physical kv positions that calls ``score_mod`` with logical ones."""
        if score_mod is None:
            return None
        key = ("score", id(score_mod), None if batch_idx is None else id(batch_idx))
        hit = self._wrappers.get(key)
        if hit is not None and hit[0] is score_mod and hit[1] is batch_idx:
            return hit[2]
        to_logical = self._to_logical(batch_idx)

        def paged_score(score, b, h, q_idx, kv_idx):
            logical, _ = to_logical(b, kv_idx)
            return score_mod(score, b, h, q_idx, logical)

        paged_score.__name__ = f"paged_{getattr(score_mod, '__name__', 'score')}"
        setattr(paged_score, STATIC_MOD_DEPS, (score_mod,))
        self._wrappers[key] = (score_mod, batch_idx, paged_score)
        return paged_score
