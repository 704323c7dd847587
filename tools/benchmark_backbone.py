"""Inference throughput of FlashInternImage (mmdcnv4) against timm's ConvNeXt and Swin on one GPU.

    python tools/benchmark_backbone.py [--batch-size 256] [--img-size 224] [--tf32] [--no-channels-last]
                                       [--compile] [--models NAME ...] [--out FILE]

Every model runs under the same settings: the same batch and input size, TF32 on or off for matmuls and
convolutions (off unless ``--tf32``), channels_last images and weights (unless ``--no-channels-last``),
cuDNN autotuning on, ``torch.inference_mode``, fp32 and fp16 (``torch.autocast``), optionally
``torch.compile``. Time per batch is the median of ``triton.testing.do_bench`` (CUDA events when triton is
missing); the table gives images/s and parameters, with the upstream release's figures measured on the
same kind of machine (``shared/bench/official-h200.md``) and our ratio to them. FlashInternImage is timed
with its ImageNet head (``FlashInternImageCls``), as upstream's figures were.

timm is imported only when a timm model is asked for; without it those rows are skipped with a note.
"""
import argparse
import datetime
import statistics
import sys

FLASH_MODELS = ('flash_internimage_t', 'flash_internimage_s', 'flash_internimage_b')
TIMM_MODELS = ('convnext_tiny', 'convnext_small', 'convnext_base', 'swin_tiny_patch4_window7_224')
DTYPES = ('fp32', 'fp16')

# images/s at 224x224, batch 256, one H200: upstream FlashInternImage with its own model code and op, and
# timm 1.x on the same machine (shared/bench/official-h200.md).
REFERENCE = {
    'flash_internimage_t': (1390, 1480),
    'flash_internimage_s': (1396, 1354),
    'flash_internimage_b': (1038, 1348),
    'convnext_tiny': (3360, 8437),
    'convnext_small': (1894, 5536),
    'convnext_base': (1233, 4363),
    'swin_tiny_patch4_window7_224': (2891, 5739),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(FLASH_MODELS + TIMM_MODELS),
                        help='flash_internimage_{t,s,b,l} and/or timm model names')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES, default=list(DTYPES))
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls and convolutions (all models)')
    parser.add_argument('--no-channels-last', action='store_true',
                        help='keep NCHW-contiguous images and weights (all models)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--warmup-ms', type=float, default=1000., help='do_bench warm-up time')
    parser.add_argument('--rep-ms', type=float, default=3000., help='do_bench measuring time')
    parser.add_argument('--out', help='also write the markdown table to this file')
    return parser.parse_args(argv)


def build_model(name):
    """A randomly initialised model by name (no weights are downloaded)."""
    if name.startswith('flash_internimage_'):
        from mmdcnv4.models import FlashInternImageCls
        return FlashInternImageCls(arch=name.rsplit('_', 1)[-1])
    import timm
    return timm.create_model(name, pretrained=False)


def timm_available():
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def time_ms(fn, warmup_ms, rep_ms):
    """Median milliseconds per call of ``fn``."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_ms_events(fn, warmup_ms, rep_ms)
    try:
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode='median')
    except TypeError:  # older triton: no return_mode
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])


def _time_ms_events(fn, warmup_ms, rep_ms):
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / estimate))):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name, args):
    """Returns (parameters, {dtype: images/s or an error string})."""
    import torch
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    model = build_model(name).cuda().eval().to(memory_format=memory_format)
    params = sum(p.numel() for p in model.parameters())
    if args.compile:
        model = torch.compile(model)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device='cuda')
    images = images.contiguous(memory_format=memory_format)
    results = {}
    for dtype in args.dtypes:
        autocast = torch.autocast('cuda', dtype=torch.float16, enabled=dtype == 'fp16')

        def step():
            with torch.inference_mode(), autocast:
                model(images)

        try:
            results[dtype] = args.batch_size / time_ms(step, args.warmup_ms, args.rep_ms) * 1e3
        except torch.cuda.OutOfMemoryError:
            results[dtype] = 'OOM'
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()
    return params, results


def _fmt(value):
    return f'{value:,.0f}' if isinstance(value, float) else str(value)


def table(rows, dtypes):
    head = ['model', 'params']
    for dtype in dtypes:
        head += [f'{dtype} img/s', f'reference {dtype}', f'ratio {dtype}']
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name, params, results in rows:
        cells = [name, f'{params / 1e6:.1f}M']
        for dtype in dtypes:
            ours = results[dtype]
            ref = REFERENCE.get(name, (None, None))[DTYPES.index(dtype)]
            ratio = f'{ours / ref:.2f}x' if ref and isinstance(ours, float) else '-'
            cells += [_fmt(ours), _fmt(ref) if ref else '-', ratio]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def header(args):
    import torch
    return '\n'.join([
        f'# Backbone inference throughput, {args.img_size}x{args.img_size}, batch {args.batch_size}',
        '',
        f'- date: {datetime.date.today().isoformat()}; GPU: {torch.cuda.get_device_name()}; '
        f'torch {torch.__version__} (CUDA {torch.version.cuda})',
        f'- every model: TF32 {"on" if args.tf32 else "off"}, '
        f'{"NCHW-contiguous" if args.no_channels_last else "channels_last"} images and weights, '
        f'cudnn.benchmark on, inference_mode, fp16 = autocast, '
        f'{"torch.compile" if args.compile else "eager"}',
        '- time per batch: median of triton.testing.do_bench (CUDA events without triton)',
        '- reference: upstream FlashInternImage and timm figures of shared/bench/official-h200.md; ratio = '
        'this run / reference',
        ''])


def main(argv=None):
    args = parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print('benchmark_backbone.py needs a CUDA GPU', file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    models = list(args.models)
    if any(not m.startswith('flash_internimage_') for m in models) and not timm_available():
        print('timm is not installed: skipping ' + ', '.join(m for m in models if not m.startswith('flash_')),
              file=sys.stderr)
        models = [m for m in models if m.startswith('flash_internimage_')]
    rows = []
    for name in models:
        params, results = measure(name, args)
        rows.append((name, params, results))
        print(f'{name}: ' + ', '.join(f'{d} {_fmt(v)} img/s' for d, v in results.items()), flush=True)
    report = header(args) + '\n' + table(rows, args.dtypes) + '\n'
    print(report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)
    return 0


if __name__ == '__main__':
    sys.exit(main())
