"""The fused step's matrix products through oneDNN: against float64 products, independent of the
number of threads, and the whole step at the seed's shapes against autograd in float64."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vaelab
from vaelab import products
from vaelab.models import build_model
from vaelab.steps import FusedMLPStep, autograd_step

needs_onednn = pytest.mark.skipif(not products.onednn_available(), reason="this torch has no oneDNN products")


def test_large_products_go_through_onednn_and_small_ones_do_not():
    big, small = torch.rand(100, 784), torch.rand(100, 256)
    assert products.uses_onednn(big, torch.rand(256, 784)) == products.onednn_available()
    assert not products.uses_onednn(small, torch.rand(2, 256))  # the latent heads
    assert not products.uses_onednn(big.double(), torch.rand(256, 784).double())
    assert not products.uses_onednn(big, torch.rand(256, 784), allowed=False)


@needs_onednn
def test_linear_equals_the_float64_product():
    g = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(100, 784, generator=g),
        torch.randn(256, 784, generator=g),
        torch.randn(256, generator=g),
    )
    expected = x.double() @ w.double().t() + b.double()
    torch.testing.assert_close(products.linear(x, w, b).double(), expected, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_transposed_views_and_a_gradient_buffer():
    """dW = dl' h from transposed views, written into a view of a flat buffer; dh = dl W."""
    g = torch.Generator().manual_seed(1)
    dl, h, w = (
        torch.randn(100, 784, generator=g),
        torch.randn(100, 256, generator=g),
        torch.randn(784, 256, generator=g),
    )
    flat = torch.zeros(7 + 784 * 256)
    grad = flat[7:].view(784, 256)
    products.linear_into(grad, dl.t(), h.t())
    torch.testing.assert_close(grad.double(), dl.double().t() @ h.double(), rtol=1e-5, atol=1e-4)
    assert flat[:7].eq(0).all()
    dh = products.linear(dl, w.t())
    torch.testing.assert_close(dh.double(), dl.double() @ w.double(), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_results_do_not_depend_on_the_number_of_threads():
    """So a run is the same whatever the threads (the module's promise, at the seed's shapes)."""
    g = torch.Generator().manual_seed(2)
    x, w, dl, h = (torch.randn(*s, generator=g) for s in ((100, 784), (256, 784), (100, 784), (100, 256)))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(
                (
                    products.linear(x, w),
                    products.linear(dl.t(), h.t()),
                    products.linear(dl, w.t().contiguous().t()),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


@needs_onednn
def test_the_fused_step_at_the_seeds_shapes_equals_autograd_in_float64():
    torch.manual_seed(0)
    config = vaelab.preset("seed").model
    model = build_model(config)
    reference = build_model(config).double()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(3)
    x = torch.rand(100, 784, generator=g)
    eps = torch.randn(100, 2, generator=g)
    loss_a, recon_a, kl_a = autograd_step(
        reference, x.double(), x.double(), eps.double(), 1.0, 0.01, contextlib.nullcontext
    )
    step = FusedMLPStep(model)
    assert products.uses_onednn(x, model.encoder.body[0].weight)
    loss_f, recon_f, kl_f = step(x, x, eps, 1.0, 0.01)
    torch.testing.assert_close(loss_f.double(), loss_a, rtol=1e-5, atol=1e-3)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "c_in, size, k, stride, padding", [(32, 14, 4, 2, 1), (5, 7, 3, 2, 1), (4, 6, 4, 2, 0)]
)
def test_the_one_channel_transposed_convolution_is_pytorchs(c_in, size, k, stride, padding, monkeypatch):
    """A conv decoder's last layer to one channel (forward as a matrix product and col2im) against
    nn.ConvTranspose2d in float64: the output and every gradient; and that it is the route taken."""
    import copy

    from vaelab.models import conv

    calls = []
    route = conv._OneChannelTransposedConv.apply
    monkeypatch.setattr(conv._OneChannelTransposedConv, "apply", lambda *a: calls.append(1) or route(*a))
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(c_in, 1, k, stride, padding).to(memory_format=torch.channels_last)
    x = torch.randn(3, c_in, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    reference = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_()
    y, y64 = conv._transposed_conv(layer, x), reference(x64)
    assert calls == [1] and y.shape == y64.shape
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y64)
    got = torch.autograd.grad(y, [x, layer.weight, layer.bias], g.float())
    want = torch.autograd.grad(y64, [x64, reference.weight, reference.bias], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
