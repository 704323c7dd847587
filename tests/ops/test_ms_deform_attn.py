"""Multi-scale deformable attention ops (mmcv and flash layouts) and the mmcv-compatible module.

CPU tests are small (a 2-core machine runs them); the ``cuda`` ones run where a GPU and the CUDA kernels
are. References: ``mmdcnv4.ops.reference`` in float64, on the inputs rounded to the tested dtype, so the
tolerances measure the kernels' arithmetic only.
"""
import importlib

import pytest
import torch

from mmdcnv4 import _ext
from mmdcnv4.ops.ms_deform_attn import flash_deform_attn, ms_deform_attn
from mmdcnv4.ops.reference import flash_deform_attn_reference, ms_deform_attn_reference

pytestmark = pytest.mark.skipif(not _ext.has_kernel('flash_deform_attn_forward', 'cpu'),
                                reason='mmdcnv4._C with the MSDA kernels is not built')

cuda = pytest.mark.cuda

# Relative L2 error bounds ||out - ref|| / ||ref|| against the float64 reference.
OUT_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def levels_of(shapes, device='cpu'):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def make_inputs(gen, n, len_q, heads, d, shapes, points, dtype=torch.float64, device='cpu', low=-0.15,
                high=1.15):
    """value, level tables, packed sampling_loc_attn, and its mmcv-layout split (locations, softmax).

    The location gradient jumps at pixel edges, which the locations' grid keeps clear of rounding (as
    test_dcnv4.make_inputs does for offsets). They are odd multiples of 2^-13: multiples of 2^-13 stay so in
    any dtype, which makes ``loc * size - 0.5`` exact in fp32 (the kernels' arithmetic), so no point lands on
    the other side of an edge than in the float64 reference; odd ones keep float64 positions off the edges,
    where gradcheck's finite differences would straddle the jump.
    """
    spatial_shapes, level_start_index, len_in = levels_of(shapes, device)
    levels = len(shapes)
    value = torch.randn(n, len_in, heads, d, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, len_q, heads, levels, points, 2, generator=gen, dtype=torch.float64) * (high - low) + low
    loc = (torch.floor(loc * 4096) + 0.5) / 4096
    logits = torch.randn(n, len_q, heads, levels * points, generator=gen, dtype=torch.float64)
    sla = torch.cat([loc.reshape(n, len_q, heads, 2 * levels * points), logits], -1)
    weights = torch.softmax(logits, -1).reshape(n, len_q, heads, levels, points)
    to = dict(dtype=dtype, device=device)
    return (value.to(**to), spatial_shapes, level_start_index, sla.to(**to), loc.to(**to), weights.to(**to))


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm()
    return float((out - ref).norm() / (denom if denom > 0 else 1.0))


def run_layout(layout, value, shapes, starts, sla, loc, weights, points, grad=None):
    """Output and gradients (value, then sampling inputs) of the op in one layout."""
    value = value.detach().clone().requires_grad_()
    if layout == 'flash':
        sla = sla.detach().clone().requires_grad_()
        out = flash_deform_attn(value, shapes, starts, sla, points)
        inputs = (value, sla)
    else:
        loc = loc.detach().clone().requires_grad_()
        weights = weights.detach().clone().requires_grad_()
        out = ms_deform_attn(value, shapes, starts, loc, weights)
        inputs = (value, loc, weights)
    if grad is None:
        return out.detach(), None
    grads = torch.autograd.grad(out, inputs, grad)
    return out.detach(), grads


def reference_layout(layout, value, shapes, starts, sla, loc, weights, points, grad):
    """The float64 reference on the same (possibly rounded) inputs, moved to the CPU."""
    cast = [t.detach().double().cpu() for t in (value, sla, loc, weights)]
    return run_reference(layout, *cast[:1], shapes.cpu(), starts.cpu(), *cast[1:], points, grad.double().cpu())


def run_reference(layout, value, shapes, starts, sla, loc, weights, points, grad):
    value = value.clone().requires_grad_()
    if layout == 'flash':
        sla = sla.clone().requires_grad_()
        out = flash_deform_attn_reference(value, shapes, starts, sla, points)
        inputs = (value, sla)
    else:
        loc = loc.clone().requires_grad_()
        weights = weights.clone().requires_grad_()
        out = ms_deform_attn_reference(value, shapes, starts, loc, weights)
        inputs = (value, loc, weights)
    return out.detach(), torch.autograd.grad(out, inputs, grad)


