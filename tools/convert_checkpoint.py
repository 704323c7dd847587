"""Converts upstream FlashInternImage checkpoints to the layouts mmdcnv4 loads.

    python tools/convert_checkpoint.py SRC DST [--kind det|seg|cls] [--force]

Writes ``{'state_dict': ..., 'meta': ...}`` to DST (never over an existing file without ``--force``).
``--kind`` defaults to a guess from the keys: ``decode_head.*`` -> seg, ``backbone.*`` -> det, else cls.

cls (ImageNet files ``flash_intern_image_*_1k_224.pth``...): the first of ``state_dict``, ``model_ema``,
``model`` present, ``module.`` stripped, keys otherwise unchanged: the file loads into
``FlashInternImageCls`` and, through ``init_cfg=dict(type='Pretrained')``, into ``FlashInternImage``.

det (upstream mmdet 2.28 detectors) and seg (upstream mmseg 0.27 segmentors): ``module.`` is stripped and
the keys are renamed where mmdet 3.x / mmseg 1.x renamed the modules. Handled:

- ``backbone.*`` (FlashInternImage), ``neck.*``, ``rpn_head.*``, ``roi_head.*`` (Mask R-CNN, Cascade Mask
  R-CNN with its three 4conv-1fc heads), ``decode_head.*``/``auxiliary_head.*`` of UperNet and FCN: these
  modules kept their names, the keys pass unchanged.
- mmcv 1.x transformer layers (``BaseTransformerLayer``) became named sub-modules in mmdet 3.x:
  ``ffns.0`` -> ``ffn``; ``attentions.0`` of an encoder layer -> ``self_attn``; of a DETR-family decoder
  layer (operation order self_attn, cross_attn) ``attentions.0`` -> ``self_attn``, ``attentions.1`` ->
  ``cross_attn``; of a Mask2Former decoder layer (cross_attn first) ``attentions.0`` -> ``cross_attn``,
  ``attentions.1`` -> ``self_attn``; the pixel decoder's encoder layers ``attentions.0`` -> ``self_attn``.
- mmdet 2.x ``DeformableDetrTransformer`` lived in ``bbox_head.transformer``; mmdet 3.x puts its parts on
  the detector: ``bbox_head.transformer.{encoder,decoder}`` -> ``{encoder,decoder}``, ``level_embeds`` ->
  ``level_embed``, ``enc_output`` -> ``memory_trans_fc``, ``enc_output_norm`` -> ``memory_trans_norm``,
  ``pos_trans`` -> ``pos_trans_fc``, ``pos_trans_norm`` stays, ``reference_points`` ->
  ``reference_points_fc``; ``bbox_head.query_embedding`` -> ``query_embedding``. ``bbox_head.cls_branches``
  and ``bbox_head.reg_branches`` keep their names.
- Mask2Former (seg): ``decode_head.{pixel_decoder,transformer_decoder,query_embed,query_feat,level_embed,
  cls_embed,mask_embed}`` keep their names apart from the layer renames above.
- meta: ``CLASSES``/``PALETTE`` -> ``dataset_meta.{classes,palette}`` (what mmdet 3.x / mmseg 1.x read).

Not handled (copied unchanged and listed in the report): keys that upstream's own DINO implementation
adds beyond mmdet 2.x's Deformable DETR (e.g. its content-query and denoising label embeddings), since
their upstream names could not be checked; every key still under ``bbox_head.transformer.`` after the
renames is reported. Load the result with ``strict=False`` once and read the missing/unexpected keys.

Files that pickled objects of packages not installed here (upstream ImageNet files carry a yacs config)
still load: those objects come back as plain placeholders, and only tensors are written to DST.
"""
import argparse
import os
import os.path as osp
import re
import sys

import torch

from mmdcnv4.compat import load_trusted_checkpoint

__all__ = ['convert', 'convert_state_dict', 'guess_kind', 'load_checkpoint_file', 'main']

KINDS = ('det', 'seg', 'cls')

