"""Decompositions that span a group of targets: one right factor shared by several matrices.

Basis Sharing (and other methods of the 2025 generation) factorize the
stacked ``[W_1; ..; W_g] S`` of g matrices jointly. A method says which
targets go together (:meth:`bench.api.method.Method.groups`) and returns one
:class:`~bench.api.lowrank.Factorization` per member from
``decompose_group``: member i holds its rows of ``U`` and the group's ``s``
and ``V^T S^-1``, so ``W_i ~= U_i[:, :r] diag(s[:r]) V^T[:r]`` and every
member's ``W_v`` at rank r is the same matrix. The fact :data:`SHARED` names
the group (it travels through the factor store with the other facts); the
engine gives all members one rank, counts the shared factor once and builds
one ``n -> r`` linear used by every member (:mod:`bench.engine.grouped`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.api.allocation import MatrixCost
from bench.api.lowrank import Factorization, RightTransform, factorize
from bench.model.targets import Target

SHARED = "shared_basis"  # fact: the key of the group whose right factor this factorization shares
ROWS = "shared_rows"  # fact: the rows of the group's stacked matrix (sum of the members' m)


def shared_key(factorization: Factorization) -> str | None:
    """The group a factorization shares its right factor with, or ``None`` for a private one."""
    return factorization.facts.get(SHARED)


def group_key(targets: Sequence[Target]) -> str:
    """The name of a group: its members' names joined (stable, readable in results.json)."""
    return "|".join(t.name for t in targets)


def group_cost(targets: Sequence[Target]) -> MatrixCost:
    """What a group sharing one basis holds per rank (``n + sum m``) and dense (``sum m n``)."""
    n = targets[0].in_features
    if any(t.in_features != n for t in targets):
        raise ValueError(f"members of a shared group must have the same input size: {group_key(targets)}")
    return MatrixCost(n + sum(t.out_features for t in targets), sum(t.out_features * n for t in targets))


def share_factorization(targets: Sequence[Target], weights: Sequence[torch.Tensor],
                        transform: RightTransform) -> dict[str, Factorization]:
    """``SVD([W_1; ..; W_g] S)`` split into one factorization per member (float64, see the module docstring)."""
    stacked = torch.cat([w.detach().to(torch.float64) for w in weights])
    joint = factorize(stacked, transform)
    del stacked
    key, rows, out, start = group_key(targets), sum(w.shape[0] for w in weights), {}, 0
    for target, weight in zip(targets, weights):
        stop = start + weight.shape[0]
        out[target.name] = Factorization(joint.u[start:stop].clone(), joint.s, joint.vt,
                                         facts={SHARED: key, ROWS: rows})
        start = stop
    return out
