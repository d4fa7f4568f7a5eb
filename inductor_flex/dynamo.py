"""Dynamo support for the flex attention HOP: how ``torch.compile`` captures a call.

Dynamo traces ``flex_attention`` itself (plain Python) down to the ``flex_attention_hop`` call.
There, this variable class speculates ``score_mod`` and ``mask_mod`` on 0-d example tensors into
FX subgraphs; tensors the mods read from their closures (bias tables, document ids, offsets)
are lifted by the speculation into extra operands of the HOP, so new tensor values (or a new
BlockMask whose tensors have the same shapes) reuse the compiled graph. Registration goes into
Dynamo's HOP-name table through compat (``install()``, called on ``import inductor_flex``).
"""
from __future__ import annotations

import functools

import torch

from . import compat
from .hop import BM_MASK_MOD, flex_attention_hop
from .lowering import tuning_masks
from .mods import TensorIndexMode


@functools.lru_cache(None)
def variable_class():
    HOPVariable, speculate_subgraph, make_attr, wrap_fx_proxy, discard_graph_changes = compat.dynamo_hop_support()

    class FlexAttentionHOPVariable(HOPVariable):
        """Traces ``flex_attention_hop(q, k, v, score_mod, block_mask_tuple, scale, kernel_options)``."""

        _HOP_NAME = "inductor_flex.flex_attention"  # names the op in Dynamo's graph-break messages
        _ALLOW_FALLBACK_TO_EAGER = True  # a mod Dynamo cannot trace is a graph break, not an error

        def _example_args(self, tx, query, kind: str):
            def scalar(dtype):
                return query.call_method(tx, "new_empty", [compat.dynamo_constant(tx, [])],
                                         {"dtype": compat.dynamo_constant(tx, dtype)})

            with discard_graph_changes(tx):
                idx = [scalar(torch.int32) for _ in range(4)]
                if kind == "score_mod":
                    q_dtype = query.as_proxy().node.meta["example_value"].dtype
                    return [scalar(torch.float64 if q_dtype == torch.float64 else torch.float32)] + idx
                return idx

        def _subgraph(self, tx, query, fn, kind: str):
            args = self._example_args(tx, query, kind)
            with TensorIndexMode():
                res = speculate_subgraph(
                    tx, fn, args, {}, description=f"inductor_flex {kind}", source_target=self.value,
                    set_subgraph_inputs="flatten_manual",
                )
            graph, lifted = res[1], res[2]
            name = tx.output.install_subgraph(kind, torch.fx.GraphModule(tx.output.nn_modules, graph))
            return make_attr(tx, name), tuple(lifted.keys())

        @staticmethod
        def _options_with_mask(options, bm_items):
            """kernel_options naming this call's real BlockMask for Inductor's config benchmarks
            (lowering/tuning_masks.py), when its tensors are inputs of the compiled frame."""
            tensors = []
            for vt in bm_items[2:10]:  # kv_num, kv_idx, full_num, full_idx, and the q side's
                if vt.is_python_constant() and vt.as_python_constant() is None:
                    tensors.append(None)
                    continue
                value = compat.dynamo_input_value(vt)
                if value is None:
                    return options.as_proxy()
                tensors.append(value)
            key = tuning_masks.remember(tensors)
            if key is None or not options.is_python_constant():
                return options.as_proxy()
            return {**(options.as_python_constant() or {}), tuning_masks.TUNE_KEY: key}

        def call_function(self, tx, args, kwargs):
            names = ("query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options")
            if len(args) + len(kwargs) != len(names):
                raise TypeError(f"flex_attention_hop takes {len(names)} arguments, got {len(args) + len(kwargs)}")
            args, kwargs = compat.dynamo_realize((list(args), dict(kwargs)))
            bound = dict(zip(names, args))
            bound.update(kwargs)
            query = bound["query"]
            bm_items = bound["block_mask"].items
            score_node, score_bufs = self._subgraph(tx, query, bound["score_mod"], "score_mod")
            mask_node, mask_bufs = self._subgraph(tx, query, bm_items[BM_MASK_MOD], "mask_mod")

            def proxy(vt):
                return vt.as_proxy()

            bm = tuple(proxy(x) for x in bm_items[:BM_MASK_MOD]) + (mask_node,)
            node_args = (
                proxy(query), proxy(bound["key"]), proxy(bound["value"]), score_node, bm, proxy(bound["scale"]),
                self._options_with_mask(bound["kernel_options"], bm_items), score_bufs, mask_bufs,
            )
            p = tx.output.create_proxy("call_function", self.value, args=node_args, kwargs={})
            return wrap_fx_proxy(tx=tx, proxy=p, example_value=None)

    return FlexAttentionHOPVariable


def install() -> None:
    compat.register_dynamo_hop_variable(flex_attention_hop._name, variable_class())
