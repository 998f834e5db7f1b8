"""PSA's random walk: propagate CAM scores with the AffinityNet transition matrix.

Conventions (PSA's, kept exactly):

* ``A`` is the ``n x n`` affinity matrix of one ``h x w`` feature map (pixels row-major,
  ``n = h*w``): ``A[i, j] = A[j, i] = aff_p`` for each pair ``p = (from_idx[p], to_idx[p])``,
  ``A[i, i] = 1``, zero elsewhere; then raised elementwise to ``beta``.
* ``T = A^beta / sum_i A^beta[i, :]``: **column**-normalised, every column sums to 1
  (PSA: ``aff / torch.sum(aff, dim=0, keepdim=True)``).
* Scores are a ``(K, n)`` matrix ``X`` (row-major pixels) multiplied on the **right**:
  ``result = X @ T^steps`` (PSA: ``torch.matmul(cam_vec, trans_mat)`` after squaring ``trans_mat``
  ``log2(steps)`` times), so pixel ``j``'s new score is a weighted mean of its neighbours' scores
  with weights ``T[:, j]``.

The fast path applies ``T^T`` (row-stochastic, CSR) ``steps`` times to the ``(n, K)`` matrix
``X^T`` with a sparse-dense matmul: ``O(steps * nnz * K)`` instead of PSA's ``O(log2(steps) * n^3)``.
:func:`transition_matrix` returns ``T`` in sparse **CSC** layout, whose arrays are exactly the CSR
arrays of ``T^T``, so no transpose is ever materialised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from caee.core.errors import CaeeError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_sparse() -> Iterator[None]:
    """torch warns that compressed sparse layouts are beta; they are used here only as documented."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse (CSR|CSC|BSR|BSC|compressed) tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks are implicitly disabled.*")
        yield


def _check_pairs(from_idx: torch.Tensor, to_idx: torch.Tensor, n: int) -> None:
    if from_idx.shape != to_idx.shape or from_idx.dim() != 1:
        raise CaeeError(f"from_idx and to_idx must be (P,) of equal length, got {tuple(from_idx.shape)} "
                        f"and {tuple(to_idx.shape)}")
    if from_idx.numel() and int(torch.maximum(from_idx.max(), to_idx.max())) >= n:
        raise CaeeError(f"pair indices reach {int(torch.maximum(from_idx.max(), to_idx.max()))} but the "
                        f"feature map has only n={n} pixels; build the pairs with caee.method.affinity.pair_indices "
                        "for the same h x w as the affinity features")


@dataclasses.dataclass(frozen=True)
class TransitionPattern:
    """The sparsity structure of ``T`` for one pair set and batch size: the same for every image
    of a grid size, so it is computed once (the sort is most of building ``T``).

    cols: the column of each of the ``2P + n`` (per image) entries before sorting; order: their
    CSC order; ccol, row_sorted: the CSC index arrays.
    """
    n: int
    batch: int
    cols: torch.Tensor
    order: torch.Tensor
    ccol: torch.Tensor
    row_sorted: torch.Tensor


def transition_pattern(from_idx: torch.Tensor, to_idx: torch.Tensor, n: int, batch: int = 1,
                       device: torch.device | str | None = None) -> TransitionPattern:
    """The :class:`TransitionPattern` of :func:`transition_matrix` for ``batch`` images."""
    _check_pairs(from_idx, to_idx, n)
    dev = torch.device(device) if device is not None else from_idx.device
    big_n = batch * n
    shift = (torch.arange(batch, device=dev) * n).view(batch, 1)
    f = (from_idx.to(dev).view(1, -1) + shift).reshape(-1)
    t = (to_idx.to(dev).view(1, -1) + shift).reshape(-1)
    diag = torch.arange(big_n, device=dev)
    rows = torch.cat([f, t, diag])
    cols = torch.cat([t, f, diag])
    order = torch.argsort(cols * big_n + rows)
    ccol = torch.zeros(big_n + 1, dtype=torch.long, device=dev)
    ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=big_n), 0)
    # int32 indices: the CPU sparse kernels (MKL) take them natively, measured ~30% faster per step
    idx_dtype = torch.int32 if rows.numel() < 2**31 else torch.long
    return TransitionPattern(n, batch, cols, order, ccol.to(idx_dtype), rows[order].to(idx_dtype))