def poison_cuda_cache(*like):
    """Fills freed blocks of the caching allocator with NaN, so that an output element the kernels fail to
    write shows up (torch.empty of the same size gets such a block back)."""
    blocks = [torch.full_like(t, float('nan')) for t in like for _ in range(2)]
    del blocks


def check_against_reference(gen, layout, dtype, device, n=2, len_q=7, heads=3, d=8,
                            shapes=((5, 7), (3, 4), (2, 3)), points=3, grad_tol=None):
    value, ss, lsi, sla, loc, weights = make_inputs(gen, n, len_q, heads, d, shapes, points, dtype, device)
    grad = torch.randn(n, len_q, heads * d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if device == 'cuda':
        poison_cuda_cache(grad, value, sla, loc, weights)
    out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, points, grad)
    ref, ref_grads = reference_layout(layout, value, ss, lsi, sla, loc, weights, points, grad)
    assert out.dtype == dtype and out.shape == (n, len_q, heads * d)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < OUT_TOL[dtype], rel_err(out, ref)
    for name, g, r in zip(('value', 'sampling', 'weights'), grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        err = rel_err(g, r)
        assert err < (grad_tol or GRAD_TOL[dtype]), f'{name}: {err}'


# ----------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(rng, layout, dtype):
    check_against_reference(rng, layout, dtype, 'cpu')


@pytest.mark.parametrize('levels', [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize('points', [1, 4, 9])
def test_cpu_levels_and_points(rng, levels, points):
    shapes = [(7 - lvl, 4 + lvl) for lvl in range(levels)]
    for layout in ('flash', 'mmcv'):
        check_against_reference(rng, layout, torch.float64, 'cpu', n=1, len_q=4, heads=2, d=3, shapes=shapes,
                                points=points)


@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cpu_gradcheck(rng, layout):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 3, 2, 3, ((3, 4), (2, 2)), 2)
    value.requires_grad_()
    if layout == 'flash':
        sla.requires_grad_()
        assert torch.autograd.gradcheck(lambda v, s: flash_deform_attn(v, ss, lsi, s, 2), (value, sla))
    else:
        loc.requires_grad_()
        weights.requires_grad_()
        assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, ss, lsi, l, w), (value, loc, weights))


@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cpu_points_outside_levels(rng, layout):
    """Points outside their level contribute nothing and get zero location and weight gradients."""
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 5, 2, 4, ((4, 5), (2, 3)), 3)
    # Every location outside: x <= -0.5/W ... beyond the strict (-1, W) pixel window.
    outside = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    loc = outside[torch.randint(0, 2, loc.shape, generator=rng)]
    sla = torch.cat([loc.reshape(2, 5, 2, -1), sla[..., loc[0, 0, 0].numel():]], -1)
    grad = torch.randn(2, 5, 8, generator=rng, dtype=torch.float64)
    out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, 3, grad)
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_cpu_partly_outside_matches_reference(rng):
    """Locations straddling the borders (the strict -1 < x < W window and missing corners)."""
    for layout in ('flash', 'mmcv'):
        value, ss, lsi, sla, loc, weights = make_inputs(rng, 1, 40, 2, 3, ((3, 2), (1, 1)), 4, low=-1.0,
                                                        high=2.0)
        grad = torch.randn(1, 40, 6, generator=rng, dtype=torch.float64)
        out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, 4, grad)
        ref, ref_grads = run_reference(layout, value, ss, lsi, sla, loc, weights, 4, grad)
        assert rel_err(out, ref) < 1e-12
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r) < 1e-10


@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cpu_batch_consistency_bitwise(rng, layout):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 3, 9, 2, 8, ((6, 5), (3, 3)), 2, torch.float32)
    grad = torch.randn(3, 9, 16, generator=rng)
    out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, 2, grad)
    for i in range(3):
        one = (t[i:i + 1] for t in (value, sla, loc, weights))
        v, s, l, w = one
        out_i, grads_i = run_layout(layout, v, ss, lsi, s, l, w, 2, grad[i:i + 1])
        assert torch.equal(out[i:i + 1], out_i)
        for g, g_i in zip(grads, grads_i):
            assert torch.equal(g[i:i + 1], g_i)


