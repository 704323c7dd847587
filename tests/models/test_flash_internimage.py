"""FlashInternImage: sizes, parameter counts and keys of the spec, upstream's formulation, checkpoint
loading, out_indices, freezing, checkpointing, autocast, torch.compile and registry builds.

Big models are built on the meta device where only their structure matters; behaviour is tested on a
small custom size (``TINY``) and, where the spec names it, on T with a small input.
"""
import copy
import re

import pytest
import torch
import torch.nn.functional as F

import mmdcnv4  # noqa: F401  (registers the models)
from mmdcnv4.models import FlashInternImage, FlashInternImageCls
from mmdcnv4.models.backbones.flash_internimage import filter_upstream_state_dict

# Spec section 2: parameters with the 1k head and backbone only.
SPEC_PARAMS = {
    't': (29_815_528, 28_651_776),
    's': (50_067_496, 48_490_176),
    'b': (97_448_960, 94_897_048),
    'l': (223_297_080, 218_914_640),
}
SPEC_SIZES = {  # channels, depths, layer_scale set, post_norm, dw conv, output/fc2 bias
    't': (64, (4, 4, 18, 4), False, False, False, False),
    's': (80, (4, 4, 21, 4), True, True, True, False),
    'b': (112, (4, 4, 21, 4), True, True, True, False),
    'l': (160, (5, 5, 22, 5), True, True, True, True),
}
# A small FlashInternImage (group width 16 as in every preset) for behavioural tests.
TINY = dict(channels=32, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16))


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomize(model, gen, offset_std=0.2):
    """Fresh random values for every parameter, offsets included (a new model's DCNv4 outputs zero)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if 'norm' in name and name.endswith('weight') or 'gamma' in name:
                param.copy_(1 + 0.2 * noise)
            elif '.offset_mask.' in name:
                param.copy_(offset_std * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def image(gen, n=2, size=64, dtype=torch.float32):
    return torch.randn(n, 3, size, size, generator=gen, dtype=dtype)


# --- sizes, parameter counts, keys --------------------------------------------------------------------


@pytest.mark.parametrize('arch', 'tsbl')
def test_parameter_counts_match_spec(arch):
    with torch.device('meta'):
        backbone = FlashInternImage(arch)
        classifier = FlashInternImageCls(arch)
    assert (count(classifier), count(backbone)) == SPEC_PARAMS[arch]


def test_t_with_layer_scale_has_gammas():
    with torch.device('meta'):
        model = FlashInternImage('t', layer_scale=1.0)
    assert count(model) == 28_666_624
    assert all(torch.equal(block.gamma1, torch.ones_like(block.gamma1))
               for level in FlashInternImage('t', layer_scale=1.0, depths=(1, 1, 1, 1)).levels
               for block in level.blocks)


def expected_keys(arch, with_head):
    """Spec section 3, written out for one size."""
    channels, depths, layer_scale, post_norm, dw, bias = SPEC_SIZES[arch]
    keys = {f'patch_embed.{m}.{p}' for m in ('conv1', 'norm1.1', 'conv2', 'norm2.1') for p in ('weight', 'bias')}
    for i, depth in enumerate(depths):
        for j in range(depth):
            block = f'levels.{i}.blocks.{j}'
            keys |= {f'{block}.{m}.{p}' for m in ('norm1.0', 'norm2.0', 'dcn.offset_mask', 'dcn.value_proj',
                                                  'mlp.fc1') for p in ('weight', 'bias')}
            keys |= {f'{block}.dcn.output_proj.weight', f'{block}.mlp.fc2.weight'}
            if bias:
                keys |= {f'{block}.dcn.output_proj.bias', f'{block}.mlp.fc2.bias'}
            if dw:
                keys |= {f'{block}.dcn.offset_mask_dw.weight', f'{block}.dcn.offset_mask_dw.bias'}
            if layer_scale:
                keys |= {f'{block}.gamma1', f'{block}.gamma2'}
        if not post_norm:
            keys |= {f'levels.{i}.norm.0.weight', f'levels.{i}.norm.0.bias'}
        if i < 3:
            keys |= {f'levels.{i}.downsample.conv.weight', f'levels.{i}.downsample.norm.1.weight',
                     f'levels.{i}.downsample.norm.1.bias'}
    if with_head:
        keys |= {'conv_head.0.weight', 'head.weight', 'head.bias'}
        keys |= {f'conv_head.1.0.{p}' for p in ('weight', 'bias', 'running_mean', 'running_var',
                                                'num_batches_tracked')}
    return keys


@pytest.mark.parametrize('arch', 'tsbl')
def test_state_dict_keys_match_spec(arch):
    with torch.device('meta'):
        backbone = FlashInternImage(arch)
        classifier = FlashInternImageCls(arch)
    assert set(backbone.state_dict()) == expected_keys(arch, with_head=False)
    assert set(classifier.state_dict()) == expected_keys(arch, with_head=True)


@pytest.mark.parametrize('arch', 'tsbl')
def test_offset_mask_widths(arch):
    with torch.device('meta'):
        model = FlashInternImage(arch)
    widths = {'t': (112, 216, 432, 864), 's': (136, 272, 544, 1080), 'b': (192, 384, 760, 1512),
              'l': (272, 544, 1080, 2160)}[arch]
    assert tuple(level.blocks[0].dcn.offset_mask.out_features for level in model.levels) == widths


def test_arch_errors_and_overrides():
    with pytest.raises(ValueError, match='unknown FlashInternImage arch'):
        FlashInternImage('h')
    with pytest.raises(ValueError, match='core_op'):
        FlashInternImage('t', core_op='DCNv3')
    with pytest.raises(ValueError, match='out_indices'):
        FlashInternImage('t', out_indices=(4,))
    with torch.device('meta'):
        model = FlashInternImage('tiny', channels=80, groups=(5, 10, 20, 40), post_norm=True,
                                 layer_scale=None, dw_kernel_size=3)
    assert model.channels == 80 and model.levels[0].norm is None
    assert model.levels[2].blocks[0].gamma1 is None
    assert model.levels[2].blocks[0].dcn.offset_mask_dw.kernel_size == (3, 3)


# --- forward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('arch,size', [('t', 64), ('s', 64), ('b', 32), ('l', 32)])
def test_forward_shapes(arch, size, rng):
    # Built on meta and filled with random values: the truncated-normal initialisation of B and L alone
    # takes seconds on a small CPU.
    with torch.device('meta'):
        model = FlashInternImage(arch)
    model = randomize(model.to_empty(device='cpu'), rng, offset_std=0.02).eval()
    with torch.no_grad():
        outs = model(image(rng, n=1, size=size))
    channels = SPEC_SIZES[arch][0]
    assert [tuple(o.shape) for o in outs] == [(1, channels * 2 ** i, size // 4 // 2 ** i, size // 4 // 2 ** i)
                                              for i in range(4)]
    assert all(o.is_contiguous() and torch.isfinite(o).all() for o in outs)


def reference_forward(model, img):
    """Spec section 1 as upstream computes it: tokens (N, H*W, C) between blocks, explicit permutes."""
    def ln(x, norm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, 1e-6)

    def mlp(x, m):
        return F.linear(F.gelu(F.linear(x, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)

    stem = model.patch_embed
    x = F.conv2d(img, stem.conv1.weight, stem.conv1.bias, stride=2, padding=1)
    x = F.gelu(ln(x.permute(0, 2, 3, 1), stem.norm1[1]).permute(0, 3, 1, 2))
    x = F.conv2d(x, stem.conv2.weight, stem.conv2.bias, stride=2, padding=1)
    x = ln(x.permute(0, 2, 3, 1), stem.norm2[1])
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    outs = []
    for level in model.levels:
        for blk in level.blocks:
            g1 = 1. if blk.gamma1 is None else blk.gamma1
            g2 = 1. if blk.gamma2 is None else blk.gamma2
            if blk.post_norm:
                x = x + g1 * ln(blk.dcn(x, shape=(h, w)), blk.norm1[0])
                x = x + g2 * ln(mlp(x, blk.mlp), blk.norm2[0])
            else:
                x = x + g1 * blk.dcn(ln(x, blk.norm1[0]), shape=(h, w))
                x = x + g2 * mlp(ln(x, blk.norm2[0]), blk.mlp)
        if level.norm is not None:
            x = ln(x, level.norm[0])
        outs.append(x.reshape(n, h, w, -1).permute(0, 3, 1, 2))
        if level.downsample is not None:
            x = F.conv2d(x.reshape(n, h, w, -1).permute(0, 3, 1, 2), level.downsample.conv.weight, stride=2,
                         padding=1)
            x = ln(x.permute(0, 2, 3, 1), level.downsample.norm[1])
            n, h, w, c = x.shape
            x = x.reshape(n, h * w, c)
    return outs


@pytest.mark.parametrize('variant', [
    dict(post_norm=False, layer_scale=None, dw_kernel_size=None, offset_scale=1.0),  # T
    dict(post_norm=False, layer_scale=1.0, dw_kernel_size=None, offset_scale=1.0),  # T in the det configs
    dict(post_norm=True, layer_scale=1e-5, dw_kernel_size=3, offset_scale=0.5),  # S/B
    dict(post_norm=True, layer_scale=1.0, dw_kernel_size=3, offset_scale=2.0, dcn_output_bias=True,
         mlp_fc2_bias=True),  # L
])
def test_matches_upstream_formulation(variant, rng):
    model = randomize(FlashInternImage('t', **TINY, **variant), rng).double().eval()
    img = image(rng, size=48, dtype=torch.float64)
    with torch.no_grad():
        ours = model(img)
        ref = reference_forward(model, img)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_out_indices_select_levels_and_skip_later_ones(rng):
    model = randomize(FlashInternImage('t', **TINY), rng).eval()
    picked = FlashInternImage('t', **TINY, out_indices=(3, 1)).eval()
    first = FlashInternImage('t', **TINY, out_indices=-3).eval()
    picked.load_state_dict(model.state_dict())
    first.load_state_dict(model.state_dict())
    calls = []
    first.levels[2].register_forward_hook(lambda *args: calls.append(1))
    img = image(rng)
    with torch.no_grad():
        full, two, one = model(img), picked(img), first(img)
    assert picked.out_indices == (1, 3) and first.out_indices == (1,)
    assert len(two) == 2 and torch.equal(two[0], full[1]) and torch.equal(two[1], full[3])
    assert len(one) == 1 and torch.equal(one[0], full[1]) and not calls


def test_classifier_head(rng):
    model = randomize(FlashInternImageCls('t', **TINY, num_classes=7), rng).eval()
    img = image(rng)
    with torch.no_grad():
        logits = model(img)
        last = FlashInternImage.forward(model, img)[-1]
        head = model.conv_head
        expected = F.gelu(F.batch_norm(F.conv2d(last, head[0].weight), head[1][0].running_mean,
                                       head[1][0].running_var, head[1][0].weight, head[1][0].bias,
                                       eps=head[1][0].eps))
        expected = F.linear(expected.mean((2, 3)), model.head.weight, model.head.bias)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits, expected)


# --- checkpoints --------------------------------------------------------------------------------------


def test_filter_upstream_state_dict():
    t = torch.zeros(1)
    imagenet = {'model': {'module.patch_embed.conv1.weight': t, 'head.weight': t, 'conv_head.0.weight': t},
                'model_ema': {'patch_embed.conv1.bias': t, 'head.bias': t}}
    assert set(filter_upstream_state_dict(imagenet)) == {'patch_embed.conv1.bias'}
    assert set(filter_upstream_state_dict(imagenet['model'], keep_classifier=True)) == {
        'patch_embed.conv1.weight', 'head.weight', 'conv_head.0.weight'}
    detector = {'state_dict': {'backbone.levels.0.norm.0.weight': t, 'neck.fpn_convs.0.conv.weight': t,
                               'roi_head.bbox_head.fc_cls.weight': t},
                'model': {'ignored.weight': t}}
    assert set(filter_upstream_state_dict(detector)) == {'levels.0.norm.0.weight'}
    ddp = {'module.backbone.patch_embed.conv1.weight': t, 'module.decode_head.conv_seg.weight': t}
    assert set(filter_upstream_state_dict(ddp)) == {'patch_embed.conv1.weight'}


def upstream_file(tmp_path, model, wrap, prefix, extra=None):
    """Writes ``model``'s state_dict the way upstream files hold it."""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    state.update(extra or {})
    path = tmp_path / 'upstream.pth'
    torch.save(state if wrap is None else {wrap: state, 'epoch': 3}, path)
    return str(path)


