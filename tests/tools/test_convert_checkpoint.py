"""tools/convert_checkpoint.py on synthetic upstream-style files: round trips, renames, refusals."""
import importlib.util
import pathlib
import sys

import pytest
import torch

import mmdcnv4  # noqa: F401
from mmdcnv4.models import FlashInternImage, FlashInternImageCls

TINY = dict(channels=32, depths=(1, 1, 2, 1), groups=(2, 4, 8, 16))
ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_tool():
    spec = importlib.util.spec_from_file_location('convert_checkpoint', ROOT / 'tools' / 'convert_checkpoint.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()


def rand(*shape):
    return torch.randn(*shape)


# mmdet 2.x key -> mmdet 3.x key (module docstring of the tool); checked against mmdet 3.x modules below.
DETR_RENAMES = {
    'bbox_head.transformer.encoder.layers.0.attentions.0.sampling_offsets.weight':
        'encoder.layers.0.self_attn.sampling_offsets.weight',
    'bbox_head.transformer.encoder.layers.0.ffns.0.layers.0.0.weight': 'encoder.layers.0.ffn.layers.0.0.weight',
    'bbox_head.transformer.encoder.layers.0.ffns.0.layers.1.bias': 'encoder.layers.0.ffn.layers.1.bias',
    'bbox_head.transformer.encoder.layers.0.norms.1.weight': 'encoder.layers.0.norms.1.weight',
    'bbox_head.transformer.decoder.layers.0.attentions.0.attn.in_proj_weight':
        'decoder.layers.0.self_attn.attn.in_proj_weight',
    'bbox_head.transformer.decoder.layers.0.attentions.1.value_proj.weight':
        'decoder.layers.0.cross_attn.value_proj.weight',
    'bbox_head.transformer.decoder.layers.0.norms.2.bias': 'decoder.layers.0.norms.2.bias',
    'bbox_head.transformer.level_embeds': 'level_embed',
    'bbox_head.transformer.enc_output.weight': 'memory_trans_fc.weight',
    'bbox_head.transformer.enc_output_norm.bias': 'memory_trans_norm.bias',
    'bbox_head.transformer.pos_trans.weight': 'pos_trans_fc.weight',
    'bbox_head.transformer.pos_trans_norm.weight': 'pos_trans_norm.weight',
    'bbox_head.transformer.reference_points.weight': 'reference_points_fc.weight',
    'bbox_head.query_embedding.weight': 'query_embedding.weight',
}
MASK2FORMER_RENAMES = {
    'decode_head.pixel_decoder.encoder.layers.2.attentions.0.attention_weights.bias':
        'decode_head.pixel_decoder.encoder.layers.2.self_attn.attention_weights.bias',
    'decode_head.pixel_decoder.encoder.layers.2.ffns.0.layers.1.weight':
        'decode_head.pixel_decoder.encoder.layers.2.ffn.layers.1.weight',
    'decode_head.transformer_decoder.layers.8.attentions.0.attn.out_proj.weight':
        'decode_head.transformer_decoder.layers.8.cross_attn.attn.out_proj.weight',
    'decode_head.transformer_decoder.layers.8.attentions.1.attn.in_proj_bias':
        'decode_head.transformer_decoder.layers.8.self_attn.attn.in_proj_bias',
}
UNCHANGED_DET = ('neck.lateral_convs.0.conv.weight', 'rpn_head.rpn_conv.weight',
                 'roi_head.bbox_head.0.shared_convs.1.bn.running_var', 'roi_head.mask_head.conv_logits.weight',
                 'bbox_head.cls_branches.0.weight', 'bbox_head.reg_branches.6.4.bias')
UNCHANGED_SEG = ('decode_head.psp_modules.0.1.conv.weight', 'decode_head.fpn_bottleneck.bn.weight',
                 'auxiliary_head.conv_seg.weight', 'decode_head.query_feat.weight', 'decode_head.level_embed.weight')


def backbone_state(gen_prefix='backbone.'):
    model = FlashInternImage('t', **TINY)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model, {gen_prefix + k: v.clone() for k, v in model.state_dict().items()}


def test_detector_round_trip(tmp_path):
    model, state = backbone_state()
    extra = {k: rand(3, 2) for k in list(DETR_RENAMES) + list(UNCHANGED_DET)}
    extra['bbox_head.transformer.query_pos_extra.weight'] = rand(2)  # a module the tool does not know
    src, dst = tmp_path / 'det2x.pth', tmp_path / 'out' / 'det3x.pth'
    torch.save({'state_dict': {**state, **extra}, 'meta': {'CLASSES': ('a', 'b'), 'mmdet_version': '2.28.1'},
                'optimizer': {'state': {}}}, src)
    assert tool.main([str(src), str(dst)]) == 0
    out = torch.load(dst, weights_only=False)
    converted = out['state_dict']
    assert out['meta']['kind'] == 'det' and out['meta']['dataset_meta'] == {'classes': ('a', 'b')}
    assert len(converted) == len(state) + len(extra)
    for key, value in state.items():  # the backbone passes unchanged
        assert torch.equal(converted[key], value)
    for old, new in DETR_RENAMES.items():
        assert torch.equal(converted[new], extra[old]) and old not in converted
    for key in UNCHANGED_DET:
        assert torch.equal(converted[key], extra[key])
    assert 'bbox_head.transformer.query_pos_extra.weight' in converted
    # The converted file initialises the backbone with nothing missing.
    backbone = FlashInternImage('t', **TINY, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    backbone.init_weights()
    for key, value in model.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)


def test_segmentor_round_trip_with_ddp_prefix(tmp_path):
    _, state = backbone_state('module.backbone.')
    extra = {'module.' + k: rand(4) for k in list(MASK2FORMER_RENAMES) + list(UNCHANGED_SEG)}
    src, dst = tmp_path / 'seg.pth', tmp_path / 'seg_out.pth'
    torch.save({'state_dict': {**state, **extra}, 'meta': {'CLASSES': ['x'], 'PALETTE': [[1, 2, 3]]}}, src)
    kind, renamed, unhandled = tool.convert(str(src), str(dst))
    converted = torch.load(dst, weights_only=False)['state_dict']
    assert kind == 'seg' and not unhandled
    assert renamed == MASK2FORMER_RENAMES
    assert all(k[len('module.'):] in converted for k in state)
    for key in UNCHANGED_SEG:
        assert torch.equal(converted[key], extra['module.' + key])


def test_renamed_detr_keys_exist_in_mmdet3():
    """The new names are those of mmdet 3.x's Deformable-DETR encoder, DINO decoder, Mask2Former decoder."""
    from mmdet.models.layers import (DeformableDetrTransformerEncoder, DinoTransformerDecoder,
                                     Mask2FormerTransformerDecoder)
    msda = dict(embed_dims=32, num_levels=2, num_heads=2, num_points=2)
    ffn = dict(embed_dims=32, feedforward_channels=64)
    modules = {
        'encoder.': DeformableDetrTransformerEncoder(num_layers=1, layer_cfg=dict(self_attn_cfg=msda, ffn_cfg=ffn)),
        'decoder.': DinoTransformerDecoder(num_layers=1, post_norm_cfg=None, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=32, num_heads=2), cross_attn_cfg=msda, ffn_cfg=ffn)),
        'decode_head.transformer_decoder.': Mask2FormerTransformerDecoder(num_layers=9, layer_cfg=dict(
            self_attn_cfg=dict(embed_dims=32, num_heads=2), cross_attn_cfg=dict(embed_dims=32, num_heads=2),
            ffn_cfg=ffn)),
        'decode_head.pixel_decoder.encoder.': DeformableDetrTransformerEncoder(
            num_layers=3, layer_cfg=dict(self_attn_cfg=msda, ffn_cfg=ffn)),
    }
    known = {prefix + key for prefix, module in modules.items() for key in module.state_dict()}
    layer_keys = [new for new in list(DETR_RENAMES.values()) + list(MASK2FORMER_RENAMES.values())
                  if '.layers.' in new]
    assert layer_keys and all(key in known for key in layer_keys)