def test_cpu_deterministic_mode_repeats(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 30, 4, 8, ((6, 5), (3, 3)), 4, torch.float32)
    grad = torch.randn(2, 30, 32, generator=rng)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_layout('flash', value, ss, lsi, sla, loc, weights, 4, grad)[1]
        second = run_layout('flash', value, ss, lsi, sla, loc, weights, 4, grad)[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_nan_location_propagates(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 1, 3, 2, 4, ((3, 3),), 2)
    loc[0, 1, 0, 0, 1, 0] = float('nan')
    out = ms_deform_attn(value, ss, lsi, loc, weights)
    ref = ms_deform_attn_reference(value, ss, lsi, loc, weights)
    assert torch.isnan(out[0, 1, :4]).all() and torch.isfinite(out[0, 1, 4:]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


def test_cpu_nan_weight_of_outside_point_is_ignored(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 1, 2, 1, 4, ((3, 3),), 2)
    loc[0, 0, 0, 0, 0] = torch.tensor([5.0, 5.0], dtype=torch.float64)
    weights[0, 0, 0, 0, 0] = float('nan')
    out = ms_deform_attn(value, ss, lsi, loc, weights)
    assert torch.isfinite(out).all()
    assert rel_err(out, ms_deform_attn_reference(value, ss, lsi, loc, weights)) < 1e-12


def test_cpu_empty_queries(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 0, 2, 4, ((3, 3),), 2)
    value.requires_grad_()
    sla.requires_grad_()
    out = flash_deform_attn(value, ss, lsi, sla, 2)
    assert out.shape == (2, 0, 8)
    out.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))


def test_cpu_non_contiguous_inputs(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 6, 2, 4, ((4, 3), (2, 2)), 2)
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    sla_nc = torch.cat([sla, sla], -1)[..., :sla.shape[-1]]
    assert not value_nc.is_contiguous() and not sla_nc.is_contiguous()
    out = flash_deform_attn(value_nc, ss, lsi, sla_nc, 2)
    assert torch.equal(out, flash_deform_attn(value, ss, lsi, sla, 2))


def test_cpu_int32_and_cpu_tables_accepted(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 1, 4, 2, 4, ((4, 3), (2, 2)), 2)
    out = flash_deform_attn(value, ss.int(), lsi.int(), sla, 2)
    assert torch.equal(out, flash_deform_attn(value, ss, lsi, sla, 2))


def test_cpu_compile_fullgraph(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 5, 2, 4, ((4, 3), (2, 2)), 2, torch.float32)

    def fn(v, s, l, w):
        return flash_deform_attn(v, ss, lsi, s, 2).sum(-1) + ms_deform_attn(v, ss, lsi, l, w).mean(-1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    inputs = [t.clone().requires_grad_() for t in (value, sla, loc, weights)]
    out = compiled(*inputs)
    out.sum().backward()
    eager_inputs = [t.clone().requires_grad_() for t in (value, sla, loc, weights)]
    eager = fn(*eager_inputs)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for a, b in zip(inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
def test_cpu_compile_inductor(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 5, 2, 4, ((4, 3), (2, 2)), 2, torch.float32)

    def fn(v, s):
        return (flash_deform_attn(v * 2, ss, lsi, s, 2) ** 2).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    inputs = [t.clone().requires_grad_() for t in (value, sla)]
    compiled(*inputs).backward()
    eager_inputs = [t.clone().requires_grad_() for t in (value, sla)]
    fn(*eager_inputs).backward()
    for a, b in zip(inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad)


def test_cpu_opcheck(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 3, 2, 4, ((3, 3), (2, 2)), 2)
    torch.library.opcheck(torch.ops.mmdcnv4.flash_deform_attn_forward.default,
                          (value.requires_grad_(), ss, lsi, sla.requires_grad_(), 2))
    torch.library.opcheck(torch.ops.mmdcnv4.ms_deform_attn_forward.default,
                          (value, ss, lsi, loc.requires_grad_(), weights.requires_grad_()))


@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cpu_autograd_kernel_is_cpp(rng, layout):
    """The ops' own (C++) autograd kernels: torch.ops callers get the wrappers' gradients, computed by the
    backward ops on the contiguous grad_output."""
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 5, 3, 4, ((4, 3), (2, 2)), 2)
    if layout == 'flash':
        op, backward, node = (torch.ops.mmdcnv4.flash_deform_attn_forward, torch.ops.mmdcnv4.flash_deform_attn_backward,
                              'FlashDeformAttnFunction')
        sampling, extra = (sla,), (2,)
        wrapper = lambda v, s: flash_deform_attn(v, ss, lsi, s, 2)  # noqa: E731
    else:
        op, backward, node = (torch.ops.mmdcnv4.ms_deform_attn_forward, torch.ops.mmdcnv4.ms_deform_attn_backward,
                              'MsDeformAttnFunction')
        sampling, extra = (loc, weights), ()
        wrapper = lambda v, l, w: ms_deform_attn(v, ss, lsi, l, w)  # noqa: E731
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), 'Autograd')
    inputs = [t.clone().requires_grad_() for t in (value, *sampling)]
    out = op(inputs[0], ss, lsi, *inputs[1:], *extra)
    # A Python autograd formula (torch.library.register_autograd) would show up as another node type.
    assert out.grad_fn.name().startswith('torch::autograd::CppNode<') and node in out.grad_fn.name()
    grad = torch.randn(out.shape[:2] + (2 * out.shape[2],), generator=rng, dtype=out.dtype)[..., ::2]
    assert not grad.is_contiguous()
    got = torch.autograd.grad(out, inputs, grad)
    wrapper_inputs = [t.clone().requires_grad_() for t in (value, *sampling)]
    wrapper_out = wrapper(*wrapper_inputs)
    assert torch.equal(out, wrapper_out)
    want = torch.autograd.grad(wrapper_out, wrapper_inputs, grad)
    direct = backward(value, ss, lsi, *sampling, grad.contiguous(), *extra, False)
    assert len(got) == len(want) == len(direct)
    for g, wg, dg in zip(got, want, direct):
        assert torch.equal(g, wg) and torch.equal(g, dg)
    with torch.no_grad():
        assert op(inputs[0], ss, lsi, *inputs[1:], *extra).grad_fn is None


