"""DCNv4: the compiled kernels against the float64 reference, on CPU and (marker `cuda`) on CUDA."""
import contextlib
import importlib
import re

import pytest
import torch

from mmdcnv4 import _ext
from mmdcnv4.ops import dcnv4, dcnv4_reference
from mmdcnv4.ops.reference import dcnv4_output_size

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]


def on_offset_grid(offsets):
    """``offsets`` moved to the nearest odd multiple of 2^-13 (see make_inputs)."""
    return (torch.floor(offsets * 4096) + 0.5) / 4096


def make_inputs(gen, n, h, w, group, d, kernel=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), remove_center=False,
                offset_std=1.5, extra=5, dtype=torch.float64, device='cpu'):
    """Fresh random value and offset_mask; offset_std ~1.5 puts many points near or past the border.

    The offset gradient jumps at pixel edges, which the offsets' grid keeps clear of rounding. They are odd
    multiples of 2^-13: multiples of 2^-13 stay so in any dtype, which makes every sampling position exact in
    fp32 (the kernels' arithmetic) at power-of-two offset scales, so no point lands on the other side of an
    edge than in the float64 reference (an fp32 offset of -1.0000001 puts a point 1.2e-7 short of the edge
    at row 3, and fp32 arithmetic rounds it onto the edge). Odd ones keep float64 positions off the edges,
    where gradcheck's finite differences would straddle the jump.
    """
    ho = dcnv4_output_size(h, kernel[0], stride[0], pad[0], dil[0])
    wo = dcnv4_output_size(w, kernel[1], stride[1], pad[1], dil[1])
    k = kernel[0] * kernel[1] - int(remove_center)
    value = torch.randn(n, h, w, group * d, generator=gen, dtype=torch.float64)
    om = torch.randn(n, ho, wo, group, 3 * k, generator=gen, dtype=torch.float64)
    om[..., :2 * k] = on_offset_grid(om[..., :2 * k] * offset_std)
    om = om.reshape(n, ho, wo, group * 3 * k)
    om = torch.cat([om, torch.randn(n, ho, wo, extra, generator=gen, dtype=torch.float64)], dim=-1)
    return value.to(device, dtype), om.to(device, dtype)


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block, the previous setting after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# (n, h, w, group, d, kernel, stride, pad, dilation, remove_center, offset_scale)
CASES = {
    'base': (2, 7, 9, 2, 8, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'remove_center': (1, 6, 5, 3, 16, (3, 3), (1, 1), (1, 1), (1, 1), True, 1.0),
    'offset_scale_0.5': (2, 5, 8, 2, 8, (3, 3), (1, 1), (1, 1), (1, 1), False, 0.5),
    'offset_scale_2': (1, 9, 6, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), False, 2.0),
    'stride_2': (2, 9, 11, 2, 16, (3, 3), (2, 2), (1, 1), (1, 1), False, 1.0),
    'dilation_2': (1, 8, 7, 2, 8, (3, 3), (1, 1), (2, 2), (2, 2), False, 1.0),
    'kernel_5': (1, 9, 8, 2, 8, (5, 5), (1, 1), (2, 2), (1, 1), True, 1.0),
    'kernel_1x3': (2, 5, 7, 3, 8, (1, 3), (1, 2), (0, 1), (1, 1), False, 1.0),
    'kernel_7x2': (1, 9, 6, 1, 8, (7, 2), (1, 1), (3, 0), (1, 2), False, 1.0),
    'kernel_1x1': (1, 4, 5, 2, 8, (1, 1), (1, 1), (0, 0), (1, 1), False, 1.0),
    'd32': (1, 5, 6, 2, 32, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'd64_odd_size': (1, 3, 7, 1, 64, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'd5_odd_channels': (2, 5, 4, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'g80': (1, 4, 3, 80, 8, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'g160_c2560': (1, 3, 4, 160, 16, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'g1_c2560': (1, 3, 2, 1, 2560, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0),
    'no_padding': (1, 8, 9, 2, 8, (3, 3), (2, 1), (0, 0), (1, 1), False, 1.0),
}


def call(case, value, om, fn=dcnv4):
    _, _, _, group, _, kernel, stride, pad, dil, rc, scale = case
    return fn(value, om, kernel, stride, pad, dil, group, scale, rc)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_backward_float64(name, device, rng):
    case = CASES[name]
    n, h, w, group, d, kernel, stride, pad, dil, rc, _ = case
    value, om = make_inputs(rng, n, h, w, group, d, kernel, stride, pad, dil, rc, device=device)
    value.requires_grad_()
    om.requires_grad_()
    out = call(case, value, om)
    ref = call(case, value, om, dcnv4_reference)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (value, om), grad)
    want = torch.autograd.grad(ref, (value, om), grad)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-9)
    # The padded tail of offset_mask gets zero gradient.
    assert torch.all(got[1][..., 3 * group * (kernel[0] * kernel[1] - int(rc)):] == 0)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['base', 'remove_center', 'stride_2', 'kernel_1x3', 'd5_odd_channels'])
def test_gradcheck(name, device, rng):
    case = CASES[name]
    n, h, w, group, d, kernel, stride, pad, dil, rc, _ = case
    value, om = make_inputs(rng, 1, min(h, 5), min(w, 5), group, min(d, 8), kernel, stride, pad, dil, rc,
                            device=device)
    value.requires_grad_()
    om.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, o: call(case, v, o), (value, om), eps=1e-6, atol=1e-5)


# Relative-error bounds against the float64 reference, per dtype (inputs rounded to the dtype first).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('name', ['base', 'kernel_5', 'd32', 'd5_odd_channels', 'g80'])
def test_low_precision_against_float64(name, dtype, device, rng):
    case = CASES[name]
    n, h, w, group, d, kernel, stride, pad, dil, rc, _ = case
    value, om = make_inputs(rng, n, h, w, group, d, kernel, stride, pad, dil, rc, dtype=dtype, device=device)
    value.requires_grad_()
    om.requires_grad_()
    value64 = value.detach().double().requires_grad_()
    om64 = om.detach().double().requires_grad_()
    out = call(case, value, om)
    ref = call(case, value64, om64, dcnv4_reference)
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]
    grad = torch.randn(ref.shape, generator=rng, dtype=torch.float64)
    got = torch.autograd.grad(out, (value, om), grad.to(device, dtype))
    want = torch.autograd.grad(ref, (value64, om64), grad.to(device))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert rel_err(got[0], want[0]) < GRAD_TOLERANCE[dtype]
    assert rel_err(got[1], want[1]) < GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_batch_equals_per_image(dtype, device, rng):
    """Batched output equals per-image output bit for bit (upstream fails this at batch > 1)."""
    case = (8, 14, 14, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), False, 1.0)
    value, om = make_inputs(rng, 8, 14, 14, 16, 16, dtype=dtype, device=device)
    batched = call(case, value, om)
    for i in range(value.shape[0]):
        single = call(case, value[i:i + 1], om[i:i + 1])
        assert torch.equal(batched[i:i + 1], single)
    # The offset/mask gradient has no atomics: it is also batch-independent.
    value.requires_grad_()
    om.requires_grad_()
    grad = torch.randn(batched.shape, generator=rng).to(device, dtype)
    gom = torch.autograd.grad(call(case, value, om), om, grad)[0]
    gom0 = torch.autograd.grad(call(case, value[:1], om[:1]), om, grad[:1])[0]
    assert torch.equal(gom[:1], gom0[:1])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_backward(dtype, device, rng):
    case = CASES['base']
    value, om = make_inputs(rng, 4, 16, 16, 2, 8, offset_std=0.5, dtype=dtype, device=device)
    value.requires_grad_()
    om.requires_grad_()
    grad = torch.randn(4, 16, 16, 16, generator=rng).to(device, dtype)
    with deterministic_algorithms():
        first = torch.autograd.grad(call(case, value, om), (value, om), grad)
        second = torch.autograd.grad(call(case, value, om), (value, om), grad)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # And the deterministic result is as accurate as the default one.
    ref = torch.autograd.grad(call(case, value.double(), om.double(), dcnv4_reference), value, grad.double())[0]
    assert rel_err(first[0], ref) < GRAD_TOLERANCE[dtype]