def test_imagenet_checkpoint(tmp_path):
    source = FlashInternImageCls('t', **TINY, num_classes=4)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_()
    other = {k: torch.zeros_like(v) for k, v in source.state_dict().items()}
    src, dst = tmp_path / 'flash_intern_image_t_1k_224.pth', tmp_path / 'cls.pth'
    # model_ema is preferred over model, as upstream's loaders do.
    torch.save({'model': other, 'model_ema': {'module.' + k: v for k, v in source.state_dict().items()},
                'epoch': 299}, src)
    assert tool.main([str(src), str(dst)]) == 0
    out = torch.load(dst, weights_only=False)
    assert out['meta']['kind'] == 'cls'
    model = FlashInternImageCls('t', **TINY, num_classes=4)
    model.load_state_dict(out['state_dict'], strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


def test_loads_files_with_objects_of_missing_packages(tmp_path, monkeypatch):
    """Upstream ImageNet files pickle a yacs config; without yacs installed they must still convert."""
    package = tmp_path / 'pkg'
    package.mkdir()
    (package / 'fake_yacs_config.py').write_text('class CfgNode(dict):\n    pass\n')
    monkeypatch.syspath_prepend(str(package))
    import fake_yacs_config
    config = fake_yacs_config.CfgNode(MODEL='flash_intern_image')
    src, dst = tmp_path / 'with_config.pth', tmp_path / 'converted.pth'
    _, state = backbone_state('')
    torch.save({'model': state, 'config': config}, src)
    monkeypatch.delitem(sys.modules, 'fake_yacs_config')
    monkeypatch.setattr(sys, 'path', [p for p in sys.path if p != str(package)])
    with pytest.raises(ModuleNotFoundError):
        torch.load(src, weights_only=False)
    assert tool.main([str(src), str(dst), '--kind', 'cls']) == 0
    converted = torch.load(dst, weights_only=False)['state_dict']
    assert converted.keys() == state.keys()


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    _, state = backbone_state()
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save({'state_dict': state}, src)
    dst.write_bytes(b'keep me')
    assert tool.main([str(src), str(dst)]) == 1
    assert dst.read_bytes() == b'keep me'
    assert 'exists' in capsys.readouterr().err
    assert tool.main([str(src), str(dst), '--force', '--kind', 'det']) == 0
    assert torch.load(dst, weights_only=False)['state_dict'].keys() == state.keys()


def test_guess_kind():
    assert tool.guess_kind({'module.decode_head.conv_seg.weight': 0, 'backbone.x': 0}) == 'seg'
    assert tool.guess_kind({'backbone.x': 0, 'rpn_head.y': 0}) == 'det'
    assert tool.guess_kind({'patch_embed.conv1.weight': 0}) == 'cls'
    with pytest.raises(SystemExit):
        tool.parse_args(['a', 'b', '--kind', 'xyz'])