def test_bad_inputs(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 3, 2, 4, ((3, 3), (2, 2)), 2)
    with pytest.raises(TypeError, match='value must be a torch.Tensor'):
        flash_deform_attn(value.numpy(), ss, lsi, sla, 2)
    with pytest.raises(ValueError, match='value must be'):
        flash_deform_attn(value[0], ss, lsi, sla, 2)
    with pytest.raises(TypeError, match='value must be float16'):
        flash_deform_attn(value.long(), ss, lsi, sla, 2)
    with pytest.raises(TypeError, match='num_points must be an int'):
        flash_deform_attn(value, ss, lsi, sla, 2.0)
    with pytest.raises(ValueError, match='num_points must be >= 1'):
        flash_deform_attn(value, ss, lsi, sla, 0)
    with pytest.raises(ValueError, match='3 \\* L \\* P'):
        flash_deform_attn(value, ss, lsi, sla, 3)
    with pytest.raises(ValueError, match='batch'):
        flash_deform_attn(value, ss, lsi, sla[:1], 2)
    with pytest.raises(TypeError, match='same dtype'):
        flash_deform_attn(value, ss, lsi, sla.float(), 2)
    with pytest.raises(TypeError, match='spatial_shapes must be an integer'):
        flash_deform_attn(value, ss.float(), lsi, sla, 2)
    with pytest.raises(ValueError, match='spatial_shapes must be \\(L, 2\\)'):
        flash_deform_attn(value, ss.reshape(-1), lsi, sla, 2)
    with pytest.raises(ValueError, match='one entry per level'):
        flash_deform_attn(value, ss, lsi[:1], sla, 2)
    with pytest.raises(ValueError, match='sum of H\\*W'):
        flash_deform_attn(value[:, :-1], ss, lsi, sla, 2)
    with pytest.raises(ValueError, match='exclusive prefix sums'):
        flash_deform_attn(value, ss, lsi + 1, sla, 2)
    with pytest.raises(ValueError, match='positive'):
        flash_deform_attn(value, torch.tensor([[0, 9], [3, 2]]), lsi, sla, 2)
    with pytest.raises(ValueError, match='sampling_locations must be'):
        ms_deform_attn(value, ss, lsi, loc[..., :1, :, :], weights)
    with pytest.raises(ValueError, match='attention_weights must be'):
        ms_deform_attn(value, ss, lsi, loc, weights[..., :1])
    with pytest.raises(TypeError, match='same dtype'):
        ms_deform_attn(value, ss, lsi, loc, weights.float())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match='device'):
            flash_deform_attn(value, ss, lsi, sla.cuda(), 2)
    # Direct torch.ops callers get an error, never an out-of-bounds read.
    with pytest.raises(RuntimeError, match='does not fit'):
        torch.ops.mmdcnv4.flash_deform_attn_forward(value, ss, lsi + 100, sla, 2)
    # check_levels=False skips the contents check; the CPU kernel still refuses unsafe tables.
    with pytest.raises(RuntimeError, match='does not fit'):
        flash_deform_attn(value[:, :-1], ss, lsi, sla, 2, check_levels=False)


