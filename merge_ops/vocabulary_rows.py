"""Token-indexed tensors (embeddings, lm_head) lined up row for row with the merged vocabulary, before the method.

The plan says, for each input of such a tensor, which of its own rows land on which output rows, and what fills the
rows it has no own row for (a token it lacks, or one the recipe forces). The method then merges the lined-up tensors
as it merges any other: mergekit's permuted vocabulary, computed from the tokenizers when the merge is planned.
"""
from __future__ import annotations

from functools import reduce

import torch
from pydantic import BaseModel


class VocabularyRows(BaseModel):
    """How the inputs of one token-indexed tensor line up with the output vocabulary (indices: the job's inputs, then its base)."""

    rows: int
    """Output rows, padding included."""
    tokens: int
    """Rows that hold a token; each input's rows ``[tokens, rows)`` are the mean of its first ``tokens`` rows (padding)."""
    copies: list[list[tuple[int, int, int]]]
    """Per input, runs ``(output row, own row, count)`` of its own rows."""
    fills: list[tuple[int, list[tuple[int, int]]]]
    """``(output row, [(input, row), ...])``: what an input without an own row there gets; one row is copied, several are
    averaged in the order given, none is zeros. Rows neither copied nor filled stay zero."""
    dtype: str | None = None
    """The recipe's dtype: the rows are lined up in it or in the stored dtype, whichever is wider, before any cast to the
    compute dtype (mergekit lines them up in the dtype it loads them in, the recipe's)."""


def _fill(tensors: list[torch.Tensor], parts: list[tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    if len(parts) == 1:
        index, row = parts[0]
        return tensors[index][row]
    total = torch.zeros(tensors[0].shape[1:], dtype=dtype, device=tensors[0].device)
    for index, row in parts:
        total = total + tensors[index][row]
    if parts:
        total /= len(parts)
    return total


def line_up(tensors: list[torch.Tensor], rows: VocabularyRows) -> list[torch.Tensor]:
    """Each input tensor with its rows in output order, in the inputs' promoted dtype.

    Args:
        tensors: the job's inputs, then its base, each ``(own rows, *rest)``.
        rows: the job's ``VocabularyRows``.

    Example:
        >>> line_up([torch.eye(2)], VocabularyRows(rows=3, tokens=3, copies=[[(1, 0, 2)]], fills=[(0, [])]))[0]
        tensor([[0., 0.], [1., 0.], [0., 1.]])
    """
    dtype = reduce(torch.promote_types, [t.dtype for t in tensors] + ([getattr(torch, rows.dtype)] if rows.dtype else []))
    shape = (rows.rows, *tensors[0].shape[1:])
    fill_rows = torch.tensor([row for row, _ in rows.fills], dtype=torch.long)
    fills = [_fill(tensors, parts, dtype) for _, parts in rows.fills]
    lined = []
    for tensor, runs in zip(tensors, rows.copies, strict=True):
        if runs == [(0, 0, rows.rows)] and rows.rows == rows.tokens == tensor.shape[0]:  # already lined up
            lined.append(tensor.to(dtype))
            continue
        out = torch.zeros(shape, dtype=dtype, device=tensor.device)
        own = torch.zeros(rows.rows, dtype=torch.bool)
        for start, source, count in runs:
            out[start : start + count] = tensor[source : source + count]
            own[start : start + count] = True
        for i in (~own[fill_rows]).nonzero().flatten().tolist():
            out[fill_rows[i]] = fills[i]
        if rows.rows > rows.tokens:
            out[rows.tokens :] = torch.mean(out[: rows.tokens], dim=0)
        lined.append(out)
    return lined
