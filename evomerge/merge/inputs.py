"""One tensor's merge inputs, read from the model files: the base and the deltas ``source - base``.

Why one function: the folder writer (:mod:`evomerge.merge.materialise`), the resident
in-place merger (its task vectors, built once) and the streaming in-place merger (per
merge) must hand ``methods.merge_tensor`` the very same values, or an exported folder
would not hold the bits the search scored. All three read here, with the same operations
in the same order: the base converted to the compute dtype, each source copied into the
compute dtype, then the base subtracted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

    from evomerge.merge.scratch import Workspace
    from evomerge.merge.sources import ModelSet, ModelSource


def read_inputs(model_set: "ModelSet", name: str, sources: "Sequence[ModelSource]", compute_dtype: "torch.dtype",
                device: "torch.device", *, workspace: "Workspace | None" = None,
                zeros: "dict[tuple[int, ...], torch.Tensor] | None" = None) -> "tuple[torch.Tensor, torch.Tensor]":
    """(base, deltas) of tensor ``name``: base (shape S) and ``sources``' deltas (len, *S),
    compute dtype, on ``device``; zeros and the sources themselves when there is no base model.

    ``workspace``: read into its ``input_base`` / ``input_deltas`` slots (reused tensor after
    tensor, so a streaming merge allocates nothing; valid until the next call). ``zeros``: a
    cache of zero bases by shape, shared by every tensor of that shape (the resident merger's).
    Without either, fresh tensors. Only the bytes of this tensor are read (memory-mapped).
    """
    import torch

    shape = tuple(model_set.reference.shape(name))
    has_base = model_set.base is not None
    if has_base:
        raw = model_set.base.get_tensor(name)
        if workspace is not None:
            base = workspace.take("input_base", shape, compute_dtype, device).copy_(raw)
        else:
            base = raw.to(device, compute_dtype)
        del raw
    elif zeros is not None:
        base = zeros.get(shape)
        if base is None:
            base = zeros[shape] = torch.zeros(shape, dtype=compute_dtype, device=device)
    elif workspace is not None:
        base = workspace.take("input_base", shape, compute_dtype, device).zero_()
    else:
        base = torch.zeros(shape, dtype=compute_dtype, device=device)
    full = (len(sources), *shape)
    if workspace is not None:
        deltas = workspace.take("input_deltas", full, compute_dtype, device)
    else:
        deltas = torch.empty(full, dtype=compute_dtype, device=device)
    for i, src in enumerate(sources):
        deltas[i].copy_(src.get_tensor(name))
        if has_base:
            deltas[i].sub_(base)
    return base, deltas