@pytest.mark.parametrize('device', DEVICES)
def test_non_contiguous_inputs(device, rng):
    case = CASES['base']
    value, om = make_inputs(rng, 2, 7, 9, 2, 8, device=device)
    value_nc = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)  # same values, other strides
    om_nc = torch.cat([om, om], dim=-1)[..., :om.shape[-1]]
    assert not value_nc.is_contiguous() and not om_nc.is_contiguous()
    torch.testing.assert_close(call(case, value_nc, om_nc), call(case, value, om), rtol=0, atol=0)


@pytest.mark.parametrize('device', DEVICES)
def test_empty_batch(device):
    value = torch.randn(0, 5, 5, 16, device=device, requires_grad=True)
    om = torch.randn(0, 5, 5, 3 * 2 * 9, device=device, requires_grad=True)
    out = dcnv4(value, om, group=2)
    assert out.shape == (0, 5, 5, 16)
    out.sum().backward()
    assert value.grad.shape == value.shape and om.grad.shape == om.shape


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=str)
def test_nan_offset_poisons_only_its_pixel_and_group(device, dtype, rng):
    """16 channels a group: on CUDA the fp32 lanes of a (pixel, group) share the point geometry by shuffles,
    the fp16 ones each compute it; either way one NaN offset poisons exactly its (pixel, group)."""
    value, om = make_inputs(rng, 2, 7, 9, 2, 16, dtype=dtype, device=device)
    om[1, 3, 4, 27 + 2 * 4] = float('nan')  # image 1, pixel (3, 4), group 1, x offset of point 4
    nan = torch.isnan(dcnv4(value, om, group=2))
    assert nan[1, 3, 4, 16:].all() and nan.sum() == 16


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype,d', [(torch.float32, 16), (torch.float32, 32), (torch.float16, 16), (torch.float16, 32),
                                     (torch.bfloat16, 16)], ids=lambda v: str(v).replace('torch.', ''))