@pytest.mark.parametrize('wrap,prefix', [('model', 'module.'), ('state_dict', 'backbone.'),
                                         ('state_dict', 'module.backbone.'), (None, '')])
def test_pretrained_loads_upstream_keys(tmp_path, rng, wrap, prefix):
    source = randomize(FlashInternImage('t', **TINY), rng)
    extra = {'head.weight': torch.zeros(3), 'conv_head.0.weight': torch.zeros(3)} if prefix != 'backbone.' \
        else {'neck.lateral_convs.0.conv.weight': torch.zeros(3)}
    path = upstream_file(tmp_path, source, wrap, prefix, extra)
    model = FlashInternImage('t', **TINY, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    loaded, expected = model.state_dict(), source.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    # The filtered file loads strictly: no missing and no unexpected key.
    model.load_state_dict(filter_upstream_state_dict(torch.load(path, weights_only=False)), strict=True)


def test_pretrained_prefers_model_ema_and_keeps_gammas(tmp_path, rng):
    ema = randomize(FlashInternImage('t', **TINY), rng)
    plain = randomize(FlashInternImage('t', **TINY), rng)
    path = tmp_path / 'imagenet.pth'
    torch.save({'model': plain.state_dict(), 'model_ema': ema.state_dict()}, path)
    # The detection recipes' T has layer_scale=1.0, the ImageNet T has no gammas: they stay at 1.
    model = FlashInternImage('t', **TINY, layer_scale=1.0,
                             init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    state = model.state_dict()
    for key, value in ema.state_dict().items():
        assert torch.equal(state[key], value)
    gammas = [k for k in state if 'gamma' in k]
    assert len(gammas) == 2 * sum(TINY['depths'])
    assert all(torch.equal(state[k], torch.ones_like(state[k])) for k in gammas)


def test_classifier_pretrained_keeps_head(tmp_path, rng):
    source = randomize(FlashInternImageCls('t', **TINY, num_classes=5), rng)
    path = upstream_file(tmp_path, source, 'model', '')
    model = FlashInternImageCls('t', **TINY, num_classes=5, init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    assert torch.equal(model.head.weight, source.head.weight)
    assert torch.equal(model.conv_head[1][0].running_var, source.conv_head[1][0].running_var)


# --- training-time behaviour --------------------------------------------------------------------------


def test_frozen_stages(rng):
    model = FlashInternImage('t', **TINY, frozen_stages=2, drop_path_rate=0.5)
    model.train()
    frozen = [model.patch_embed, model.levels[0], model.levels[1]]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    for module in model.levels[2:]:
        assert all(p.requires_grad for p in module.parameters())
        assert all(m.training for m in module.modules())
    # Frozen levels drop no paths even in train mode: their outputs are deterministic.
    randomize(model, rng)
    img = image(rng, n=8)
    first, second = model(img), model(img)
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[3], second[3])
    with pytest.raises(ValueError, match='frozen_stages'):
        FlashInternImage('t', **TINY, frozen_stages=5)


def test_with_cp_gives_same_outputs_and_grads(rng, monkeypatch):
    import mmdcnv4.models.backbones.flash_internimage as module
    calls = []
    original = module.cp.checkpoint
    monkeypatch.setattr(module.cp, 'checkpoint', lambda *a, **k: calls.append(k) or original(*a, **k))
    plain = randomize(FlashInternImage('t', **TINY, layer_scale=1.0), rng)
    checkpointed = FlashInternImage('t', **TINY, layer_scale=1.0, with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    img = image(rng)
    weights = [torch.randn(o.shape, generator=rng) for o in plain(img)]
    grads = []
    for model in (plain, checkpointed):
        outs = model(img)
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        with torch.no_grad():
            ref = model(img)
        assert all(torch.equal(a, b) for a, b in zip(outs, ref))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    assert grads[0]['levels.2.blocks.1.dcn.offset_mask.weight'].abs().sum() > 0
    assert len(calls) == sum(TINY['depths']) and all(not k['use_reentrant'] for k in calls)


def test_drop_path_only_in_training(rng):
    model = randomize(FlashInternImage('t', **TINY, drop_path_rate=0.5), rng)
    img = image(rng, n=8)
    model.train()
    assert not torch.equal(model(img)[-1], model(img)[-1])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(img)[-1], model(img)[-1])


def test_bf16_autocast(rng):
    # Small offsets: with large random ones, sampling positions make the random network chaotic and any
    # rounding (bf16 or not) is amplified level after level.
    model = randomize(FlashInternImage('t', **TINY, layer_scale=1.0), rng, offset_std=0.02)
    img = image(rng)
    with torch.no_grad():
        ref = model(img)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(img)
    for out, expected in zip(outs, ref):
        assert torch.isfinite(out).all()
        rel = (out.float() - expected).norm() / expected.norm()
        assert rel < 0.1
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sum(o.float().sum() for o in model(img)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compiles_without_graph_breaks(rng):
    """Dynamo traces the whole forward in one graph (backend 'eager': tracing only, no codegen)."""
    model = randomize(FlashInternImage('t', **TINY, layer_scale=1.0), rng).eval()
    img = image(rng, size=32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    with torch.no_grad():
        for a, b in zip(compiled(img), model(img)):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_matches_eager_on_t(rng):
    # The model's own initialisation with random offsets. Through T's 30 blocks fp32 rounding grows to
    # ~1e-3 at the last level, so "the same output" is measured against fp64: the compiled model must be
    # about as close to it as eager fp32 is (seen: within 2x).
    model = FlashInternImage('t').eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if '.offset_mask.' in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=rng))
    img = image(rng, n=1, size=32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=False)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(img.double())
        for out, eager, ref in zip(compiled(img), model(img), exact):
            eager_error = (eager.double() - ref).norm()
            assert (out.double() - ref).norm() <= 4 * eager_error + 1e-6 * ref.norm()


# --- registries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('codebase', ['mmdet', 'mmseg', 'mmdet3d'])
def test_builds_through_codebase_registries(codebase):
    import importlib

    from mmengine.registry import DefaultScope
    registry = importlib.import_module(f'{codebase}.registry').MODELS
    assert registry.get('FlashInternImage') is FlashInternImage
    assert registry.get(f'{codebase}.FlashInternImage') is FlashInternImage
    with DefaultScope.overwrite_default_scope(codebase), torch.device('meta'):
        model = registry.build(dict(type='FlashInternImage', arch='t', layer_scale=1.0, out_indices=(1, 2, 3)))
    assert type(model) is FlashInternImage and model.out_indices == (1, 2, 3)
    assert count(model) == 28_666_624


def test_upstream_config_builds():
    """An upstream detection config's backbone dict (mmdet 2.x) builds unchanged."""
    from mmengine.registry import MODELS
    cfg = dict(type='FlashInternImage', core_op='DCNv4', channels=80, depths=[4, 4, 21, 4],
               groups=[5, 10, 20, 40], mlp_ratio=4., drop_path_rate=0.3, norm_layer='LN', layer_scale=1.0,
               offset_scale=1.0, post_norm=True, dw_kernel_size=3, with_cp=True, out_indices=(0, 1, 2, 3))
    with torch.device('meta'):
        model = MODELS.build(copy.deepcopy(cfg))
    # S with gammas (layer_scale set either way): same count as the ImageNet S backbone.
    assert count(model) == SPEC_PARAMS['s'][1]
    assert all(re.fullmatch(r'levels\.\d\.blocks\.\d+\.(gamma[12]|norm[12]\.0\..*|dcn\..*|mlp\..*)', k)
               for k in model.state_dict() if '.blocks.' in k)


def test_registration_survives_missing_and_broken_codebases(tmp_path, monkeypatch):
    import mmdet.registry
    from mmengine.registry import MODELS

    from mmdcnv4.models.registry import register
    broken = tmp_path / 'broken_codebase'
    broken.mkdir()
    (broken / '__init__.py').write_text('')
    (broken / 'registry.py').write_text('raise RuntimeError("half-installed")\n')
    monkeypatch.syspath_prepend(str(tmp_path))

    class FlashInternImageRegistrationProbe(torch.nn.Module):
        pass

    register('MODELS', codebases=('mmdet', 'no_such_codebase', 'broken_codebase'))(
        FlashInternImageRegistrationProbe)
    assert MODELS.get('FlashInternImageRegistrationProbe') is FlashInternImageRegistrationProbe
    assert mmdet.registry.MODELS.module_dict['FlashInternImageRegistrationProbe'] is \
        FlashInternImageRegistrationProbe

    class Impostor(torch.nn.Module):
        pass

    Impostor.__name__ = 'FlashInternImageRegistrationProbe'
    with pytest.warns(RuntimeWarning, match='already has'):
        register('MODELS', codebases=())(Impostor)
    assert MODELS.get('FlashInternImageRegistrationProbe') is FlashInternImageRegistrationProbe
