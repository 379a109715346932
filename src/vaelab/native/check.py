"""The check a freshly loaded step.c library must pass before vaelab uses it: every function
against the same arithmetic in PyTorch on small random inputs (float64 references)."""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

B, D, H, N, K = 7, 37, 19, 23, 3  # rows, pixels, encoder width, decoder width, latents
ptr = torch.Tensor.data_ptr


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool(torch.allclose(got.double(), want.double(), rtol=tol, atol=tol))


def failures(lib) -> list[str]:
    """The names of the functions whose results differ from PyTorch's ([] when all agree)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def empty(*shape):  # NaN-filled: a function that writes nothing cannot pass
        return torch.full(shape, math.nan, dtype=torch.float32, device="cpu")

    bad = []
    # the likelihood: clipped at 5, its gradient scaled by 0.5, the bias gradient
    logits, target = rand(B, D, scale=6), torch.rand(B, D, generator=g)
    dl, db, work = empty(B, D), empty(D), empty(D)
    recon = lib.bernoulli_head(ptr(logits), ptr(target), B, D, 5.0, 0.5, ptr(dl), ptr(db), ptr(work))
    clipped = logits.double().clamp(-5.0, 5.0)
    want = torch.where(logits.abs() < 5.0, (torch.sigmoid(clipped) - target.double()) * 0.5, 0.0)
    want_recon = F.binary_cross_entropy_with_logits(clipped, target.double(), reduction="sum").item()
    if abs(recon - want_recon) > 1e-3 or not _close(dl, want) or not _close(db, want.sum(0)):
        bad.append("bernoulli_head")
    # an activation's backward (ReLU) and its column sums
    h, dh = torch.relu(rand(B, H)), rand(B, H)
    want = torch.where(h > 0, dh, 0.0)
    lib.activation_back(ptr(dh), ptr(h), B, H, 0, ptr(db))
    if not _close(dh, want) or not _close(db[:H], want.sum(0)):
        bad.append("activation_back")
    # RMSprop
    p, grad, v = rand(N), rand(N), torch.rand(N, generator=g)
    want_v = 0.9 * v.double() + 0.1 * grad.double() ** 2
    want_p = p.double() - 0.01 * grad.double() / torch.sqrt(want_v + 1e-7)
    lib.rmsprop(ptr(p), ptr(grad), ptr(v), N, 0.01, 0.9, 0.1, 1e-7)
    if not _close(p, want_p) or not _close(v, want_v):
        bad.append("rmsprop")
    # the latent block forward and backward, against the same formulas
    wm, bm, wv, bv = rand(K, H), rand(K), rand(K, H, scale=0.1), rand(K)
    w3, b3, eps = rand(N, K), rand(N), rand(B, K)
    mean, log_var, std, noise, z = empty(5, B, K)
    a, work = empty(B, N), empty(K * N)
    kl = lib.latent_forward(
        ptr(h), B, H, K, ptr(wm), ptr(bm), ptr(wv), ptr(bv), ptr(eps), 1.0, ptr(w3), ptr(b3), N,
        ptr(mean), ptr(log_var), ptr(std), ptr(noise), ptr(z), ptr(a), ptr(work),
    )
    h64 = h.double()
    m64, lv64 = h64 @ wm.double().t() + bm.double(), h64 @ wv.double().t() + bv.double()
    z64 = m64 + (0.5 * lv64).exp() * eps.double()
    want_kl = (-0.5 * (1 + lv64 - m64**2 - lv64.exp())).sum().item()
    if abs(kl - want_kl) > 1e-3 * max(1.0, abs(want_kl)) or not _close(z, z64):
        bad.append("latent_forward")
    if not _close(a, z64 @ w3.double().t() + b3.double()):
        bad.append("latent_forward")
    gact, dg = torch.relu(rand(B, N)), rand(B, N)
    da = torch.where(gact > 0, dg, 0.0).double()
    dz = da @ w3.double()
    s = std.double()
    dmean = dz + 0.3 * mean.double()
    dlv = dz * noise.double() * s / 2 + (s * s - 1) * 0.15
    want_dh = dmean @ wm.double() + dlv @ wv.double()
    dw3, db3, dh = empty(N, K), empty(N), empty(B, H)
    dwm, dbm, dwv, dbv = empty(K, H), empty(K), empty(K, H), empty(K)
    work = empty(2 * K * N + 3 * B * K)
    lib.latent_backward(
        ptr(dg), ptr(gact), B, N, 0, ptr(z), ptr(w3), ptr(dw3), ptr(db3), ptr(mean), ptr(std), ptr(noise),
        K, 0.3, ptr(h), H, ptr(wm), ptr(wv), ptr(dwm), ptr(dbm), ptr(dwv), ptr(dbv), ptr(dh), ptr(work),
    )
    if not (_close(dh, want_dh) and _close(dw3, da.t() @ z.double()) and _close(dwm, dmean.t() @ h64)):
        bad.append("latent_backward")
    # the latent layer alone (wider latent layers)
    kl = lib.reparameterize(ptr(mean), ptr(log_var), ptr(eps), B, K, 1.0, ptr(std), ptr(noise), ptr(z))
    if abs(kl - want_kl) > 1e-3 * max(1.0, abs(want_kl)) or not _close(z, z64):
        bad.append("reparameterize")
    dmean32, dlv32, dz32 = empty(B, K), empty(B, K), dz.float()  # (held: C reads and writes them)
    lib.latent_back(ptr(dz32), ptr(mean), ptr(std), ptr(noise), B, K, 0.3, ptr(dmean32), ptr(dlv32),
                    ptr(dbm), ptr(dbv))
    if not (_close(dmean32, dmean) and _close(dlv32, dlv) and _close(dbm, dmean.sum(0))):
        bad.append("latent_back")
    bad += _sparse_failures(lib, rand, empty, g) + _gather_failures(lib, empty, g)
    return sorted(set(bad + _gemm_failures(lib, rand, empty) + _step_failures(lib, rand, empty, g)))


def _sparse_failures(lib, rand, empty, g: torch.Generator) -> list[str]:
    """`failures` for transpose and the first layer's sparse products: a sparse input's nonzeros
    by rows and by columns, and the products through them."""
    bad = []
    for rows, cols in ((B, N), (2 * H + 2, N)):  # (the second has 8 x 8 blocks and edges)
        src, dst = rand(rows, cols), empty(cols, rows)
        lib.transpose(ptr(src), rows, cols, ptr(dst))
        if not torch.equal(dst, src.t()):
            bad.append("transpose")
    x = torch.where(torch.rand(B, 2 * D, generator=g) < 0.3, torch.rand(B, 2 * D, generator=g), 0.0)
    x[1] = 0.0  # (an empty row)
    wt, bias = rand(2 * D, 2 * H + 50), rand(2 * H + 50)  # (64 + 16 + 8 columns: every tier)
    dense_out = x.double() @ wt.double() + bias.double()
    nnz = int((x != 0).sum())
    row_start, col_start = torch.zeros(B + 1, dtype=torch.int32), torch.zeros(2 * D + 1, dtype=torch.int32)
    cols, rows = torch.zeros(B * 2 * D + 16, dtype=torch.int32), torch.zeros(B * 2 * D, dtype=torch.int32)
    vals, col_vals = empty(B * 2 * D + 16), empty(B * 2 * D)
    if lib.sparse_rows(ptr(x), B, 2 * D, nnz - 1, ptr(row_start), ptr(cols), ptr(vals)) != -1:
        bad.append("sparse_rows")  # (more nonzeros than allowed: -1)
    if lib.sparse_rows(ptr(x), B, 2 * D, B * 2 * D, ptr(row_start), ptr(cols), ptr(vals)) != nnz:
        bad.append("sparse_rows")
    lib.sparse_columns(
        ptr(row_start), ptr(cols), ptr(vals), B, 2 * D, ptr(col_start), ptr(rows), ptr(col_vals)
    )
    out = empty(B, 2 * H + 50)
    lib.sparse_product(ptr(row_start), ptr(cols), ptr(vals), B, ptr(wt), 2 * H + 50, ptr(bias), ptr(out))
    if not _close(out, dense_out):
        bad.append("sparse_product")
    da, out = rand(B, 2 * H + 50), empty(2 * D, 2 * H + 50)  # x' da through the columns
    lib.sparse_product(ptr(col_start), ptr(rows), ptr(col_vals), 2 * D, ptr(da), 2 * H + 50, None, ptr(out))
    if not _close(out, x.double().t() @ da.double()):
        bad.append("sparse_columns")
    return bad


def _gather_failures(lib, empty, g: torch.Generator) -> list[str]:
    """`failures` for the batch gather: rows of grey levels as k / 255, every level, and an index
    out of range refused before anything is written."""
    levels = torch.randperm(4 * 64, generator=g).reshape(4, 64).to(torch.uint8)  # each level once
    idx, out = torch.tensor([2, 0, 2, 3, 1]), empty(5, 64)
    ok = lib.gather_levels(ptr(levels), 4, 64, ptr(idx), 5, ptr(out)) == 0
    ok = ok and torch.equal(out, levels.index_select(0, idx).float().div_(255.0))
    out = empty(5, 64)
    bad_idx = torch.tensor([0, 4, 1, 1, 1])
    refused = lib.gather_levels(ptr(levels), 4, 64, ptr(bad_idx), 5, ptr(out)) == -1
    ok = ok and refused and bool(out.isnan().all())
    return [] if ok else ["gather_levels"]


def _gemm_failures(lib, rand, empty) -> list[str]:
    """`failures` for the dense products: a row-major and a transposed left operand, with and
    without a bias, over rows and columns that fill whole tiles and leave edges (with AVX-512 55
    columns are 32 + 16 + 7 and 23 rows two 10-row tiles and 3; with AVX2, 3 x 16 + 7 and 3 x 6 + 5)."""
    rows, inner, cols = 2 * B + 9, H, 55
    a, w, bias, a_t = rand(rows, inner), rand(inner, cols), rand(cols), rand(inner, rows)
    out, out_t = empty(rows, cols), empty(rows, cols)
    lib.gemm(ptr(a), inner, 1, ptr(w), cols, ptr(bias), ptr(out), rows, inner, cols)
    lib.gemm(ptr(a_t), 1, rows, ptr(w), cols, None, ptr(out_t), rows, inner, cols)  # a_t' w
    ok = _close(out, a.double() @ w.double() + bias.double())
    return [] if ok and _close(out_t, a_t.double().t() @ w.double()) else ["gemm"]


def _step_failures(lib, rand, empty, g: torch.Generator) -> list[str]:
    """`failures` for the whole step (`mlp_step`): a small model of the seed's form on a sparse
    input and on a dense one (the first layer over x's nonzeros, and as dense products), its two
    terms and every gradient against autograd in float64."""
    sparse = torch.where(torch.rand(B, D, generator=g) < 0.2, torch.rand(B, D, generator=g), 0.0)
    target, eps = torch.rand(B, D, generator=g), rand(B, K)
    shapes = [(H, D), (H,), (K, H), (K,), (K, H), (K,), (N, K), (N,), (D, N), (D,)]
    weights = [rand(*shape, scale=0.3) for shape in shapes]
    inputs = (sparse, torch.rand(B, D, generator=g))  # (and a dense one)
    ok = all(_step_agrees(lib, x, target, eps, weights, [empty(*w.shape) for w in weights]) for x in inputs)
    return [] if ok else ["mlp_step"]


def _step_agrees(lib, x, target, eps, weights, grads) -> bool:
    work = torch.empty(lib.mlp_step_bytes(B, D, H, K, N), dtype=torch.uint8)
    pointers = (ctypes.c_void_p * 24)(ptr(x), ptr(target), ptr(eps), *map(ptr, weights + grads), ptr(work))
    terms = (ctypes.c_double * 2)()
    lib.mlp_step(pointers, B, D, H, K, N, 1.0, math.inf, 0.5, 0.25, 0.3, terms)
    w1, b1, wm, bm, wv, bv, w3, b3, w4, b4 = w64 = [w.double().requires_grad_() for w in weights]
    h = torch.relu(x.double() @ w1.t() + b1)
    mean, log_var = h @ wm.t() + bm, h @ wv.t() + bv
    logits = torch.relu((mean + (log_var / 2).exp() * eps.double()) @ w3.t() + b3) @ w4.t() + b4
    recon = F.binary_cross_entropy_with_logits(logits, target.double(), reduction="sum")
    kl = (-0.5 * (1 + log_var - mean**2 - log_var.exp())).sum()
    (0.5 * recon + 0.25 * kl).backward()
    ok = abs(terms[0] - recon.item()) < 1e-3 and abs(terms[1] - kl.item()) < 1e-3
    return ok and all(_close(got, w.grad) for got, w in zip(grads, w64, strict=True))