def test_weight_of_a_point_outside_the_image_is_ignored(device, dtype, d, rng):
    """A point outside the image contributes nothing whatever its weight m (the contract): a NaN or Inf m
    there leaves the output and every gradient finite and equal to the float64 reference's, and that
    point's offset and weight gradients zero. Small maps: on CUDA the kernels that read a point's corners
    together (fp16/bf16; fp32 with 16 channels) and the sorted backward."""
    n, h, w, g = 2, 6, 7, 2
    value, om = make_inputs(rng, n, h, w, g, d, offset_std=0.5)
    om[0, 0, 0, 0:2] = -4.0  # group 0, point 0 of pixel (0, 0) lands at (-5, -5): outside
    om[0, 0, 0, 18] = float('nan')  # its m
    om[1, 5, 6, 27 + 16:27 + 18] = 4.0  # group 1, point 8 of pixel (5, 6) lands at (10, 11): outside
    om[1, 5, 6, 27 + 26] = float('inf')  # its m
    value = value.to(device, dtype).requires_grad_()
    om = om.to(device, dtype).requires_grad_()
    out = dcnv4(value, om, group=g)
    grad = torch.randn(out.shape, generator=rng, dtype=torch.float64).to(device, dtype)
    got = torch.autograd.grad(out, (value, om), grad)
    value64, om64 = value.detach().double().requires_grad_(), om.detach().double().requires_grad_()
    ref = dcnv4_reference(value64, om64, group=g)
    want = torch.autograd.grad(ref, (value64, om64), grad.double())
    for t in (out, *got, ref, *want):
        assert torch.isfinite(t).all()
    assert rel_err(out, ref) < TOLERANCE[dtype]
    assert rel_err(got[0], want[0]) < GRAD_TOLERANCE[dtype] and rel_err(got[1], want[1]) < GRAD_TOLERANCE[dtype]
    assert got[1][0, 0, 0, [0, 1, 18]].eq(0).all() and got[1][1, 5, 6, [27 + 16, 27 + 17, 27 + 26]].eq(0).all()


@pytest.mark.parametrize('device', DEVICES)
def test_nan_propagates(device, rng):
    value, om = make_inputs(rng, 1, 6, 6, 1, 8, offset_std=0.0, device=device)
    om[..., :18] = 0  # the regular 3x3 grid: every point lands on a pixel centre
    value[0, 2, 3, 5] = float('nan')
    out = dcnv4(value, om)
    # A point on pixel (y, x) reads the corners (y..y+1, x..x+1), the NaN one with weight zero when it is
    # not (y, x) itself, and 0 * NaN is NaN (as in grid_sample): the points on pixels (1..2, 2..3) see
    # it, hence exactly the outputs whose 3x3 window holds one of them, channel 5 only.
    nan = torch.isnan(out)
    assert nan[0, 0:4, 1:5, 5].all() and nan.sum() == 16
    om2 = om.clone()
    om2[0, 0, 0, 0] = float('nan')  # a NaN offset poisons its pixel
    assert torch.isnan(dcnv4(value, om2)[0, 0, 0]).all()
    assert torch.isfinite(dcnv4(value, om2)[0, 5, 5]).all()


