"""The fused MLP step in native code (step.c).

`NativeMLPStep` is `vaelab.fused.FusedMLPStep` with, in place of the roughly 45 small PyTorch
operations between its large products, a few calls into step.c: the Bernoulli likelihood and its
gradient in one pass, each activation's backward pass with its bias gradient in one pass, and,
when the latent layer is narrow (the seed's 2 units), the encoder's heads, the reparameterization,
the KL and the decoder's first product in one call each way. The large products go to step.c's
`gemm` where the library has its tiles (AVX-512, or AVX2 with FMA; else to oneDNN, as in
FusedMLPStep), and a model of the seed's form (one hidden ReLU layer each way) takes the whole
step, forward and backward, as one call (`mlp_step`: the same arithmetic in the same order, so
bit-identical wherever the call-by-call path's products are large enough for `gemm` too, as the
seed's are; smaller ones go to MKL there). It computes the same gradients as the PyTorch path
to float32's rounding (tests/test_native.py, also against autograd in float64). The PyTorch path
stays the reference and the fallback: `make_step` gives this step only where
`vaelab.native.library()` built and checked the library.
"""

from __future__ import annotations

import ctypes
import math
from collections import namedtuple
from typing import NamedTuple

import torch

from vaelab import native
from vaelab.fused import FusedMLPStep, _activate_
from vaelab.models import VAE
from vaelab.products import ONEDNN_MIN_MACS, linear, linear_into, uses_onednn

_ACTIVATION_CODES = {"relu": 0, "tanh": 1, "elu": 2}  # step.c's activation_back
# the widest latent layer whose small products step.c's loops compute (wider ones go to MKL)
NATIVE_LATENT_MAX = 8
# the largest share of nonzero inputs at which the first layer's products skip the zeros: MNIST's
# batches of 100 have 0.175-0.212 (binarized, less), Fashion-MNIST's 0.45-0.55; at the seed's
# shapes the two ways cost the same near 0.4 on two threads and 0.45 on one (measured on a Zen 4
# EPYC, docs/decisions.md), so this leaves a margin
SPARSE_MAX_DENSITY = 0.3


def _empty(*shape: int) -> torch.Tensor:
    """A float32 CPU buffer for step.c to write (whatever torch's defaults are)."""
    return torch.empty(shape, dtype=torch.float32, device="cpu")


class _Forward(NamedTuple):
    hs: list[torch.Tensor]  # the input, then each encoder layer's output
    gs: list[torch.Tensor]  # z, then each decoder hidden layer's output
    mean: torch.Tensor
    std: torch.Tensor
    noise: torch.Tensor  # eps * epsilon_std
    logits: torch.Tensor
    kl: float  # the batch's summed KL, nats
    block: bool  # whether step.c's latent block ran (the decoder's first product included)
    sparse: _Sparse | None  # the input's nonzeros, where the first layer skipped its zeros


class _Sparse(NamedTuple):
    """A batch's nonzero inputs, row by row (step.c's sparse_rows)."""

    row_start: torch.Tensor  # (B + 1,) int32
    cols: torch.Tensor  # (at least nnz,) int32
    vals: torch.Tensor  # (at least nnz,) float32
    nnz: int


# where the latent block's weights and gradients are (views into the flat buffers): the encoder's
# heads (m, v) and the decoder's first layer (3), as step.c's calls take them
_BlockWeights = namedtuple("_BlockWeights", "wm bm wv bv w3 b3 dwm dbm dwv dbv dw3 db3")
_POINTERS = ctypes.c_void_p * 24  # mlp_step's pointers (step.c's enum: inputs, weights, gradients, workspace)