def transition_matrix(aff: torch.Tensor, from_idx: torch.Tensor, to_idx: torch.Tensor, n: int,
                      beta: float = 8.0, pattern: TransitionPattern | None = None) -> torch.Tensor:
    """Column-normalised transition matrix ``T`` (see the module docstring), sparse CSC.

    aff: ``(P,)`` affinities of the pairs ``(from_idx[p], to_idx[p])`` (``(P,) long`` flat indices
    into ``n = h*w``; pairs must be unique and non-self, as :func:`caee.method.affinity.pair_indices`
    makes them), or ``(B, P)`` for B images sharing the pair set: then ``T`` is the
    block-diagonal ``(B*n, B*n)`` matrix whose b-th block belongs to image b. pattern: the
    :func:`transition_pattern` of these pairs (computed here when None; pass a cached one).
    Returns ``T`` of shape ``(n, n)`` / ``(B*n, B*n)``, dtype and device of ``aff``,
    with ``T.to_dense().sum(0) == 1``.
    """
    aff2 = aff.unsqueeze(0) if aff.dim() == 1 else aff
    if aff2.dim() != 2 or aff2.shape[1] != from_idx.numel():
        raise CaeeError(f"aff must be (P,) or (B, P) with P={from_idx.numel()}, got {tuple(aff.shape)}")
    dev, nb = aff2.device, aff2.shape[0]
    if pattern is None:
        pattern = transition_pattern(from_idx, to_idx, n, nb, dev)
    elif (pattern.n, pattern.batch) != (n, nb):
        raise CaeeError(f"transition pattern for {pattern.batch} x {pattern.n} pixels used for {nb} x {n}")
    big_n = nb * n
    vals = aff2.reshape(-1).pow(beta)
    vals = torch.cat([vals, vals, torch.ones(big_n, dtype=vals.dtype, device=dev)])
    colsum = torch.zeros(big_n, dtype=vals.dtype, device=dev).index_add_(0, pattern.cols, vals)
    vals = vals / colsum[pattern.cols]
    with _quiet_sparse():
        return torch.sparse_csc_tensor(pattern.ccol, pattern.row_sorted, vals[pattern.order],
                                       size=(big_n, big_n), check_invariants=False)


def _transposed_csr(T: torch.Tensor) -> torch.Tensor:
    """``T^T`` in CSR layout; free for CSC input (same arrays), converted otherwise."""
    with _quiet_sparse():
        if T.layout == torch.sparse_csc:
            return torch.sparse_csr_tensor(T.ccol_indices(), T.row_indices(), T.values(),
                                           size=(T.shape[1], T.shape[0]), check_invariants=False)
        if T.layout == torch.strided:
            return T.t().to_sparse_csr()
        return T.to_sparse_coo().t().coalesce().to_sparse_csr()


def random_walk(scores: torch.Tensor, T: torch.Tensor, steps: int = 256, squarings: int = 0) -> torch.Tensor:
    """``X @ T^steps`` for the score maps, by ``steps`` sparse matmuls (no dense ``n x n`` matrix).

    scores: ``(K, h, w)`` with ``T`` ``(h*w, h*w)``, or ``(B, K, h, w)`` with the block-diagonal
    ``(B*h*w, B*h*w)`` ``T`` of :func:`transition_matrix` for batched affinities. ``T`` is best given
    in CSC layout (as returned); CSR, COO or dense are converted. Runs on ``T``'s device in the
    promoted dtype of scores and ``T``. squarings: apply ``T^(2^s)`` ``steps / 2^s`` times instead
    (``steps`` must then be divisible by ``2^s``). Measured at VOC size (63 x 63, 21 channels,
    t = 256, ``bench/bench_random_walk.py``): on CPU 0 is fastest (33 ms vs 79 ms with one
    squaring, 16 threads; fill-in grows the work faster than it cuts the number of products); on
    an H100 one squaring is slightly faster (8 vs 12 ms, launch-bound) but takes 350 MiB, and
    batching images block-diagonally helps more (3.3 ms per image for 8).
    Returns scores of the input's shape.
    """
    batched = scores.dim() == 4
    if scores.dim() not in (3, 4):
        raise CaeeError(f"random_walk expects (K, h, w) or (B, K, h, w) scores, got {tuple(scores.shape)}")
    s4 = scores if batched else scores.unsqueeze(0)
    nb, k, h, w = s4.shape
    if T.shape != (nb * h * w, nb * h * w):
        raise CaeeError(f"transition matrix of shape {tuple(T.shape)} does not fit {nb} score map(s) of "
                        f"{h} x {w}; compute the affinity on the same feature grid as the scores")
    if steps % (1 << squarings):
        raise CaeeError(f"random walk steps={steps} is not divisible by 2^squarings={1 << squarings}")
    dtype = torch.promote_types(scores.dtype, T.dtype)
    S = _transposed_csr(T.to(dtype))
    with _quiet_sparse():
        for _ in range(squarings):
            S = S @ S
    x = s4.to(device=S.device, dtype=dtype).permute(0, 2, 3, 1).reshape(nb * h * w, k).contiguous()
    for _ in range(steps >> squarings):
        x = S @ x
    out = x.reshape(nb, h, w, k).permute(0, 3, 1, 2).contiguous()
    return out if batched else out[0]


