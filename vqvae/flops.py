"""Analytic FLOP counts: walk a function's jaxpr and count its convolutions and matmuls.

The count depends only on shapes, never on the hardware: 2 x multiply-adds of every
``conv_general_dilated`` (transposed ones without the inserted zeros) and ``dot_general``,
loops (``scan``, ``while`` with a known trip count via ``fori_loop``) multiplied out.
Element-wise work is left out, as is usual when comparing models and computing MFU.
"""

import math
from collections.abc import Callable

import jax
from jax.extend import core

from vqvae.nets.upconv import canonical_form


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape  # kernel
    dn = eqn.params["dimension_numbers"]
    spatial = math.prod(rhs[i] for i in dn.rhs_spec[2:])
    in_per_group = rhs[dn.rhs_spec[1]]
    # every output element takes spatial * in_per_group multiply-adds, except that an input
    # dilated by s (a transposed convolution) meets a non-zero input in only 1/s of the taps
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2 * math.prod(out) * spatial * in_per_group // dilation


def _dot_flops(eqn) -> int:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, core.Jaxpr):
                yield v


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        else:
            inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "while":  # fori_loop with static bounds: body runs upper - lower
                inner = _while_flops(eqn)
            total += inner
    return total


def _while_flops(eqn) -> int:
    """A ``fori_loop``'s body count times its trip count when the bounds are literals."""
    body = eqn.params["body_jaxpr"].jaxpr
    per_iter = jaxpr_flops(body)
    n_consts = eqn.params["body_nconsts"] + eqn.params["cond_nconsts"]
    args = eqn.invars[n_consts:]
    try:  # (i, upper, ...) literals from fori_loop
        lower, upper = args[0].val, args[1].val
        return per_iter * int(upper - lower)
    except AttributeError:
        return per_iter  # unknown trip count: once


def count_flops(fn: Callable, *args) -> int:
    """FLOPs of one call ``fn(*args)`` (args may be ShapeDtypeStructs). Layers with a
    backend's own faster form (the decoder's sub-pixel up-sampling on a CPU) are counted in
    their canonical one, so the count is the same on every device."""
    with canonical_form():
        return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