def test_autocast_promotes_mixed_dtypes(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 1, 3, 2, 4, ((3, 3),), 2, torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = flash_deform_attn(value.bfloat16(), ss, lsi, sla, 2)
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# The module against mmcv's MultiScaleDeformableAttention
# ----------------------------------------------------------------------------------------------------
def _mmcv_msda():
    mmcv_ops = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
    return mmcv_ops.MultiScaleDeformableAttention


def _module_pair(embed_dims=32, num_heads=4, num_levels=2, num_points=3, batch_first=False, seed=0):
    from mmdcnv4.ops.ms_deform_attn_module import FlashMultiScaleDeformableAttention
    mmcv_cls = _mmcv_msda()
    kwargs = dict(embed_dims=embed_dims, num_heads=num_heads, num_levels=num_levels, num_points=num_points,
                  dropout=0.0, batch_first=batch_first)
    torch.manual_seed(seed)
    theirs = mmcv_cls(**kwargs)
    torch.manual_seed(seed)
    ours = FlashMultiScaleDeformableAttention(**kwargs)
    return theirs, ours


def test_module_init_and_state_dict_match_mmcv():
    theirs, ours = _module_pair()
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    import inspect
    assert inspect.signature(type(theirs).__init__).parameters.keys() == \
        inspect.signature(type(ours).__init__).parameters.keys()
    assert inspect.signature(theirs.forward).parameters.keys() == inspect.signature(ours.forward).parameters.keys()


def _module_inputs(gen, bs, num_query, embed_dims, shapes, box, batch_first, device='cpu',
                   dtype=torch.float64):
    ss, lsi, len_in = levels_of(shapes, device)
    query = torch.randn(bs, num_query, embed_dims, generator=gen, dtype=torch.float64)
    value = torch.randn(bs, len_in, embed_dims, generator=gen, dtype=torch.float64)
    ref = torch.rand(bs, num_query, len(shapes), 4 if box else 2, generator=gen, dtype=torch.float64)
    mask = torch.rand(bs, len_in, generator=gen) < 0.2
    if not batch_first:
        query, value = query.transpose(0, 1), value.transpose(0, 1)
    to = dict(device=device, dtype=dtype)
    return query.to(**to), value.to(**to), ref.to(**to), mask.to(device), ss, lsi


def _compare_modules(gen, theirs, ours, shapes, box, batch_first, device, dtype, out_tol, grad_tol):
    with torch.no_grad():  # non-trivial attention: perturb the zero-initialised projections
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) * 0.1)
    ours.load_state_dict(theirs.state_dict())
    theirs.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    query, value, ref, mask, ss, lsi = _module_inputs(gen, 2, 11, theirs.embed_dims, shapes, box, batch_first,
                                                      device, dtype)
    results = []
    for module in (theirs, ours):
        q = query.clone().requires_grad_()
        v = value.clone().requires_grad_()
        out = module(q, value=v, reference_points=ref, spatial_shapes=ss, level_start_index=lsi,
                     key_padding_mask=mask)
        grad = torch.ones_like(out) + torch.arange(out.numel(), device=device).reshape(out.shape).to(dtype) % 3
        grads = torch.autograd.grad(out, [q, v] + list(module.parameters()), grad)
        results.append((out.detach(), grads))
    (out_a, grads_a), (out_b, grads_b) = results
    assert out_a.shape == out_b.shape
    assert rel_err(out_b, out_a) < out_tol, rel_err(out_b, out_a)
    for ga, gb in zip(grads_a, grads_b):
        assert rel_err(gb, ga) < grad_tol, rel_err(gb, ga)


@pytest.mark.parametrize('box', [False, True])
@pytest.mark.parametrize('batch_first', [False, True])
def test_module_matches_mmcv_cpu(rng, box, batch_first):
    theirs, ours = _module_pair(batch_first=batch_first)
    _compare_modules(rng, theirs, ours, ((5, 6), (3, 3)), box, batch_first, 'cpu', torch.float64, 1e-10, 1e-9)


