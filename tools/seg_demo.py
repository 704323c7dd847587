"""Semantic segmentation of one image with an mmseg config and checkpoint; writes a coloured mask PNG.

    python tools/seg_demo.py IMAGE CONFIG CHECKPOINT [--out-file mask.png] [--overlay-file overlay.png]
                             [--device cpu] [--opacity 0.5] [--flash-msda]

The mask PNG colours every pixel with its predicted class's palette colour (the palette saved in the
checkpoint's dataset_meta, or ADE20K's for a 150-class model without one). ``--overlay-file`` also writes the
mask blended over the image. The config's ``custom_imports`` (mmdcnv4) register FlashInternImage.
``--flash-msda`` runs mmcv's MultiScaleDeformableAttention modules (Mask2Former's pixel decoder) on
mmdcnv4's fused MSDA op instead, with the same weights.
"""
import argparse
import os
import os.path as osp

import mmcv
import numpy as np


def colour_mask(pred, palette):
    """(H, W) class indices -> (H, W, 3) uint8 RGB; indices outside the palette are black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(palette)] = np.asarray(palette, np.uint8)[:256]
    return table[np.asarray(pred, np.int64).clip(0, 255)]


def segment(model, image):
    """Runs ``inference_model`` on an image path or RGB/BGR array; returns the (H, W) int64 class map."""
    from mmseg.apis import inference_model
    result = inference_model(model, image)
    return result.pred_sem_seg.data[0].cpu().numpy()


def load_model(config, checkpoint, device='cpu', flash_msda=False):
    from mmengine.model import revert_sync_batchnorm
    from mmseg.apis import init_model
    model = init_model(config, checkpoint, device=device)
    if device == 'cpu':
        model = revert_sync_batchnorm(model)
    if flash_msda:
        from mmdcnv4.ops import replace_ms_deform_attn
        print(f'--flash-msda: {replace_ms_deform_attn(model)} MultiScaleDeformableAttention modules swapped')
    return model


def write_outputs(image_path, pred, palette, out_file, overlay_file=None, opacity=0.5):
    """Writes the coloured mask (and optionally the overlay); returns the paths written."""
    mask = colour_mask(pred, palette)
    written = []
    for path in (out_file, overlay_file):
        if path and osp.dirname(path):
            os.makedirs(osp.dirname(path), exist_ok=True)
    mmcv.imwrite(mask[..., ::-1], out_file)  # RGB -> BGR for cv2
    written.append(out_file)
    if overlay_file:
        image = mmcv.imread(image_path, channel_order='rgb').astype(np.float32)
        blend = (1 - opacity) * image + opacity * mask.astype(np.float32)
        mmcv.imwrite(blend.round().astype(np.uint8)[..., ::-1], overlay_file)
        written.append(overlay_file)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description='Segment one image and write a coloured mask PNG.')
    parser.add_argument('image', help='input image')
    parser.add_argument('config', help='mmseg config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-file', default='seg_mask.png', help='coloured mask PNG to write')
    parser.add_argument('--overlay-file', default=None, help='also write the mask blended over the image')
    parser.add_argument('--opacity', type=float, default=0.5, help='mask opacity in the overlay (0-1]')
    parser.add_argument('--device', default='cpu', help='e.g. cpu or cuda:0')
    parser.add_argument('--flash-msda', action='store_true',
                        help="run mmcv's MultiScaleDeformableAttention modules on mmdcnv4's fused MSDA op")
    args = parser.parse_args(argv)

    model = load_model(args.config, args.checkpoint, args.device, args.flash_msda)
    pred = segment(model, args.image)
    classes, palette = model.dataset_meta['classes'], model.dataset_meta['palette']
    written = write_outputs(args.image, pred, palette, args.out_file, args.overlay_file, args.opacity)
    ids, counts = np.unique(pred, return_counts=True)
    share = ', '.join(f'{classes[i]} {c / pred.size:.1%}' for i, c in zip(ids, counts) if i < len(classes))
    print(f'{args.image}: {pred.shape[1]}x{pred.shape[0]} px; {share}')
    print('wrote ' + ', '.join(written))


if __name__ == '__main__':
    main()