class NativeMLPStep(FusedMLPStep):
    """`FusedMLPStep` (uncompiled, float32 on a CPU) with step.c doing the work between the large
    products, the large products too where it has tiles for them (`tiled`), and the seed's form
    of model's whole step in one call (`whole`); also the test pass's forward (`loss_sums`)."""

    def __init__(self, model: VAE):
        super().__init__(model)
        self.native = native.library()
        if self.native is None:
            raise RuntimeError(f"vaelab.native: {native.reason()}")
        self._attach()

    def helper_thread(self, on: bool) -> bool:
        """On one thread under load: the whole step's output-layer weight gradient shared with a
        helper thread while this one goes on (`native.helper_thread`); returns whether it is on."""
        return native.helper_thread(on and self.whole)

    # a ctypes library cannot be copied or pickled: a copy of the step loads it again (and looks
    # up its own weights' addresses)
    def __getstate__(self):
        skip = ("native", "_pass", "_block", "_pointers", "_work")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._attach()

    def _attach(self) -> None:
        """The library and what it allows: on creation, and again in a copy (without the library
        there, the copy takes the PyTorch path)."""
        self.native = native.library()
        ok = self.native is not None
        self._pass = self._native_forward_backward if ok else self._forward_backward
        self.tiled = ok and bool(self.native.gemm_tiled())  # the large products in step.c too
        self.whole = ok and self._whole_fits()  # the whole step in one call (step.c's mlp_step)

    def _fits(self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor) -> bool:
        """Whether step.c can take these inputs as they are: float32 CPU tensors, x and target
        (B, D) with D the model's input width, eps (B, K). Anything else (eps broadcast from one
        row, say, or a wrong width, which PyTorch's path refuses) takes the PyTorch path."""
        rows, k = x.shape[0], self.model.encoder.z_mean.weight.shape[0]
        return (
            x.dim() == 2
            and x.shape[1] == self.encoder[0].weight.shape[1]
            and x.shape == target.shape
            and eps.shape == (rows, k)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, target, eps))
        )

    @staticmethod
    def usable(model: VAE) -> bool:
        """Whether this step can train `model`: float32 weights on the CPU, the library at hand."""
        weight = next(model.parameters())
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and native.library() is not None

    def _block_weights(self) -> _BlockWeights:
        """The latent block's addresses (`_by_buffers`)."""
        layers = (self.model.encoder.z_mean, self.model.encoder.z_log_var, self.decoder[0])
        return self._by_buffers("_block", lambda: _BlockWeights(*self._addresses(*layers)))

    def _by_buffers(self, name: str, build):
        """build()'s result (addresses of the weights and gradients), kept as self.<name> until the
        flat buffers move (the views into them stay put: `_check_views` refuses a step whose views
        were replaced)."""
        key = (self.flat.data_ptr(), self.flat.grad.data_ptr())
        kept = self.__dict__.get(name)
        if kept is None or kept[0] != key:
            kept = self.__dict__[name] = (key, build())
        return kept[1]

    @staticmethod
    def _addresses(*layers: torch.nn.Linear) -> list[int]:
        """The layers' weights' and biases' addresses, then their gradients', in that order (as
        step.c's calls take them)."""
        params = [t for lin in layers for t in (lin.weight, lin.bias)]
        return [t.data_ptr() for t in params] + [t.grad.data_ptr() for t in params]

    def _transposed(self, m: torch.Tensor) -> torch.Tensor:
        """A contiguous m' (m contiguous, 2-D), by step.c's `transpose`."""
        out = _empty(m.shape[1], m.shape[0])
        self.native.transpose(m.data_ptr(), m.shape[0], m.shape[1], out.data_ptr())
        return out

    def _forward(self, x: torch.Tensor, eps: torch.Tensor) -> _Forward:
        """The forward pass, keeping what the backward pass needs."""
        lib, act, enc = self.native, self.activation, self.model.encoder
        p = torch.Tensor.data_ptr
        rows, k = x.shape[0], enc.z_mean.weight.shape[0]
        block = k <= NATIVE_LATENT_MAX and len(self.decoder) > 0  # the latent block in step.c
        hs = [x]  # (B, D), then (B, hidden_i)
        sparse = self._nonzeros(x) if self.encoder else None
        if sparse is not None:  # the first layer over x's nonzeros only
            hs.append(_activate_(self._sparse_first_layer(sparse, rows), act))
        for lin in self.encoder[len(hs) - 1 :]:
            hs.append(_activate_(self._linear(hs[-1], lin.weight, lin.bias), act))
        h = hs[-1]
        mean, log_var, std, noise, z = _empty(5, rows, k)
        if block:  # the heads, the latent layer and the decoder's first product, in one call
            w, width = self._block_weights(), self.decoder[0].weight.shape[0]
            a, work = _empty(rows, width), _empty(k * width)  # (held: C writes them)
            kl = lib.latent_forward(
                p(h), rows, h.shape[1], k, w.wm, w.bm, w.wv, w.bv, p(eps), self.epsilon_std, w.w3,
                w.b3, width, p(mean), p(log_var), p(std), p(noise), p(z), p(a), p(work),
            )
            gs = [z, _activate_(a, act)]
        else:
            torch.addmm(enc.z_mean.bias, h, enc.z_mean.weight.t(), out=mean)  # (B, K)
            torch.addmm(enc.z_log_var.bias, h, enc.z_log_var.weight.t(), out=log_var)
            kl = lib.reparameterize(
                p(mean), p(log_var), p(eps), rows, k, self.epsilon_std, p(std), p(noise), p(z)
            )
            gs = [z]
        for lin in self.decoder[len(gs) - 1 :]:
            gs.append(_activate_(self._linear(gs[-1], lin.weight, lin.bias), act))
        logits = self._linear(gs[-1], self.model.decoder.out.weight, self.model.decoder.out.bias)  # (B, D)
        return _Forward(hs, gs, mean, std, noise, logits, kl, block, sparse)

    def _nonzeros(self, x: torch.Tensor, density: float = SPARSE_MAX_DENSITY) -> _Sparse | None:
        """x's nonzeros row by row, where they are at most `density` of x (else None: the
        products stay dense). step.c stops counting once there are more."""
        rows, d = x.shape
        if rows * d + 16 >= 2**31:  # (step.c counts them in 32 bits)
            return None
        row_start = torch.empty(rows + 1, dtype=torch.int32)
        cols, vals = torch.empty(rows * d + 16, dtype=torch.int32), _empty(rows * d + 16)
        limit = int(density * rows * d)
        p = torch.Tensor.data_ptr
        nnz = self.native.sparse_rows(p(x), rows, d, limit, p(row_start), p(cols), p(vals))
        return _Sparse(row_start, cols, vals, nnz) if nnz >= 0 else None

    def _likelihood(self, f: _Forward, target: torch.Tensor, scale: float, db: torch.Tensor):
        """The summed Bernoulli negative log-likelihood (nats), its gradient at the logits (scaled)
        and that gradient's column sums into db."""
        p, d = torch.Tensor.data_ptr, f.logits.shape[1]
        dl, work = torch.empty_like(f.logits), _empty(d)
        bound = math.inf if self.bound is None else self.bound
        recon = self.native.bernoulli_head(
            p(f.logits), p(target), f.logits.shape[0], d, bound, scale, p(dl), p(db), p(work)
        )
        return recon, dl

    @torch.no_grad()
    def _native_forward_backward(
        self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, beta: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_forward_backward`'s arithmetic with the work between the large products in step.c
        (vaelab.native): the large products in step.c's `gemm` where it has tiles, else as
        before; the elementwise work, and with a narrow latent layer its small products too, as a
        few native calls in place of about 45 operations; all of it one call where `whole`."""
        if not self._fits(x, target, eps):
            return self._forward_backward(x, target, eps, beta, scale)
        x, target, eps = x.contiguous(), target.contiguous(), eps.contiguous()
        if self.whole:
            return self._whole_step(x, target, eps, beta, scale)
        lib, code, dec = self.native, _ACTIVATION_CODES[self.activation], self.model.decoder
        p = torch.Tensor.data_ptr
        f = self._forward(x, eps)
        hs, gs, rows = f.hs, f.gs, x.shape[0]

        # the likelihood, its gradient and back through the decoder
        recon, dl = self._likelihood(f, target, scale, dec.out.bias.grad)
        self._weight_grad(dec.out.weight.grad, dl, gs[-1])  # dl' g
        dh = self._linear(dl, dec.out.weight.t())  # dl W
        for i in reversed(range(1 if f.block else 0, len(self.decoder))):
            lin = self.decoder[i]
            lib.activation_back(p(dh), p(gs[i + 1]), rows, dh.shape[1], code, p(lin.bias.grad))
            self._weight_grad(lin.weight.grad, dh, gs[i], relu=code == 0)
            dh = self._linear(dh, lin.weight.t())
        dh = self._latent_backward(f, dh, scale * beta)

        # back through the encoder (no gradient for the input itself)
        for i in reversed(range(len(self.encoder))):
            lin = self.encoder[i]
            lib.activation_back(p(dh), p(hs[i + 1]), rows, dh.shape[1], code, p(lin.bias.grad))
            sparse_x = f.sparse if i == 0 else None
            self._weight_grad(lin.weight.grad, dh, hs[i], relu=code == 0, sparse_x=sparse_x)
            if i > 0:
                dh = self._linear(dh, lin.weight.t())
        return torch.tensor((recon + beta * f.kl, recon, f.kl)).unbind(0)

    def _latent_backward(self, f: _Forward, dh: torch.Tensor, kl_scale: float) -> torch.Tensor:
        """From the gradient at the decoder's first input (z; with the latent block, at its first
        layer's output) through the reparameterization and the KL to the encoder's last output:
        the heads' gradients (and the decoder's first layer's), and the gradient there."""
        lib, enc, p = self.native, self.model.encoder, torch.Tensor.data_ptr
        h, (rows, k) = f.hs[-1], f.mean.shape
        if f.block:
            w, width = self._block_weights(), dh.shape[1]
            dg, dh, work = dh, torch.empty_like(h), _empty(2 * k * width + 3 * rows * k)
            lib.latent_backward(
                p(dg), p(f.gs[1]), rows, width, _ACTIVATION_CODES[self.activation], p(f.gs[0]),
                w.w3, w.dw3, w.db3, p(f.mean), p(f.std), p(f.noise), k, kl_scale, p(h), h.shape[1],
                w.wm, w.wv, w.dwm, w.dbm, w.dwv, w.dbv, p(dh), p(work),
            )
            return dh
        dmean, dlog_var = _empty(2, rows, k)
        dz = dh.contiguous()
        lib.latent_back(
            p(dz), p(f.mean), p(f.std), p(f.noise), rows, k, kl_scale, p(dmean), p(dlog_var),
            p(enc.z_mean.bias.grad), p(enc.z_log_var.bias.grad),
        )
        torch.mm(dmean.t(), h, out=enc.z_mean.weight.grad)
        torch.mm(dlog_var.t(), h, out=enc.z_log_var.weight.grad)
        return torch.mm(dmean, enc.z_mean.weight).addmm_(dlog_var, enc.z_log_var.weight)

    @torch.no_grad()
    def loss_sums(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[float, float]:
        """The batch's summed reconstruction loss and KL (nats, floats), forward only, as
        `model.terms` gives them with x as its own target: the test pass's arithmetic (the
        model's gradients are not touched)."""
        if not self._fits(x, x, eps):
            terms = self.model.terms(x, x, eps)
            return -terms.log_px_given_z.sum().item(), terms.kl.sum().item()
        x, eps = x.contiguous(), eps.contiguous()
        f = self._forward(x, eps)
        recon, _ = self._likelihood(f, x, 0.0, _empty(f.logits.shape[1]))
        return recon, f.kl

    def _sparse_first_layer(self, x: _Sparse, rows: int) -> torch.Tensor:
        """x W' + b for the first layer, over x's nonzeros (before the activation)."""
        lib, p, lin = self.native, torch.Tensor.data_ptr, self.encoder[0]
        width = lin.weight.shape[0]
        wt, a = self._transposed(lin.weight), _empty(rows, width)  # W', and the result
        lib.sparse_product(p(x.row_start), p(x.cols), p(x.vals), rows, p(wt), width, p(lin.bias), p(a))
        return a

    def _sparse_weight_grad(self, out: torch.Tensor, dy: torch.Tensor, x: _Sparse, d: int) -> None:
        """out = dy' x for the first layer, over x's nonzeros: (x' dy)' by x's columns."""
        lib, p = self.native, torch.Tensor.data_ptr
        rows, width = dy.shape
        col_start = torch.empty(d + 1, dtype=torch.int32)
        by_rows, col_vals = torch.empty_like(x.cols), torch.empty_like(x.vals)
        lib.sparse_columns(
            p(x.row_start), p(x.cols), p(x.vals), rows, d, p(col_start), p(by_rows), p(col_vals)
        )
        dwt = _empty(d, width)  # x' dy
        lib.sparse_product(p(col_start), p(by_rows), p(col_vals), d, p(dy), width, None, p(dwt))
        lib.transpose(p(dwt), d, width, p(out))

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x @ weight.T (+ bias), into `out` (contiguous) where given: a large product in step.c's
        `gemm` where this build has its tiles (x read in place through its strides, weight.T
        copied once where it is not row-major), else through `vaelab.products` as before."""
        (rows, inner), cols = x.shape, weight.shape[0]
        assert weight.shape[1] == inner and (bias is None or out is None), "vaelab: a product's shapes"
        if not self.tiled or rows * inner * cols < ONEDNN_MIN_MACS:
            return linear(x, weight, bias) if out is None else linear_into(out, x, weight)
        lib, p = self.native, torch.Tensor.data_ptr
        b = weight.t()  # (inner, cols)
        if b.stride(1) != 1:  # (a layer's own weight, (cols, inner))
            b = self._transposed(weight)
        out = _empty(rows, cols) if out is None else out
        lib.gemm(
            p(x), x.stride(0), x.stride(1), p(b), b.stride(0), None if bias is None else p(bias), p(out),
            rows, inner, cols,
        )
        return out

    def _weight_grad(
        self, out: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, relu: bool = False,
        sparse_x: _Sparse | None = None,
    ) -> None:
        """out = dy' x, a layer's weight gradient, over the sparser of dy and x where one is
        sparse: behind a ReLU, dy is zero wherever the layer's output is (the seed's first layer:
        about 88 % of dy, against 81 % of an MNIST batch), and then dy' x is taken row by row of
        dy' over its nonzeros, in out's own layout. Else over x's nonzeros where the forward pass
        listed them, else dense: step.c's `gemm` reads dy' in place; oneDNN wants it contiguous,
        and PyTorch's copy of a transposed view takes about 5x as long as step.c's `transpose` (a
        seed batch's 100 x 784: 56 us against 10)."""
        lib, p = self.native, torch.Tensor.data_ptr
        (rows, width), d = dy.shape, x.shape[1]
        dy_t = None
        if relu:  # as sparse as x at most: the same terms in fewer products, and no transposes
            dy_t = self._transposed(dy)
            x_density = 1.0 if sparse_x is None else sparse_x.nnz / (rows * d)
            by_unit = self._nonzeros(dy_t, min(SPARSE_MAX_DENSITY, x_density))
            if by_unit is not None:
                lib.sparse_product(
                    p(by_unit.row_start), p(by_unit.cols), p(by_unit.vals), width, p(x.contiguous()),
                    d, None, p(out),
                )
                return
        if sparse_x is not None:
            self._sparse_weight_grad(out, dy, sparse_x, d)
        elif self.tiled or not uses_onednn(dy.t(), x.t()):
            self._linear(dy.t(), x.t(), out=out)
        else:
            linear_into(out, self._transposed(dy) if dy_t is None else dy_t, x.t())

    def _whole_fits(self) -> bool:
        """Whether step.c's `mlp_step` can take this model whole: the seed's form, one hidden ReLU
        layer each way around a latent layer of at most NATIVE_LATENT_MAX units, and a library with
        the products' tiles."""
        k = self.model.encoder.z_mean.weight.shape[0]
        one_each = len(self.encoder) == 1 and len(self.decoder) == 1
        return self.tiled and one_each and self.activation == "relu" and k <= NATIVE_LATENT_MAX

    def _whole_step(
        self, x: torch.Tensor, target: torch.Tensor, eps: torch.Tensor, beta: float, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_native_forward_backward` as one call into step.c (`mlp_step`, the same arithmetic, its
        products all through `gemm`): the weights' and gradients' addresses looked up once per
        pair of flat buffers, the workspace kept per batch shape."""
        lib, enc, dec = self.native, self.model.encoder, self.model.decoder
        (rows, d), (k, h), g = x.shape, enc.z_mean.weight.shape, self.decoder[0].weight.shape[0]
        layers = (self.encoder[0], enc.z_mean, enc.z_log_var, self.decoder[0], dec.out)
        pointers = self._by_buffers("_pointers", lambda: _POINTERS(0, 0, 0, *self._addresses(*layers), 0))
        work = self.__dict__.setdefault("_work", {})
        if (rows, d) not in work:
            if len(work) >= 4:  # (a few batch shapes at a time)
                work.clear()
            work[rows, d] = torch.empty(lib.mlp_step_bytes(rows, d, h, k, g), dtype=torch.uint8)
        terms = (ctypes.c_double * 2)()
        pointers[0], pointers[1], pointers[2] = x.data_ptr(), target.data_ptr(), eps.data_ptr()
        pointers[23] = work[(rows, d)].data_ptr()
        bound, density = math.inf if self.bound is None else self.bound, SPARSE_MAX_DENSITY
        self.ways = lib.mlp_step(
            pointers, rows, d, h, k, g, self.epsilon_std, bound, scale, scale * beta, density, terms
        )
        recon, kl = terms
        return torch.tensor((recon + beta * kl, recon, kl)).unbind(0)
