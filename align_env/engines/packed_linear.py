"""Linear layers on oneDNN's pre-packed weights, for models that only run inference on CPU (the sampling copy).

``torch.nn.functional.linear`` hands a plain weight to the BLAS, which re-lays it out on every call; at a
decode step's shape (16 rows x 576 x 1536) that reaches 6-8 GB/s of weights read here, a quarter of what the
memory streams. oneDNN's linear on a weight packed once into its blocked layout reads 13-17 GB/s at the
same shapes and is faster at prefill shapes too (``benchmarks/perf/bench_limits.py``). In bf16 the outputs
are bit-identical to ``F.linear``; in fp32 they differ by rounding (about 1e-6 relative: another order of
accumulation).

:func:`pack_linears` turns every ``nn.Linear`` of a model into a :class:`PackedLinear`, which keeps only the
packed weight (no second copy): its ``weight`` parameter becomes an empty placeholder, and new weights are set
with :func:`set_linear_weight` (the LoRA merge into the sampling copy does this). Only where oneDNN is
available (:func:`can_pack`); gradients do not flow through a packed layer.
"""

from __future__ import annotations

import torch


def can_pack(device: torch.device | str = "cpu") -> bool:
    """oneDNN packing is a CPU path (the rule behind the ``linear`` entry of the sampler's recorded paths)."""
    return torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose weight lives pre-packed for oneDNN (see the module docstring)."""

    packed: torch.Tensor

    def set_weight(self, weight: torch.Tensor) -> None:
        """Pack ``weight`` (cast to this layer's dtype) as the layer's new weight."""
        weight = weight.detach().to(self.packed_dtype).contiguous()
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.in_features}->{self.out_features} "
                             "linear layer")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain tensor again (for checks and tests)."""
        return self.packed.to_dense() if self.packed.layout != torch.strided else self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.packed_dtype).contiguous()  # what bf16 autocast does to a linear's input
        bias = None if self.bias is None else self.bias.to(self.packed_dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> int:
    """Turn every ``nn.Linear`` of ``model`` into a :class:`PackedLinear` and free its dense weight (a tied output
    head is packed from the embedding, which keeps its own weight). Returns how many layers were packed."""
    count = 0
    for module in list(model.modules()):
        if type(module) is not torch.nn.Linear:
            continue
        weight = module.weight.detach()
        module.__class__ = PackedLinear
        module.packed_dtype = weight.dtype
        module.set_weight(weight)
        module.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)  # placeholder: no dense copy
        count += 1
    return count


def set_linear_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write ``weight`` into a linear layer, packed or not (a plain layer rounds it to its own dtype)."""
    if isinstance(module, PackedLinear):
        module.set_weight(weight)
    else:
        module.weight.copy_(weight)
