"""Run a detector on one image and write the image with its predictions (boxes, masks, labels) as a PNG.

    python tools/image_demo.py IMAGE CONFIG CHECKPOINT [--out-file result.png] [--device cpu]
                                                       [--score-thr 0.3]

Uses mmdet's inference API (``init_detector`` / ``inference_detector``) and mmdet's DetLocalVisualizer.
The class names come from the checkpoint's ``dataset_meta`` (saved by training), else from the config.
"""
import argparse
import os
import os.path as osp
import sys


def _import_mmdcnv4():
    try:
        import mmdcnv4  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import mmdcnv4  # noqa: F401


_import_mmdcnv4()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Detect objects in one image and save a picture')
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out-file', default='result.png', help='output image (PNG recommended)')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda if available)')
    parser.add_argument('--score-thr', type=float, default=0.3, help='score threshold of what is drawn')
    return parser.parse_args(argv)


def run(img, config, checkpoint, out_file, device=None, score_thr=0.3):
    """Returns ``(DetDataSample, out_file)``; the picture is written to ``out_file``."""
    import mmcv
    import torch
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS

    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = init_detector(config, checkpoint, device=device)
    result = inference_detector(model, img)

    visualizer_cfg = model.cfg.visualizer.copy()
    visualizer_cfg['name'] = f'image_demo_{id(model)}'  # a fresh instance, not one a runner created
    visualizer_cfg.pop('vis_backends', None)  # only the file below is written
    visualizer = VISUALIZERS.build(visualizer_cfg)
    visualizer.dataset_meta = model.dataset_meta
    image = mmcv.imconvert(mmcv.imread(img), 'bgr', 'rgb')
    out_dir = osp.dirname(osp.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    visualizer.add_datasample('result', image, data_sample=result, draw_gt=False, show=False,
                              out_file=out_file, pred_score_thr=score_thr)
    return result, out_file


def main(argv=None):
    args = parse_args(argv)
    result, out_file = run(args.img, args.config, args.checkpoint, args.out_file, args.device, args.score_thr)
    pred = result.pred_instances
    keep = pred.scores >= args.score_thr
    print(f'{int(keep.sum())} detections with score >= {args.score_thr} (of {len(pred)}); '
          f'picture written to {out_file}')
    return result


if __name__ == '__main__':
    main()