def dense_random_walk_reference(scores: torch.Tensor, aff: torch.Tensor, from_idx: torch.Tensor,
                                to_idx: torch.Tensor, beta: float = 8.0, steps: int = 256) -> torch.Tensor:
    """PSA's dense formulation, for tests and benchmarks: dense ``A^beta``, column-normalise,
    square ``log2(steps)`` times, ``X @ T``.

    scores: ``(K, h, w)``; aff: ``(P,)``; steps: a power of two. Returns ``(K, h, w)``.
    Memory ``O((h*w)^2)``, time ``O(log2(steps) * (h*w)^3)``.
    """
    k, h, w = scores.shape
    n = h * w
    _check_pairs(from_idx, to_idx, n)
    if steps < 1 or steps & (steps - 1):
        raise CaeeError(f"the dense random walk squares the matrix, so steps must be a power of two, got {steps}")
    dtype = torch.promote_types(scores.dtype, aff.dtype)
    dev = aff.device
    a = torch.zeros(n, n, dtype=dtype, device=dev)
    f, t = from_idx.to(dev), to_idx.to(dev)
    a[f, t] = aff.to(dtype)
    a[t, f] = aff.to(dtype)
    a.fill_diagonal_(1.0)
    a = a.pow(beta)
    trans = a / a.sum(dim=0, keepdim=True)
    for _ in range(int(math.log2(steps))):
        trans = trans @ trans
    return (scores.to(device=dev, dtype=dtype).reshape(k, n) @ trans).reshape(k, h, w)


def cam_scores_with_background(cams: torch.Tensor, alpha: float, stride: int = 8) -> torch.Tensor:
    """Background channel + CAMs, average-pooled to the feature grid.

    cams: ``(K, H, W)`` in ``[0, 1]`` (K may be 0). Channel 0 is ``(1 - max_k cams)^alpha``
    (the max clamped to ``[0, 1]`` so the power is defined), channels 1..K the CAMs. The maps are
    zero-padded at the bottom and right to a multiple of ``stride`` and average-pooled with
    ``stride x stride`` cells, padded zeros counting in the mean (PSA pads its image and CAMs the
    same way), giving ``h = ceil(H/stride)``, ``w = ceil(W/stride)``, the size of a stride-8
    feature map of the padded image. Returns ``(K+1, h, w)``.
    """
    if cams.dim() != 3:
        raise CaeeError(f"cams must be (K, H, W), got shape {tuple(cams.shape)}")
    _, hh, ww = cams.shape
    cams = cams.float() if not cams.is_floating_point() or cams.dtype == torch.float16 else cams
    fg_max = cams.amax(0) if cams.shape[0] else torch.zeros(hh, ww, dtype=cams.dtype, device=cams.device)
    bg = (1.0 - fg_max.clamp(0.0, 1.0)).pow(alpha)
    full = torch.cat([bg.unsqueeze(0), cams], 0)
    full = F.pad(full, (0, -ww % stride, 0, -hh % stride))
    return F.avg_pool2d(full.unsqueeze(0), stride, stride)[0]