_LAYER = r'\.layers\.(\d+)\.'
# (pattern, replacement), applied in order to every key; see the module docstring.
_DETR_RULES = (
    (r'^bbox_head\.transformer\.(encoder|decoder)\.', r'\1.'),
    (r'^bbox_head\.transformer\.level_embeds$', 'level_embed'),
    (r'^bbox_head\.transformer\.enc_output\.', 'memory_trans_fc.'),
    (r'^bbox_head\.transformer\.enc_output_norm\.', 'memory_trans_norm.'),
    (r'^bbox_head\.transformer\.pos_trans\.', 'pos_trans_fc.'),
    (r'^bbox_head\.transformer\.pos_trans_norm\.', 'pos_trans_norm.'),
    (r'^bbox_head\.transformer\.reference_points\.', 'reference_points_fc.'),
    (r'^bbox_head\.query_embedding\.', 'query_embedding.'),
    (r'^encoder' + _LAYER + r'attentions\.0\.', r'encoder.layers.\1.self_attn.'),
    (r'^decoder' + _LAYER + r'attentions\.0\.', r'decoder.layers.\1.self_attn.'),
    (r'^decoder' + _LAYER + r'attentions\.1\.', r'decoder.layers.\1.cross_attn.'),
)
_MASK2FORMER_RULES = (
    (r'^decode_head\.pixel_decoder\.encoder' + _LAYER + r'attentions\.0\.',
     r'decode_head.pixel_decoder.encoder.layers.\1.self_attn.'),
    (r'^decode_head\.transformer_decoder' + _LAYER + r'attentions\.0\.',
     r'decode_head.transformer_decoder.layers.\1.cross_attn.'),
    (r'^decode_head\.transformer_decoder' + _LAYER + r'attentions\.1\.',
     r'decode_head.transformer_decoder.layers.\1.self_attn.'),
)
_FFN_RULE = (r'\.ffns\.0\.', '.ffn.')
RULES = {
    'det': tuple((re.compile(p), r) for p, r in _DETR_RULES + (_FFN_RULE,)),
    'seg': tuple((re.compile(p), r) for p, r in _MASK2FORMER_RULES + (_FFN_RULE,)),
    'cls': (),
}
# Keys left here after the renames belong to modules whose mmdet 3.x names are not known.
_UNHANDLED_PREFIXES = ('bbox_head.transformer.',)


def load_checkpoint_file(path):
    """``torch.load`` of a trusted checkpoint file, tolerating pickled objects of missing packages."""
    return load_trusted_checkpoint(path, map_location='cpu')


def guess_kind(state_dict):
    """'seg' for segmentors, 'det' for other files with a ``backbone.``, else 'cls' (ImageNet)."""
    keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
    if any(k.startswith(('decode_head.', 'auxiliary_head.')) for k in keys):
        return 'seg'
    if any(k.startswith('backbone.') for k in keys):
        return 'det'
    return 'cls'


def _rename(key, rules):
    for pattern, replacement in rules:
        key = pattern.sub(replacement, key)
    return key


def convert_state_dict(state_dict, kind):
    """Returns ``(new_state_dict, renamed, unhandled)``; renamed maps old -> new key names."""
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
    converted, renamed, unhandled = {}, {}, []
    for key, value in state_dict.items():
        old = key[len('module.'):] if key.startswith('module.') else key
        new = _rename(old, RULES[kind])
        if new in converted:
            raise ValueError(f'two keys map to {new!r}; the checkpoint does not have the expected layout')
        if new != old:
            renamed[old] = new
        if new.startswith(_UNHANDLED_PREFIXES):
            unhandled.append(new)
        converted[new] = value
    return converted, renamed, unhandled


def _meta(checkpoint, src, kind):
    old = checkpoint.get('meta') if isinstance(checkpoint, dict) else None
    old = old if isinstance(old, dict) else {}
    meta = {'converted_from': osp.basename(src), 'kind': kind}
    dataset_meta = {new: old[key] for key, new in (('CLASSES', 'classes'), ('PALETTE', 'palette')) if key in old}
    if dataset_meta:
        meta['dataset_meta'] = dataset_meta
    for key in ('mmdet_version', 'mmseg_version', 'epoch', 'iter'):
        if key in old:
            meta[f'source_{key}'] = old[key]
    return meta


def convert(src, dst, kind=None, force=False):
    """Converts file ``src`` to ``dst``; returns ``(kind, renamed, unhandled)``."""
    if osp.exists(dst) and not force:
        raise FileExistsError(f'{dst} exists; pass --force to overwrite it')
    from mmdcnv4.models.backbones.flash_internimage import filter_upstream_state_dict, unwrap_checkpoint
    checkpoint = load_checkpoint_file(src)
    state_dict = unwrap_checkpoint(checkpoint)
    if not isinstance(state_dict, dict):
        raise TypeError(f'{src} holds no state_dict (got {type(state_dict).__name__})')
    kind = kind or guess_kind(state_dict)
    if kind == 'cls':
        state_dict = filter_upstream_state_dict(state_dict, keep_classifier=True)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    converted, renamed, unhandled = convert_state_dict(tensors, kind)
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save({'state_dict': converted, 'meta': _meta(checkpoint, src, kind)}, dst)
    return kind, renamed, unhandled


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert an upstream FlashInternImage checkpoint (ImageNet, mmdet 2.x detector or '
                    'mmseg 0.x segmentor) to the mmdet 3.x / mmseg 1.x layout.')
    parser.add_argument('src', help='upstream checkpoint file')
    parser.add_argument('dst', help='output file')
    parser.add_argument('--kind', choices=KINDS, default=None,
                        help='det, seg or cls (default: guessed from the keys)')
    parser.add_argument('--force', action='store_true', help='overwrite DST if it exists')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        kind, renamed, unhandled = convert(args.src, args.dst, args.kind, args.force)
    except FileExistsError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    print(f'{args.src} -> {args.dst} ({kind}): {len(renamed)} keys renamed')
    for old, new in renamed.items():
        print(f'  {old} -> {new}')
    if unhandled:
        print(f'{len(unhandled)} keys of modules whose mmdet 3.x names are not known were copied unchanged:')
        for key in unhandled:
            print(f'  {key}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
