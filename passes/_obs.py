"""Optimal brain surgeon numerics shared by the pruning and quantization passes (SparseGPT, GPTQ):
the inverse-Hessian factor, the column sweep that spreads each replaced column's error over the
columns not yet visited, OBS saliencies, and a layer's output error from its Hessian."""

from __future__ import annotations

import torch


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01):
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, and the dead-input mask
    (inputs never seen in calibration). U[j, j]^2 is the OBS denominator of input j when the
    inputs are removed in order (GPTQ, SparseGPT)."""
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    return U.float(), dead


def obs_sweep(
    weight: torch.Tensor, U: torch.Tensor, target, block: int = 128, group: int = 1
) -> torch.Tensor:
    """Replace the columns of ``weight`` one by one, left to right, by ``target(col, W1, i)`` (the
    new value of column ``col`` = ``W1[:, i]`` of the current block ``W1``, whose later columns
    already carry the updates) and spread each column's error over the columns not yet visited,
    weighted by the inverse Hessian factor ``U`` (optimal brain surgeon updates, lazily batched in
    blocks as in GPTQ). Returns the updated weight."""
    out, inp = weight.shape
    W = weight.float().clone()
    block = max(group, block - block % group)  # blocks never split a group
    for i1 in range(0, inp, block):
        i2 = min(i1 + block, inp)
        W1, E1, H1 = W[:, i1:i2].clone(), torch.zeros(out, i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            new = target(i1 + i, W1, i)
            err = (W1[:, i] - new) / H1[i, i]
            W1[:, i:] -= err[:, None] * H1[i, i:][None, :]
            W1[:, i] = new
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W


def obs_scores(
    weight: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, group: int
) -> torch.Tensor:
    """(out, in/g) OBS group saliencies sum_j W[r, j]^2 / U[j, j]^2 (inputs never seen count 0)."""
    s = weight.float() ** 2 / torch.diag(U)[None, :] ** 2
    s[:, dead] = 0
    out, inp = s.shape
    return s.view(out, inp // group, group).sum(-1)


def obs_prune(
    weight: torch.Tensor, U_dead: tuple, mask: torch.Tensor, group: int, block: int = 128
) -> torch.Tensor:
    """Zero the groups ``mask`` drops and compensate in the kept weights (OBS sweep)."""
    U, dead = U_dead
    keep = mask.repeat_interleave(group, dim=1)
    w = weight.float().clone()
    w[:, dead] = 0
    out = obs_sweep(w, U, lambda col, W1, i: W1[:, i] * keep[:, col], block, group)
    return (out * keep).to(weight.dtype)


def layer_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error of a layer on its calibration inputs, from H = X^T X:
    tr(dW H dW^T) / tr(W H W^T)."""
    d = (pruned.float() - weight.float()).double()
    w = weight.double()
    H = hessian.double()
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum().clamp_min(1e-30))