def test_module_registry_and_swap(rng):
    from mmengine.registry import MODELS

    from mmdcnv4.ops.ms_deform_attn_module import FlashMultiScaleDeformableAttention, replace_ms_deform_attn
    module = MODELS.build(dict(type='FlashMultiScaleDeformableAttention', embed_dims=32, num_heads=4,
                               num_levels=2, num_points=3))
    assert isinstance(module, FlashMultiScaleDeformableAttention)
    mmdet_registry = pytest.importorskip('mmdet.registry')
    assert isinstance(mmdet_registry.MODELS.build(dict(type='FlashMultiScaleDeformableAttention', embed_dims=32,
                                                       num_heads=4)), FlashMultiScaleDeformableAttention)

    theirs, _ = _module_pair(batch_first=True)
    theirs.eval()
    container = torch.nn.ModuleDict({'attn': theirs, 'other': torch.nn.Linear(2, 2)})
    params = {id(p) for p in container.parameters()}
    query, value, ref, mask, ss, lsi = _module_inputs(rng, 2, 5, 32, ((5, 6), (3, 3)), False, True,
                                                      dtype=torch.float32)
    before = theirs(query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=lsi)
    assert replace_ms_deform_attn(container) == 1
    assert isinstance(container['attn'], FlashMultiScaleDeformableAttention)
    assert {id(p) for p in container.parameters()} == params
    after = container['attn'](query, value=value, reference_points=ref, spatial_shapes=ss, level_start_index=lsi)
    assert rel_err(after, before) < 1e-5


def test_hook_swaps_after_init():
    from mmdcnv4.ops.ms_deform_attn_module import FlashMSDAHook, FlashMultiScaleDeformableAttention
    theirs, _ = _module_pair()

    class Runner:
        model = torch.nn.Sequential(theirs)
        logger = type('Logger', (), {'info': staticmethod(lambda message: None)})()

    hook = FlashMSDAHook()
    hook.before_train(Runner)
    assert isinstance(Runner.model[0], FlashMultiScaleDeformableAttention)
    hook.before_test(Runner)  # idempotent
    assert isinstance(Runner.model[0], FlashMultiScaleDeformableAttention)


# ----------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------
CUDA_CASES = [  # (n, len_q, heads, d, shapes, points): vector paths with 4/8/16/32 lanes, scalar paths,
    (2, 37, 3, 32, ((9, 11), (5, 6), (3, 3), (1, 2)), 4),   # several channel blocks, odd sizes
    (1, 19, 2, 8, ((7, 5),), 1),
    (3, 23, 5, 20, ((6, 7), (3, 4), (2, 2)), 3),
    (2, 17, 2, 64, ((8, 8), (4, 4)), 2),
    (1, 13, 2, 7, ((5, 9), (2, 3), (1, 1), (3, 2), (2, 2)), 8),
    (2, 11, 1, 264, ((4, 5), (2, 2)), 2),
    (1, 9, 2, 40, ((6, 6), (3, 3), (2, 2), (1, 1), (4, 4)), 16),  # L*P = 80: the global stash
]


@cuda
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize('case', range(len(CUDA_CASES)))
def test_cuda_matches_reference(rng, layout, dtype, case):
    n, len_q, heads, d, shapes, points = CUDA_CASES[case]
    check_against_reference(rng, layout, dtype, 'cuda', n, len_q, heads, d, shapes, points)


@cuda
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cuda_gradcheck(rng, layout):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 3, 2, 4, ((3, 4), (2, 2)), 2, device='cuda')
    value.requires_grad_()
    # The value gradient is summed by fp64 atomics: repeated backwards agree to rounding, not bit for bit.
    if layout == 'flash':
        sla.requires_grad_()
        assert torch.autograd.gradcheck(lambda v, s: flash_deform_attn(v, ss, lsi, s, 2), (value, sla),
                                        nondet_tol=1e-12)
    else:
        loc.requires_grad_()
        weights.requires_grad_()
        assert torch.autograd.gradcheck(lambda v, l, w: ms_deform_attn(v, ss, lsi, l, w), (value, loc, weights),
                                        nondet_tol=1e-12)


@cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cuda_matches_cpu(rng, dtype):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 50, 4, 16, ((10, 12), (5, 6), (3, 3)), 4, dtype)
    grad = torch.randn(2, 50, 64, generator=rng, dtype=torch.float64).to(dtype)
    cpu = run_layout('flash', value, ss, lsi, sla, loc, weights, 4, grad)
    gpu = run_layout('flash', *(t.cuda() for t in (value, ss, lsi, sla, loc, weights)), 4, grad.cuda())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(gpu[0], cpu[0]) < tol
    for a, b in zip(gpu[1], cpu[1]):
        assert rel_err(a, b) < tol * 10


