"""Parameters and FLOPs of a model from an mmdet or mmseg config (mmengine.analysis).

    python tools/get_flops.py CONFIG [--shape H W] [--cfg-options KEY=VALUE ...]

The model runs once in ``tensor`` mode (mmdet: backbone, neck and heads up to the raw head outputs, RPN
proposals included for two-stage detectors; mmseg: the decode head logits) on a random image of
``--shape`` (default: 1280x800 for mmdet, as mmdet's get_flops, 512x512 for mmseg). FLOPs count one
multiply-add as one FLOP, as mmengine does. The DCNv4 core is counted as 5 FLOPs per sampling point and
channel (bilinear sampling and weighting), as upstream InternImage counted DCNv3; its projections are
linear layers, counted as such. Ops mmengine has no rule for (NMS, RoIAlign, ...) count 0 and are listed.
"""
import argparse
import math
import os.path as osp
import sys


def _import_mmdcnv4():
    try:
        import mmdcnv4  # noqa: F401
    except ImportError:
        sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
        import mmdcnv4  # noqa: F401


_import_mmdcnv4()

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402

from mmdcnv4.datasets.random_batch import random_batch  # noqa: E402

DEFAULT_SHAPES = {'mmdet': (800, 1280), 'mmseg': (512, 512)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Count parameters and FLOPs of a model')
    parser.add_argument('config', help='config file')
    parser.add_argument('--shape', type=int, nargs='+', help='input size: H W, or one int for a square')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value pairs in xxx=yyy format')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error('--shape takes one or two integers')
    return args


def dcnv4_flop_jit(inputs, outputs):
    """FLOPs of ``mmdcnv4::dcnv4_forward(value, offset_mask, kh, kw, ..., remove_center)``."""
    from mmengine.analysis.jit_handles import get_shape
    out_shape = get_shape(outputs[0])  # (N, H_out, W_out, C)
    kh, kw = inputs[2].toIValue(), inputs[3].toIValue()
    remove_center = inputs[len(inputs) - 1].toIValue()
    points = kh * kw - int(bool(remove_center))
    return 5 * math.prod(out_shape) * points


class _TensorMode(torch.nn.Module):
    """``model(inputs, data_samples, mode='tensor')`` as a one-argument module, for the tracer."""

    def __init__(self, model, data_samples):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, inputs):
        return self.model(inputs, self.data_samples, mode='tensor')


def count(cfg, shape=None):
    """Returns ``dict(flops, params, by_module, unsupported, shape)`` for the model of ``cfg``."""
    from mmengine.analysis import FlopAnalyzer, parameter_count

    scope = cfg.get('default_scope', 'mmdet')
    init_default_scope(scope)
    height, width = shape or DEFAULT_SHAPES.get(scope, (800, 1280))
    model = MODELS.build(cfg.model)
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(random_batch(scope, height, width), False)
        wrapped = _TensorMode(model, data['data_samples'])
        analyzer = FlopAnalyzer(wrapped, (data['inputs'], ))
        analyzer.set_op_handle('mmdcnv4::dcnv4_forward', dcnv4_flop_jit)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        flops = analyzer.total()
        by_module = {name[len('model.'):]: value for name, value in analyzer.by_module().items()
                     if name.count('.') == 1 and name.startswith('model.')}
        unsupported = dict(analyzer.unsupported_ops())
    params = parameter_count(model)
    return dict(flops=flops, params=params[''], by_module=by_module, unsupported=unsupported,
                params_by_module={k: v for k, v in params.items() if k and '.' not in k},
                shape=(height, width))


def main(argv=None):
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    shape = None
    if args.shape is not None:
        shape = (args.shape[0], args.shape[0]) if len(args.shape) == 1 else tuple(args.shape)
    result = count(cfg, shape)
    h, w = result['shape']
    print(f'input shape: (3, {h}, {w})')
    print(f"FLOPs: {result['flops'] / 1e9:.2f} G (multiply-adds)")
    print(f"params: {result['params'] / 1e6:.2f} M")
    for name in sorted(result['params_by_module']):
        flops = result['by_module'].get(name, 0)
        print(f"  {name:<20} {result['params_by_module'][name] / 1e6:9.2f} M params  {flops / 1e9:9.2f} GFLOPs")
    if result['unsupported']:
        skipped = ', '.join(f'{op} (x{n})' for op, n in sorted(result['unsupported'].items()))
        print(f'not counted (no FLOP rule): {skipped}')
    return result


if __name__ == '__main__':
    main()