def test_compile_fullgraph(rng):
    """No graph break; AOT autograd traces the backward through the registered autograd formula."""
    case = CASES['stride_2']
    value, om = make_inputs(rng, 2, 9, 11, 2, 16, stride=(2, 2), dtype=torch.float32)

    def forward(v, o):
        return call(case, v * 2, o).square()

    compiled = torch.compile(forward, fullgraph=True, backend='aot_eager')
    results = []
    for fn in (compiled, forward):
        v = value.clone().requires_grad_()
        o = om.clone().requires_grad_()
        out = fn(v, o)
        out.sum().backward()
        results.append((out, v.grad, o.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize('device', DEVICES)
def test_autograd_kernel_is_cpp(device, rng):
    """The op's own (C++) autograd kernel: torch.ops callers get the wrapper's gradients, computed by
    dcnv4_backward on the contiguous grad_output with the deterministic flag of the moment."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key('mmdcnv4::dcnv4_forward', 'Autograd')
    case = CASES['stride_2']
    n, h, w, group, d, kernel, stride, pad, dil, rc, scale = case
    value, om = make_inputs(rng, n, h, w, group, d, kernel, stride, pad, dil, rc, device=device)
    args = (*kernel, *stride, *pad, *dil, group, scale, rc)
    v1, o1, v2, o2, o3 = (t.clone().requires_grad_() for t in (value, om, value, om, om))
    out = torch.ops.mmdcnv4.dcnv4_forward(v1, o1, *args)
    # A Python autograd formula (torch.library.register_autograd) would show up as another node type.
    assert out.grad_fn.name().startswith('torch::autograd::CppNode<') and 'DCNv4Function' in out.grad_fn.name()
    wrapper = call(case, v2, o2)
    torch.testing.assert_close(out, wrapper, rtol=0, atol=0)
    grad = torch.randn(out.shape[:3] + (2 * out.shape[3],), generator=rng, dtype=out.dtype).to(device)[..., ::2]
    assert not grad.is_contiguous()
    # Deterministic mode makes the CUDA backward bitwise reproducible, so the results can be compared exactly.
    with deterministic_algorithms():
        got = torch.autograd.grad(out, (v1, o1), grad)
        want = torch.autograd.grad(wrapper, (v2, o2), grad)
        # Only the inputs that require grad get one.
        torch.ops.mmdcnv4.dcnv4_forward(value, o3, *args).backward(grad)
    direct = torch.ops.mmdcnv4.dcnv4_backward(value, om, grad.contiguous(), *args, True)
    for g, wg, dg in zip(got, want, direct):
        torch.testing.assert_close(g, wg, rtol=0, atol=0)
        torch.testing.assert_close(g, dg, rtol=0, atol=0)
    torch.testing.assert_close(o3.grad, direct[1], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.ops.mmdcnv4.dcnv4_forward(v1, o1, *args).grad_fn is None


def test_opcheck(rng):
    """Schema, fake kernel, autograd registration and AOT dispatch of dcnv4_forward."""
    case = CASES['remove_center']
    n, h, w, group, d, kernel, stride, pad, dil, rc, scale = case
    value, om = make_inputs(rng, 1, 4, 5, group, 4, kernel, stride, pad, dil, rc)
    torch.library.opcheck(torch.ops.mmdcnv4.dcnv4_forward.default,
                          (value.requires_grad_(), om.requires_grad_(), *kernel, *stride, *pad, *dil, group, scale,
                           rc))


def test_autocast_promotes_mixed_dtypes(rng):
    value, om = make_inputs(rng, 1, 5, 5, 1, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match='same dtype'):
        dcnv4(value, om.to(torch.bfloat16))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = dcnv4(value, om.to(torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, dcnv4(value, om.to(torch.bfloat16).float()))


BAD_INPUTS = [
    (dict(value=torch.randn(5, 5, 8)), ValueError, 'value must be a 4-D'),
    (dict(offset_mask=torch.randn(1, 5, 5)), ValueError, 'offset_mask must be a 4-D'),
    (dict(value=torch.randint(0, 3, (1, 5, 5, 8))), TypeError, 'value must be float16'),
    (dict(offset_mask=torch.randn(1, 5, 5, 27, dtype=torch.float64)), TypeError, 'same dtype'),
    (dict(group=3), ValueError, 'divisible by group'),
    (dict(group=0), ValueError, 'group must be a positive int'),
    (dict(offset_mask=torch.randn(1, 5, 5, 26)), ValueError, 'offset_mask must have shape'),
    (dict(offset_mask=torch.randn(1, 4, 5, 27)), ValueError, 'offset_mask must have shape'),
    (dict(offset_mask=torch.randn(2, 5, 5, 27)), ValueError, 'offset_mask must have shape'),
    (dict(kernel_size=-1), ValueError, 'kernel_size must be >= 1'),
    (dict(stride=0), ValueError, 'stride must be >= 1'),
    (dict(padding=-2), ValueError, 'padding must be >= 0'),
    (dict(dilation=(1, 0)), ValueError, 'dilation must be >= 1'),
    (dict(kernel_size=(3, 3, 3)), TypeError, 'kernel_size must be an int or a pair'),
    (dict(kernel_size=2.5), TypeError, 'kernel_size must be an int or a pair'),
    (dict(value=torch.randn(1, 2, 2, 8), padding=0, offset_mask=torch.randn(1, 1, 1, 27)), ValueError,
     'output size'),
    (dict(kernel_size=1, padding=0, remove_center=True, offset_mask=torch.randn(1, 5, 5, 3)), ValueError,
     'more than one point'),
    (dict(offset_scale=float('nan')), ValueError, 'offset_scale'),
    (dict(remove_center=1), TypeError, 'remove_center'),
    (dict(value='x'), TypeError, 'value must be a torch.Tensor'),
]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('override,error,message', BAD_INPUTS)
def test_bad_inputs(override, error, message, device):
    """On CUDA the call first goes straight to the op; its failure must still give the precise error."""
    args = dict(value=torch.randn(1, 5, 5, 8), offset_mask=torch.randn(1, 5, 5, 27), kernel_size=3, stride=1,
                padding=1, dilation=1, group=1, offset_scale=1.0, remove_center=False)
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=message):
        dcnv4(**args)


@pytest.mark.cuda
def test_cuda_calls_skip_the_python_checks(rng, monkeypatch):
    """CUDA inputs with plain arguments go straight to the op (host time); others take the Python checks."""
    dcnv4_module = importlib.import_module('mmdcnv4.ops.dcnv4')  # the module (mmdcnv4.ops.dcnv4 is the function)
    value, om = make_inputs(rng, 1, 6, 7, 2, 8, dtype=torch.float32, device='cuda')
    want = dcnv4(value, om, group=2)

    def fail(*args):
        raise AssertionError('the Python checks ran')
    monkeypatch.setattr(dcnv4_module, '_check_tensor', fail)
    assert torch.equal(dcnv4(value, om, (3, 3), 1, (1, 1), 1, 2, 1.0, False), want)
    with pytest.raises(AssertionError, match='Python checks'):
        dcnv4(value, om, group=2, offset_scale=1)  # an int offset_scale takes the checked path


def test_missing_cuda_kernels_give_a_clear_error():
    if _ext.has_kernel('dcnv4_forward', 'cuda'):
        pytest.skip('this build has the CUDA kernels')
    with pytest.raises(RuntimeError, match='built without its CUDA kernels'):
        _ext.require_kernel('dcnv4_forward', 'cuda')


def test_other_devices_are_refused():
    value = torch.randn(1, 5, 5, 8, device='meta')
    with pytest.raises(RuntimeError, match='supports CPU and CUDA'):
        dcnv4(value, torch.randn(1, 5, 5, 27, device='meta'))


@pytest.mark.cuda
def test_cuda_device_mismatch():
    with pytest.raises(ValueError, match='same device'):
        dcnv4(torch.randn(1, 5, 5, 8, device='cuda'), torch.randn(1, 5, 5, 27))


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_large_group_and_upstream_shapes(dtype, rng):
    """FlashInternImage-L stage 4 (G=80, D=16; upstream's backward cannot launch) and a detection shape."""
    for (n, h, w, g) in [(2, 25, 42, 80), (2, 50, 84, 16)]:
        value, om = make_inputs(rng, n, h, w, g, 16, dtype=dtype, device='cuda', offset_std=1.0)
        value.requires_grad_()
        om.requires_grad_()
        out = dcnv4(value, om, group=g)
        out.float().square().sum().backward()
        ref = dcnv4_reference(value.detach().double(), om.detach().double(), (3, 3), (1, 1), (1, 1), (1, 1), g)
        assert rel_err(out, ref) < TOLERANCE[dtype]
        assert torch.isfinite(value.grad).all() and torch.isfinite(om.grad).all()


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('shape', [(16, 96, 96, 2, 16), (16, 72, 72, 3, 32)], ids=['d16', 'd32'])
def test_cuda_two_vectors_per_thread(shape, dtype, rng):
    """fp16/bf16 maps with 16 or 32 channels per group that fill the GPU at least twice take the forward
    with two vectors per thread: it runs (kernel name), matches the float64 reference, and equals bit for
    bit the per-image calls, which are too small for it. (Group counts whose 128-byte rows do not divide
    the channels, so that fp16 does not take the staged forward.)"""
    n, h, w, g, d = shape
    value, om = make_inputs(rng, n, h, w, g, d, dtype=dtype, device='cuda', offset_std=1.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = dcnv4(value, om, group=g)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if 'dcnv4_forward_kernel' in e.name]
    # dcnv4_forward_kernel<scalar, V, 3, 3, NV=2, ...>
    assert names and all(re.search(r',3,3,2\b', name.replace(' ', '')) for name in names), names
    ref = dcnv4_reference(value[:1].double(), om[:1].double(), (3, 3), (1, 1), (1, 1), (1, 1), g)
    assert rel_err(out[:1], ref) < TOLERANCE[dtype]
    for i in (0, n - 1):
        assert torch.equal(out[i:i + 1], dcnv4(value[i:i + 1], om[i:i + 1], group=g))


def poison_cuda_cache(dtype):
    """Fills free blocks of the caching allocator's pools with NaN (small tensors come from 2 MB segments,
    large ones from their own), so that an output the kernels leave unwritten shows up as NaN."""
    torch.cuda.synchronize()
    blocks = [torch.empty(512 << 10, dtype=torch.uint8, device='cuda') for _ in range(64)]
    blocks.append(torch.empty(64 << 20, dtype=torch.uint8, device='cuda'))
    for block in blocks:
        block.view(dtype).fill_(float('nan'))
    torch.cuda.synchronize()
    del blocks


def piled_up_offsets(om, group, k, h, w, gen):
    """Offsets that send every point of the first half of the output rows to one spot, and the points of
    the rest onto exact pixel centres, half-pixel edges and just outside the map."""
    n, ho, wo, _ = om.shape
    ys = torch.arange(ho, dtype=torch.float64).view(1, ho, 1, 1, 1)
    xs = torch.arange(wo, dtype=torch.float64).view(1, 1, wo, 1, 1)
    grid = torch.tensor([(j - 1, i - 1) for i in range(3) for j in range(3)], dtype=torch.float64)[:k]
    offsets = om[..., :group * 3 * k].reshape(n, ho, wo, group, 3 * k).clone()

    def pick(size):
        targets = torch.tensor([-1.0, -0.5, 0.0, 0.5, size - 1.0, size - 0.5, size - 1 + 2 ** -10],
                               dtype=torch.float64)
        return targets[torch.randint(len(targets), (n, ho, wo, group, k), generator=gen)]

    pick_y, pick_x = pick(h), pick(w)
    top = ys < ho // 2
    dy = torch.where(top, 2.25 - ys, pick_y - ys) - grid[:, 0]
    dx = torch.where(top, 3.75 - xs, pick_x - xs) - grid[:, 1]
    offsets[..., 0:2 * k:2] = dx.to(om.dtype)
    offsets[..., 1:2 * k:2] = dy.to(om.dtype)
    om = om.clone()
    om[..., :group * 3 * k] = offsets.reshape(n, ho, wo, group * 3 * k)
    return om


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('d', [16, 5], ids=['d16', 'd5'])
def test_cuda_value_gradient_piled_up_points(d, dtype, rng):
    """The backward against the float64 reference, and the default float-atomic value gradient against the
    deterministic fixed-point one, with every point of half the map piled onto one spot (hundreds of
    atomics on the same four pixels) and the rest on pixel centres, half-pixel edges and past the border;
    every element written (allocator poisoned)."""
    n, h, w, g = 3, 9, 11, 4
    value, om = make_inputs(rng, n, h, w, g, d, dtype=torch.float64)
    om = piled_up_offsets(om, g, 9, h, w, rng)
    value, om = value.cuda().to(dtype).requires_grad_(), om.cuda().to(dtype).requires_grad_()
    grad = torch.randn(n, h, w, g * d, generator=rng, dtype=torch.float64).cuda()
    poison_cuda_cache(dtype)
    got = torch.autograd.grad(dcnv4(value, om, group=g), (value, om), grad.to(dtype))
    ref = torch.autograd.grad(dcnv4_reference(value.double(), om.double(), group=g), (value, om), grad)
    tolerance = 1e-12 if dtype == torch.float64 else GRAD_TOLERANCE[dtype]
    assert rel_err(got[0], ref[0]) < tolerance and rel_err(got[1], ref[1]) < tolerance
    with deterministic_algorithms():
        scattered = torch.autograd.grad(dcnv4(value, om, group=g), value, grad.to(dtype))[0]
    assert rel_err(got[0], scattered) < tolerance


# (stride, dilation, offset_scale, remove_center, offset_std, output map); offset_std None: piled_up_offsets
SORTED_CASES = {
    'base': (1, 1, 1.0, False, 1.5, (34, 38)),
    'offsets_past_the_region': (1, 1, 1.0, False, 6.0, (34, 38)),
    'stride_2': (2, 1, 1.0, False, 1.5, (34, 38)),
    'dilation_2_remove_center_scale_0.5': (1, 2, 0.5, True, 1.5, (34, 38)),
    'piled_up': (1, 1, 1.0, False, None, (34, 38)),
    'small_ragged_map': (1, 1, 1.0, False, 1.5, (7, 11)),
    # the sorted backward's tile shape follows the map (4 x 14 tiles here; 3 x 14 on a map of 3 rows)
    'map_28x28': (1, 1, 1.0, False, 1.5, (28, 28)),
    'map_3x40': (1, 1, 1.0, False, 1.5, (3, 40)),
}


# (dtype, channels per group): 2 lanes a pixel (fp16/bf16, 16), 4 lanes (fp16/bf16, 32; fp32, 16), 8 lanes
# (fp32, 32)
SORTED_WIDTHS = [(torch.float16, 32), (torch.bfloat16, 32), (torch.float16, 16), (torch.bfloat16, 16),
                 (torch.float32, 16), (torch.float32, 32)]


# offset_mask rows of 16-byte multiples (padded, as the DCNv4 layers lay them out) are staged by the copy
# engine on sm_90 too (staged forward; sorted backward at 4 lanes a pixel); other rows (the 5 extra channels
# of make_inputs) are read from global memory.
OFFSET_ROWS = ['padded', 'unpadded']


def offsets_extra(rows, group, k):
    """make_inputs' `extra` channels for `rows`: up to a multiple of 8 channels, or 5."""
    return -(group * 3 * k) % 8 if rows == 'padded' else 5


def sorted_kernel_ran(prof, rows, remove_center, fixed_point=False):
    """The sorted backward ran, with the tile's offsets staged when it stages its region at 4 lanes a pixel
    and the rows are padded (sm_90), its remove_center (fixed at compile time) the call's, and its value
    gradient in fixed point (deterministic mode) or in floats as asked (kernel template arguments: lanes,
    region staged, offsets staged, remove_center, accumulator)."""
    pattern = re.compile(r'sorted_kernel<[^,]+, \d+, (\d+), (true|false), (true|false), (true|false), '
                         r'[^<>,]*(FloatAtomicAdd|FixedPointAtomicAdd)')
    found = [m for m in (pattern.search(e.name) for e in prof.events()) if m]
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    accumulator = 'FixedPointAtomicAdd' if fixed_point else 'FloatAtomicAdd'
    return bool(found) and all(
        (m[3] == 'true') == (rows == 'padded' and sm90 and m[1] == '4' and m[2] == 'true') and
        m[4] == str(remove_center).lower() and m[5] == accumulator for m in found)


@pytest.mark.cuda
@pytest.mark.parametrize('rows', OFFSET_ROWS)
@pytest.mark.parametrize('dtype,d', SORTED_WIDTHS, ids=lambda v: str(v).replace('torch.', ''))
@pytest.mark.parametrize('name', sorted(SORTED_CASES))
def test_cuda_sorted_value_gradient(name, dtype, d, rows, rng):
    """16 and 32 channels a group with a 3x3 kernel take the backward that sorts each tile's corners by
    input pixel before adding them (kernel name checked), in deterministic mode too. Its gradients match the
    float64 reference, with offsets past the tile's region, stride, dilation, remove_center, offset_scale,
    hundreds of points on one pixel, a map smaller than a tile and maps that take wide tiles; in deterministic
    mode its fixed-point value gradient matches it as well and repeats bit for bit, and its offset gradients
    are those of the default mode bit for bit; every element written (allocator poisoned)."""
    stride, dil, scale, rc, offset_std, (ho, wo) = SORTED_CASES[name]
    n, g = 2, 2
    h, w = ho * stride, wo * stride
    value, om = make_inputs(rng, n, h, w, g, d, stride=(stride, stride), pad=(dil, dil), dil=(dil, dil),
                            remove_center=rc, offset_std=offset_std or 1.0, extra=offsets_extra(rows, g, 9 - int(rc)))
    if offset_std is None:
        om = piled_up_offsets(om, g, 9, h, w, rng)
    args = ((3, 3), (stride, stride), (dil, dil), (dil, dil), g, scale, rc)
    # The reference sees the inputs rounded to dtype (the offset gradient jumps at pixel edges).
    value64, om64 = value.to(dtype).double().requires_grad_(), om.to(dtype).double().requires_grad_()
    ref_out = dcnv4_reference(value64, om64, *args)
    assert ref_out.shape[1:3] == (ho, wo)
    grad = torch.randn(ref_out.shape, generator=rng, dtype=torch.float64).to(dtype).double()
    want = [t.cuda() for t in torch.autograd.grad(ref_out, (value64, om64), grad)]
    value = value64.detach().cuda().to(dtype).requires_grad_()
    om = om64.detach().cuda().to(dtype).requires_grad_()
    grad = grad.cuda().to(dtype)
    poison_cuda_cache(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = torch.autograd.grad(dcnv4(value, om, *args), (value, om), grad)
        torch.cuda.synchronize()
    assert sorted_kernel_ran(prof, rows, rc)
    assert rel_err(got[0], want[0]) < GRAD_TOLERANCE[dtype]
    assert rel_err(got[1], want[1]) < GRAD_TOLERANCE[dtype]
    with deterministic_algorithms():
        poison_cuda_cache(dtype)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fixed, fixed_om = torch.autograd.grad(dcnv4(value, om, *args), (value, om), grad)
            torch.cuda.synchronize()
        again = torch.autograd.grad(dcnv4(value, om, *args), value, grad)[0]
    assert sorted_kernel_ran(prof, rows, rc, fixed_point=True)
    assert rel_err(fixed, want[0]) < GRAD_TOLERANCE[dtype]
    assert torch.equal(fixed, again)
    assert torch.equal(fixed_om, got[1])  # the offset gradients have no atomics: the same in both modes


@pytest.mark.cuda
def test_cuda_sorted_fixed_point_past_fp32_scale(rng):
    """Deterministic mode with output gradients so small (2^-90 times the usual) that the fixed-point scale
    passes fp32's range (2^126): the sorted backward then rounds its contributions in double, to the same
    integers, so the value gradient is exactly 2^-90 times the one of the unscaled gradients. Weights and
    gradients stay at least 0.5 in magnitude, so that no scaled product falls below fp32's normal range."""
    n, h, w, g, d = 2, 20, 24, 2, 16
    value, om = make_inputs(rng, n, h, w, g, d, offset_std=1.0, dtype=torch.float32)
    om = om.clone()
    for group in range(g):  # the weights m of each group
        om[..., group * 27 + 18:group * 27 + 27] = om[..., group * 27 + 18:group * 27 + 27].abs() + 0.5
    grad = torch.randn(n, h, w, g * d, generator=rng, dtype=torch.float64)
    grad = (grad.sign() * (grad.abs() + 0.5)).float().cuda()
    value, om = value.cuda().requires_grad_(), om.cuda()
    with deterministic_algorithms():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            tiny = torch.autograd.grad(dcnv4(value, om, group=g), value, grad * 2.0 ** -90)[0]
            torch.cuda.synchronize()
        usual = torch.autograd.grad(dcnv4(value, om, group=g), value, grad)[0]
    assert sorted_kernel_ran(prof, 'unpadded', False, fixed_point=True)
    assert usual.abs().max() > 0 and torch.equal(tiny, usual * 2.0 ** -90)


# (dtype, channels per group) of the staged forward: groups of 32, 64 or 128 bytes, 1, 2 or 4 threads a
# group
STAGED_WIDTHS = [(torch.float16, 16), (torch.float16, 32), (torch.float16, 64), (torch.bfloat16, 16),
                 (torch.bfloat16, 32), (torch.float32, 8), (torch.float32, 16), (torch.float32, 32)]
# Stride 2 widens a tile's region past the staged kernel's shared memory, and maps under 8 pixels a side do
# not pay for it: the other kernels run there. The tile follows the map (7 x 8 pixels on the 34 x 38 maps, 4 x
# 14 on 28 x 28), and a tile's pixels fill its warps row by row, so warps span two rows of the tile.
STAGED_CASES = sorted(name for name in SORTED_CASES if name not in ('stride_2', 'small_ragged_map', 'map_3x40'))


def staged_kernel_ran(prof, rows, remove_center=False):
    """The staged forward ran, with its offsets staged when the rows are padded (sm_90) and its
    remove_center (fixed at compile time) the call's (the last two template arguments)."""
    names = [e.name for e in prof.events() if 'dcnv4_forward_staged_kernel' in e.name]
    staged = 'true' if rows == 'padded' and torch.cuda.get_device_capability() >= (9, 0) else 'false'
    return bool(names) and all(
        re.search(rf'staged_kernel<[^>]*, {staged}, {str(remove_center).lower()}>', n) for n in names)


def staged_batch(ho, wo):
    """Images of ho x wo outputs that make about 1M threads (8 a pixel), several waves of an H200: many
    blocks of many images in one launch."""
    return -(-(1 << 20) // (ho * wo * 8))


@pytest.mark.cuda
@pytest.mark.parametrize('rows', OFFSET_ROWS)
@pytest.mark.parametrize('dtype,d', STAGED_WIDTHS, ids=lambda v: str(v).replace('torch.', ''))
@pytest.mark.parametrize('name', STAGED_CASES)
def test_cuda_staged_forward(name, dtype, d, rows, rng):
    """A 3x3 fp32/fp16/bf16 forward of 32 to 128 bytes a group takes the kernel that stages each tile's
    input region in shared memory (kernel name checked), over a batch that fills the GPU and in per-image
    calls alike (the choice does not depend on the batch). The batch equals bit for bit the
    per-image calls and matches the float64 reference, with offsets past the region, dilation,
    remove_center, offset_scale, points piled on one spot, on pixel edges and past the border, and maps that
    are not a multiple of the tile; every element written (allocator poisoned)."""
    stride, dil, scale, rc, offset_std, (ho, wo) = SORTED_CASES[name]
    g = 256 // (d * torch.finfo(dtype).bits // 8)  # two 128-byte rows of groups
    n = staged_batch(ho, wo)
    h, w = ho * stride, wo * stride
    value, om = make_inputs(rng, n, h, w, g, d, stride=(stride, stride), pad=(dil, dil), dil=(dil, dil),
                            remove_center=rc, offset_std=offset_std or 1.0, dtype=torch.float32,
                            extra=offsets_extra(rows, g, 9 - int(rc)))
    if offset_std is None:
        om = piled_up_offsets(om, g, 9 - int(rc), h, w, rng)
    value, om = value.cuda().to(dtype), om.cuda().to(dtype)
    args = ((3, 3), (stride, stride), (dil, dil), (dil, dil), g, scale, rc)
    poison_cuda_cache(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = dcnv4(value, om, *args)
        torch.cuda.synchronize()
    assert staged_kernel_ran(prof, rows, rc)
    assert out.shape[1:3] == (ho, wo)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        single = dcnv4(value[:1], om[:1], *args)
        torch.cuda.synchronize()
    assert staged_kernel_ran(prof, rows, rc)
    assert torch.equal(out[:1], single)
    for i in (n // 2, n - 1):
        assert torch.equal(out[i:i + 1], dcnv4(value[i:i + 1], om[i:i + 1], *args))
    for i in (0, n - 1):
        ref = dcnv4_reference(value[i:i + 1].double(), om[i:i + 1].double(), *args)
        assert rel_err(out[i:i + 1], ref) < TOLERANCE[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize('rows', OFFSET_ROWS)
@pytest.mark.parametrize('dtype,d', [(torch.float32, 16), (torch.float16, 16), (torch.bfloat16, 32)],
                         ids=lambda v: str(v).replace('torch.', ''))
def test_cuda_staged_forward_non_finite(dtype, d, rows, rng):
    """Inf, -Inf and NaN in the image and a NaN offset, on a map that takes the staged forward (kernel name
    checked): NaN and Inf land where the float64 reference has them (Inf with its sign; a zero bilinear
    weight times an Inf is NaN), and the other outputs match it."""
    g = 256 // (d * torch.finfo(dtype).bits // 8)
    n = staged_batch(34, 38)
    value, om = make_inputs(rng, n, 34, 38, g, d, offset_std=1.0, dtype=torch.float32, extra=offsets_extra(rows, g, 9))
    for i in (0, n - 1):
        value[i, 10, 12, 3] = float('inf')
        value[i, 20, 25, d + 5] = float('-inf')
        value[i, 15, 30, 2 * d + 1] = float('nan')
        om[i, 25, 8, 3 * 9 + 2] = float('nan')  # group 1, point 1, x offset
    value, om = value.cuda().to(dtype), om.cuda().to(dtype)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = dcnv4(value, om, group=g)
        torch.cuda.synchronize()
    assert staged_kernel_ran(prof, rows)
    for i in (0, n - 1):
        got = out[i:i + 1].double()
        ref = dcnv4_reference(value[i:i + 1].double(), om[i:i + 1].double(), group=g)
        assert torch.isnan(got).any() and torch.isinf(got).any()
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)])
        finite = torch.isfinite(ref)
        assert rel_err(got[finite], ref[finite]) < TOLERANCE[dtype]


@pytest.mark.cuda
def test_cuda_graph_capture_backward(rng):
    """Forward and backward captured in a CUDA graph (the backward allocates and zero-fills its buffers on
    the stream) and replayed on fresh inputs into poisoned gradients."""
    value, om = make_inputs(rng, 2, 16, 16, 4, 16, dtype=torch.float32, device='cuda')
    grad = torch.randn(2, 16, 16, 64, generator=rng).cuda()
    value.requires_grad_()
    om.requires_grad_()
    torch.autograd.grad(dcnv4(value, om, group=4), (value, om), grad)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grads = torch.autograd.grad(dcnv4(value, om, group=4), (value, om), grad)
    fresh_value, fresh_om = make_inputs(rng, 2, 16, 16, 4, 16, dtype=torch.float32, device='cuda')
    with torch.no_grad():
        value.copy_(fresh_value)
        om.copy_(fresh_om)
    for t in grads:
        t.fill_(float('nan'))
    graph.replay()
    torch.cuda.synchronize()
    want = torch.autograd.grad(dcnv4(value, om, group=4), (value, om), grad)
    torch.testing.assert_close(grads[0], want[0])
    torch.testing.assert_close(grads[1], want[1])


@pytest.mark.cuda
def test_cuda_graph_capture(rng):
    value, om = make_inputs(rng, 2, 16, 16, 4, 16, dtype=torch.float32, device='cuda')
    static_out = dcnv4(value, om, group=4)  # warm-up (loads the kernels) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = dcnv4(value, om, group=4)
    fresh_value, fresh_om = make_inputs(rng, 2, 16, 16, 4, 16, dtype=torch.float32, device='cuda')
    value.copy_(fresh_value)
    om.copy_(fresh_om)
    static_out.fill_(float('nan'))  # poison: the replay must rewrite every element
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, dcnv4(fresh_value, fresh_om, group=4))


@pytest.mark.cuda
def test_cuda_compile_inductor(rng):
    value, om = make_inputs(rng, 2, 12, 10, 4, 16, dtype=torch.float16, device='cuda')
    fn = torch.compile(lambda v, o: dcnv4(v.relu(), o, group=4) * 2, fullgraph=True)
    torch.testing.assert_close(fn(value, om), dcnv4(value.relu(), om, group=4) * 2)