@cuda
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
def test_cuda_points_outside_levels(rng, layout):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 33, 2, 16, ((4, 5), (2, 3)), 3, torch.float32, 'cuda')
    outside = torch.tensor([-1.0, 2.0], dtype=torch.float32, device='cuda')
    loc = outside[torch.randint(0, 2, loc.shape, generator=rng).cuda()]
    sla = torch.cat([loc.reshape(2, 33, 2, -1), sla[..., 2 * 2 * 3:]], -1)
    grad = torch.randn(2, 33, 32, device='cuda')
    out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, 3, grad)
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@cuda
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_batch_consistency_bitwise(rng, layout, dtype):
    """A batched call equals the per-image calls bit for bit (no block straddles two images)."""
    n = 5
    value, ss, lsi, sla, loc, weights = make_inputs(rng, n, 301, 8, 32, ((20, 30), (10, 15), (5, 8), (3, 4)), 4,
                                                    dtype, 'cuda')
    grad = torch.randn(n, 301, 256, device='cuda').to(dtype)
    out, grads = run_layout(layout, value, ss, lsi, sla, loc, weights, 4, grad)
    for i in range(n):
        v, s, l, w = (t[i:i + 1] for t in (value, sla, loc, weights))
        out_i, grads_i = run_layout(layout, v, ss, lsi, s, l, w, 4, grad[i:i + 1])
        assert torch.equal(out[i:i + 1], out_i)
        for g, g_i in zip(grads[1:], grads_i[1:]):  # sampling gradients: no atomics, bit for bit
            assert torch.equal(g[i:i + 1], g_i)
        assert rel_err(grads[0][i:i + 1], grads_i[0]) < GRAD_TOL[dtype]


@cuda
@pytest.mark.parametrize('layout', ['flash', 'mmcv'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.float64])
def test_cuda_deterministic_mode(rng, layout, dtype):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 500, 8, 32, ((20, 30), (10, 15)), 4, dtype, 'cuda',
                                                    low=0.3, high=0.5)  # many collisions
    grad = torch.randn(2, 500, 256, device='cuda').to(dtype)
    default = run_layout(layout, value, ss, lsi, sla, loc, weights, 4, grad)[1]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_layout(layout, value, ss, lsi, sla, loc, weights, 4, grad)[1]
        second = run_layout(layout, value, ss, lsi, sla, loc, weights, 4, grad)[1]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b, c in zip(first, second, default):
        assert torch.equal(a, b)
        assert rel_err(a, c) < GRAD_TOL[dtype] + (1e-9 if dtype == torch.float64 else 0)


@cuda
def test_cuda_graph_capture_deterministic_backward(rng):
    """Forward and deterministic backward never synchronise with the host: they can be captured."""
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 64, 4, 32, ((8, 9), (4, 5)), 4, torch.float32, 'cuda')
    grad = torch.randn(2, 64, 128, device='cuda')
    ops = torch.ops.mmdcnv4

    def step():
        out = ops.flash_deform_attn_forward(value, ss, lsi, sla, 4)
        return (out,) + tuple(ops.flash_deform_attn_backward(value, ss, lsi, sla, grad, 4, True))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@cuda
