"""The one registry of merge methods, imported explicitly."""
from __future__ import annotations

from merge_ops.errors import RecipeError
from merge_ops.methods.arcee_fusion import arcee_fusion
from merge_ops.methods.breadcrumbs import breadcrumbs, breadcrumbs_ties
from merge_ops.methods.dare import dare_linear, dare_ties
from merge_ops.methods.declaration import MergeMethod
from merge_ops.methods.della import della, della_linear
from merge_ops.methods.karcher import karcher
from merge_ops.methods.linear import linear
from merge_ops.methods.model_stock import model_stock
from merge_ops.methods.multislerp import multislerp
from merge_ops.methods.nearswap import nearswap
from merge_ops.methods.nuslerp import nuslerp
from merge_ops.methods.passthrough import passthrough
from merge_ops.methods.ram import ram, ramplus_tl
from merge_ops.methods.sce import sce
from merge_ops.methods.slerp import slerp
from merge_ops.methods.task_arithmetic import task_arithmetic
from merge_ops.methods.ties import ties

METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in (
        linear,
        slerp,
        nuslerp,
        multislerp,
        karcher,
        nearswap,
        task_arithmetic,
        ties,
        dare_ties,
        dare_linear,
        breadcrumbs,
        breadcrumbs_ties,
        della,
        della_linear,
        model_stock,
        passthrough,
        sce,
        arcee_fusion,
        ram,
        ramplus_tl,
    )
}


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; RecipeError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError([f"merge_method: {name!r} is not a known method; use one of {', '.join(METHODS)}"]) from None
