"""Peak live tensor memory of CPU code, measured at the aten level (no CUDA needed)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTensorMemory(TorchDispatchMode):
    """Counts bytes of every storage produced by an op while it is alive; records the peak and the
    largest single allocation. Storages are keyed by data pointer and freed when their last tracked
    tensor dies."""

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> [bytes, refcount]
        self.current = 0
        self.peak = 0
        self.largest = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key == 0:
                    continue
                if key in self.live:
                    self.live[key][1] += 1
                else:
                    nbytes = st.nbytes()
                    self.live[key] = [nbytes, 1]
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    self.largest = max(self.largest, nbytes)
                weakref.finalize(t, self._release, key)
        return out