def test_cuda_bad_inputs(rng):
    """CUDA calls with device tables go straight to the op; a failure must still give the precise error."""
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 3, 2, 4, ((3, 3), (2, 2)), 2, torch.float32, 'cuda')
    cases = [
        (lambda: flash_deform_attn(value[0], ss, lsi, sla, 2), ValueError, 'value must be'),
        (lambda: flash_deform_attn(value.long(), ss, lsi, sla, 2), TypeError, 'value must be float16'),
        (lambda: flash_deform_attn(value, ss, lsi, sla, 2.0), TypeError, 'num_points must be an int'),
        (lambda: flash_deform_attn(value, ss, lsi, sla, True), TypeError, 'num_points must be an int'),
        (lambda: flash_deform_attn(value, ss, lsi, sla, 0), ValueError, 'num_points must be >= 1'),
        (lambda: flash_deform_attn(value, ss, lsi, sla, 3), ValueError, '3 \\* L \\* P'),
        (lambda: flash_deform_attn(value, ss, lsi, sla[:1], 2), ValueError, 'batch'),
        (lambda: flash_deform_attn(value, ss, lsi, sla.double(), 2), TypeError, 'same dtype'),
        (lambda: flash_deform_attn(value, ss.float(), lsi, sla, 2), TypeError, 'spatial_shapes must be an integer'),
        (lambda: flash_deform_attn(value, ss.reshape(-1), lsi, sla, 2), ValueError,
         'spatial_shapes must be \\(L, 2\\)'),
        (lambda: flash_deform_attn(value, ss, lsi[:1], sla, 2), ValueError, 'one entry per level'),
        (lambda: flash_deform_attn(value, ss, lsi, sla.cpu(), 2), ValueError, 'device'),
        (lambda: ms_deform_attn(value, ss, lsi, loc[..., :1, :, :], weights), ValueError, 'sampling_locations must be'),
        (lambda: ms_deform_attn(value, ss, lsi, loc, weights[..., :1]), ValueError, 'attention_weights must be'),
        (lambda: ms_deform_attn(value, ss, lsi, loc, weights.double()), TypeError, 'same dtype'),
        (lambda: ms_deform_attn(value, ss, lsi, loc, weights.cpu()), ValueError, 'device'),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


@cuda
def test_cuda_calls_skip_the_python_checks(rng, monkeypatch):
    """Device tables: straight to the op (host time). CPU tables: checked (and moved) in Python."""
    msda_module = importlib.import_module('mmdcnv4.ops.ms_deform_attn')  # (mmdcnv4.ops.ms_deform_attn: the function)
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 5, 2, 8, ((4, 5), (2, 3)), 2, torch.float32, 'cuda')
    want_flash = flash_deform_attn(value, ss, lsi, sla, 2)
    want_mmcv = ms_deform_attn(value, ss, lsi, loc, weights)
    torch.testing.assert_close(want_flash, want_mmcv)

    def fail(*args):
        raise AssertionError('the Python checks ran')
    monkeypatch.setattr(msda_module, '_level_tables', fail)
    assert torch.equal(flash_deform_attn(value, ss, lsi, sla, 2), want_flash)
    assert torch.equal(ms_deform_attn(value, ss, lsi, loc, weights), want_mmcv)
    for call in (lambda: flash_deform_attn(value, ss.cpu(), lsi.cpu(), sla, 2),
                 lambda: flash_deform_attn(value, ss, lsi, sla, 2, check_levels=True),
                 lambda: ms_deform_attn(value, ss.cpu(), lsi.cpu(), loc, weights)):
        with pytest.raises(AssertionError, match='Python checks'):
            call()


@cuda
def test_cuda_inconsistent_tables_are_safe(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 20, 2, 8, ((4, 5), (2, 3)), 2, torch.float32, 'cuda')
    bad = lsi.clone()
    bad[1] = 10 ** 6  # level 1 outside value: contributes nothing
    out = flash_deform_attn(value, ss, bad, sla, 2, check_levels=False)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match='exclusive prefix sums'):
        flash_deform_attn(value, ss, bad, sla, 2, check_levels=True)


@cuda
def test_cuda_misaligned_and_empty(rng):
    value, ss, lsi, sla, loc, weights = make_inputs(rng, 2, 21, 2, 32, ((6, 5), (3, 3)), 2, torch.float32, 'cuda')
    storage = torch.empty(value.numel() + 1, device='cuda')
    shifted = storage[1:].view(value.shape)  # 4-byte aligned only: the scalar kernels
    shifted.copy_(value)
    torch.testing.assert_close(flash_deform_attn(shifted, ss, lsi, sla, 2), flash_deform_attn(value, ss, lsi, sla, 2))
    empty = flash_deform_attn(value, ss, lsi, sla[:, :0], 2)
    assert empty.shape == (2, 0, 64)


@cuda
@pytest.mark.parametrize('box', [False, True])
def test_module_matches_mmcv_cuda(rng, box):
    theirs, ours = _module_pair(embed_dims=64, num_heads=4, num_levels=3, num_points=4)
    try:
        mmcv_ops = pytest.importorskip('mmcv.ops.multi_scale_deform_attn')
        probe = torch.zeros(1, 1, 1, 8, device='cuda')
        mmcv_ops.MultiScaleDeformableAttnFunction.apply(
            probe, torch.tensor([[1, 1]], device='cuda'), torch.tensor([0], device='cuda'),
            torch.zeros(1, 1, 1, 1, 1, 2, device='cuda'), torch.ones(1, 1, 1, 1, 1, device='cuda'), 64)
    except (RuntimeError, AttributeError) as err:
        pytest.skip(f'mmcv has no CUDA MSDA here: {err}')
    _compare_modules(rng, theirs, ours, ((9, 10), (5, 5), (3, 2)), box, False, 'cuda', torch.float32, 1e-5, 1e-4)
