"""Times multi-scale deformable attention on the GPU: this project's op against mmcv's and PyTorch's.

The cases and the reference figures are those of ``shared/bench/official-h200.md`` (8 heads, 32 channels
per head, 4 points, locations uniform in [0, 1), logits ~ N(0, 1)), plus Mask2Former's pixel decoder at
batch 16. Every method is timed with ``triton.testing.do_bench`` (median; falls back to CUDA events
without triton), forward alone and one forward plus one backward from a stored output gradient:

- ``ours flash``: :func:`mmdcnv4.ops.flash_deform_attn` on the packed (locations, logits) tensor, the
  softmax inside the op;
- ``ours mmcv-layout``: :func:`mmdcnv4.ops.ms_deform_attn` on (locations, softmax(logits));
- ``mmcv``: ``mmcv.ops.MultiScaleDeformableAttnFunction`` on (locations, softmax(logits));
- ``pytorch``: mmcv's ``multi_scale_deformable_attn_pytorch`` (grid_sample) on the same.
The mmcv-layout times include the softmax they need. The "vs best" columns divide the fastest of mmcv (as
measured here and in the bench file) and the upstream flash op (bench file) by ``ours flash``.

Each cell is the fastest of ``--repeats`` do_bench medians (default 3), the methods interleaved, as the bench
file reports the fastest of its runs: small calls such as the DINO decoder's are bound by host time (the
autograd engine hands the backward to its device thread), and that moves by tens of percent between
measurements on the same machine.

Usage (on the GPU machine): ``python tools/benchmark_msda.py --out docs/benchmarks/msda.md``

With ``--deterministic`` it times instead this project's two layouts' forward plus backward with the default
value gradient (float atomics) against ``torch.use_deterministic_algorithms(True)`` (int64 fixed point;
docs/ms_deform_attn.md, Deterministic mode), the two interleaved:
``python tools/benchmark_msda.py --deterministic --out docs/benchmarks/msda_deterministic.md``
"""
import argparse
import datetime
import os
import sys

# Figures of shared/bench/official-h200.md, ms: (mmcv fwd, flash fwd, mmcv fwd+bwd, flash fwd+bwd).
UPSTREAM = {
    ('dino_enc', 'fp32'): (0.650, 2.306, 2.935, 3.051),
    ('dino_enc', 'fp16'): (0.915, 2.565, 6.918, 2.917),
    ('dino_dec', 'fp32'): (0.045, 0.105, 0.215, 0.233),
    ('dino_dec', 'fp16'): (0.052, 0.095, 0.417, 0.261),
    ('m2f', 'fp32'): (0.221, 1.052, 0.944, 1.393),
    ('m2f', 'fp16'): (0.302, 1.019, 2.210, 1.447),
    ('bev', 'fp32'): (0.445, 5.116, 1.921, 8.841),
    ('bev', 'fp16'): (0.542, 5.451, 3.671, 5.685),
}

DINO_LEVELS = ((100, 152), (50, 76), (25, 38), (13, 19))
M2F_LEVELS = ((80, 80), (40, 40), (20, 20))
# name: (description, batch, levels, queries (None: one per value position))
CASES = {
    'dino_enc': ('DINO encoder, 800x1216, batch 2 (4 levels, 20,197 queries)', 2, DINO_LEVELS, None),
    'dino_dec': ('DINO decoder, 900 queries, batch 2', 2, DINO_LEVELS, 900),
    'm2f': ('Mask2Former pixel decoder, 640 crop, batch 2 (3 levels, 8,400 queries)', 2, M2F_LEVELS, None),
    'bev': ('BEV self-attention, 200x200, batch 2 (1 level, 40,000 queries)', 2, ((200, 200),), None),
    'm2f_b16': ('Mask2Former pixel decoder, 640 crop, batch 16', 16, M2F_LEVELS, None),
}
HEADS, CHANNELS, POINTS = 8, 32, 4
METHODS = ('ours_flash', 'ours_mmcv', 'mmcv', 'pytorch')
METHOD_TITLES = {'ours_flash': 'ours flash', 'ours_mmcv': 'ours mmcv-layout', 'mmcv': 'mmcv',
                 'pytorch': 'pytorch'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', help='also write the markdown report to this file')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'fp16', 'bf16'], choices=['fp32', 'fp16', 'bf16'])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=list(METHODS))
    parser.add_argument('--rep', type=int, default=200, help='milliseconds of repeats per measurement')
    parser.add_argument('--repeats', type=int, default=3,
                        help='measurements per cell, methods interleaved; the fastest is reported')
    parser.add_argument('--deterministic', action='store_true',
                        help="this project's layouts, forward+backward, default against deterministic mode")
    return parser.parse_args(argv)


def make_case(torch, name, dtype, device):
    _, batch, levels, queries = CASES[name]
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    len_in = int(sum(h * w for h, w in levels))
    len_q = len_in if queries is None else queries
    num_levels = len(levels)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    value = torch.randn(batch, len_in, HEADS, CHANNELS, device=device, generator=gen).to(dtype)
    loc = torch.rand(batch, len_q, HEADS, num_levels, POINTS, 2, device=device, generator=gen).to(dtype)
    logits = torch.randn(batch, len_q, HEADS, num_levels * POINTS, device=device, generator=gen).to(dtype)
    sla = torch.cat([loc.reshape(batch, len_q, HEADS, -1), logits], -1).contiguous()
    grad = torch.randn(batch, len_q, HEADS * CHANNELS, device=device, generator=gen).to(dtype)
    return dict(value=value, shapes=shapes, starts=starts, loc=loc, logits=logits, sla=sla, grad=grad,
                levels=num_levels)


def method_fn(torch, method, case):
    """(forward function, its differentiable inputs) of a method, or raises ImportError."""
    shapes, starts, levels = case['shapes'], case['starts'], case['levels']
    batch, len_q = case['sla'].shape[:2]

    def weights(logits):
        return torch.softmax(logits, -1).view(batch, len_q, HEADS, levels, POINTS)

    if method == 'ours_flash':
        from mmdcnv4.ops.ms_deform_attn import flash_deform_attn

        def fn(value, sla):
            return flash_deform_attn(value, shapes, starts, sla, POINTS)
        return fn, ('value', 'sla')
    if method == 'ours_mmcv':
        from mmdcnv4.ops.ms_deform_attn import ms_deform_attn

        def fn(value, loc, logits):
            return ms_deform_attn(value, shapes, starts, loc, weights(logits))
        return fn, ('value', 'loc', 'logits')
    if method == 'mmcv':
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction

        def fn(value, loc, logits):
            return MultiScaleDeformableAttnFunction.apply(value, shapes, starts, loc, weights(logits), 64)
        return fn, ('value', 'loc', 'logits')
    if method == 'pytorch':
        from mmcv.ops.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
        shape_list = [tuple(s) for s in shapes.tolist()]

        def fn(value, loc, logits):
            return multi_scale_deformable_attn_pytorch(value, shape_list, loc, weights(logits))
        return fn, ('value', 'loc', 'logits')
    raise ValueError(method)


def timer(torch, rep):
    try:
        from triton.testing import do_bench

        def bench(fn):
            return float(do_bench(fn, warmup=25, rep=rep, return_mode='median'))
        return bench, 'triton.testing.do_bench (median)'
    except ImportError:
        pass

    def bench(fn):  # CUDA events with an L2 flush before each call, median
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device='cuda')
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        total = 0.0
        while total < rep or len(times) < 10:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            total += times[-1]
        times.sort()
        return times[len(times) // 2]
    return bench, 'CUDA events (median)'


def measure(torch, bench, method, case):
    """(fwd ms, fwd+bwd ms, output) or a short error text in place of the times."""
    try:
        fn, names = method_fn(torch, method, case)
    except ImportError as err:
        return f'n/a ({err.name})', 'n/a', None
    inputs = [case[n].detach().clone() for n in names]
    try:
        with torch.no_grad():
            out = fn(*inputs)
        fwd = bench(lambda: fn(*inputs))
        grad_inputs = [t.requires_grad_() for t in inputs]
        grad = case['grad']

        def fwd_bwd():
            torch.autograd.grad(fn(*grad_inputs), grad_inputs, grad)
        both = bench(fwd_bwd)
        return fwd, both, out
    except (RuntimeError, NotImplementedError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        torch.cuda.synchronize()
        return f'fails ({message[:60]})', 'fails', None


def fastest(old, new):
    """Merges two (fwd, fwd+bwd, output) results: the smaller time per column; an error text stays."""
    if old is None:
        return new
    times = [a if isinstance(a, str) else (b if isinstance(b, str) else min(a, b))
             for a, b in zip(old[:2], new[:2])]
    return times[0], times[1], old[2] if old[2] is not None else new[2]


def fmt(x):
    return f'{x:.3f}' if isinstance(x, float) else str(x)


def ratio(baselines, ours):
    values = [b for b in baselines if isinstance(b, float)]
    if not values or not isinstance(ours, float):
        return 'n/a'
    return f'{min(values) / ours:.2f}x'


def run(args):
    import torch
    if not torch.cuda.is_available():
        sys.exit('benchmark_msda.py needs a CUDA GPU.')
    import mmdcnv4  # noqa: F401  (loads the ops)
    torch.backends.cuda.matmul.allow_tf32 = False
    bench, timer_name = timer(torch, args.rep)
    dtypes = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
    if args.deterministic:
        return run_deterministic(torch, args, bench, timer_name, dtypes)
    rows = []
    for name in args.cases:
        for dt in args.dtypes:
            case = make_case(torch, name, dtypes[dt], 'cuda')
            results = {}
            for _ in range(max(1, args.repeats)):
                for m in args.methods:
                    results[m] = fastest(results.get(m), measure(torch, bench, m, case))
            ref = results.get('mmcv', (None, None, None))[2]
            ours = results.get('ours_flash', (None, None, None))[2]
            diff = 'n/a'
            if ref is not None and ours is not None:
                diff = f'{(ours.float() - ref.float()).abs().max().item():.2e}'
            rows.append((name, dt, results, diff))
            del case
            torch.cuda.empty_cache()
            print(f'{name} {dt}: ' + ', '.join(f'{m} {fmt(r[0])} / {fmt(r[1])}' for m, r in results.items()),
                  file=sys.stderr)
    return report(torch, args, rows, timer_name)


def report(torch, args, rows, timer_name):
    lines = [
        '# Multi-scale deformable attention: timings',
        '',
        f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} on {torch.cuda.get_device_name()} '
        f'(torch {torch.__version__}, CUDA {torch.version.cuda}); {timer_name}, {args.rep} ms of repeats; each '
        f'cell the fastest of {args.repeats} such measurements, methods interleaved.',
        f'{HEADS} heads, {CHANNELS} channels per head, {POINTS} points; locations uniform in [0, 1), logits '
        '~ N(0, 1). mmcv-layout times include the softmax. "bench" columns: shared/bench/official-h200.md '
        '(upstream DCNv4 flash op and mmcv 2.1.0, fp32/fp16 only; bf16 rows show the fp16 figures). '
        '"vs best": the fastest of mmcv (here and bench) and upstream flash (bench), divided by ours flash; '
        'targets: forward >= 1.5x, fwd+bwd >= 2x.',
        '"max |ours - mmcv|": forward outputs of ours flash and mmcv here.',
        '',
    ]
    for title, index, bench_cols in (('Forward (ms)', 0, (0, 1)), ('Forward + backward (ms)', 1, (2, 3))):
        methods = [m for m in args.methods]
        header = (['case', 'dtype'] + [METHOD_TITLES[m] for m in methods] +
                  ['mmcv (bench)', 'upstream flash (bench)', 'vs best'])
        if index == 0:
            header.append('max \\|ours - mmcv\\|')
        lines += [f'## {title}', '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for name, dt, results, diff in rows:
            # bf16 has no bench figures (upstream's bf16 backward fails): the fp16 ones stand in.
            upstream = UPSTREAM.get((name, 'fp16' if dt == 'bf16' else dt))
            bench_values = [upstream[c] for c in bench_cols] if upstream else ['n/a', 'n/a']
            measured = [results[m][index] for m in methods]
            baselines = list(bench_values) + ([results['mmcv'][index]] if 'mmcv' in results else [])
            ours = results['ours_flash'][index] if 'ours_flash' in results else None
            cells = [CASES[name][0], dt] + [fmt(x) for x in measured] + [fmt(x) for x in bench_values]
            cells.append(ratio(baselines, ours))
            if index == 0:
                cells.append(diff)
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    return emit(args, lines)


def emit(args, lines):
    """Prints the report and writes it to --out; returns its text."""
    text = '\n'.join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text + '\n')
    return text


def run_deterministic(torch, args, bench, timer_name, dtypes):
    """Forward+backward of this project's layouts, default against deterministic mode, as one table."""
    methods = [m for m in args.methods if m.startswith('ours_')]
    lines = [
        '# Multi-scale deformable attention: forward+backward in deterministic mode',
        '',
        f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} on {torch.cuda.get_device_name()} '
        f'(torch {torch.__version__}, CUDA {torch.version.cuda}); {timer_name}, {args.rep} ms of repeats; each '
        f'cell the fastest of {args.repeats} such measurements, the modes interleaved. The cases and inputs '
        'of `msda.md`. Default: the value gradient by float atomics; deterministic '
        '(`torch.use_deterministic_algorithms(True)`): by int64 fixed point, whose sum does not depend on the '
        'order (docs/ms_deform_attn.md, Deterministic mode). The forward is the same in both.',
        '',
    ]
    header = ['case', 'dtype']
    for m in methods:
        header += [f'{METHOD_TITLES[m]} ms', f'{METHOD_TITLES[m]} ms, deterministic', 'deterministic / default']
    lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for name in args.cases:
        for dt in args.dtypes:
            case = make_case(torch, name, dtypes[dt], 'cuda')
            results = {}
            for _ in range(max(1, args.repeats)):
                for m in methods:
                    for deterministic in (False, True):
                        torch.use_deterministic_algorithms(deterministic)
                        results[(m, deterministic)] = fastest(results.get((m, deterministic)),
                                                              measure(torch, bench, m, case))
                torch.use_deterministic_algorithms(False)
            cells = [CASES[name][0], dt]
            for m in methods:
                default, deterministic = results[(m, False)][1], results[(m, True)][1]
                cost = (f'{deterministic / default:.2f}x' if isinstance(default, float) and
                        isinstance(deterministic, float) else 'n/a')
                cells += [fmt(default), fmt(deterministic), cost]
            lines.append('| ' + ' | '.join(cells) + ' |')
            print(lines[-1], file=sys.stderr)
            del case
            torch.cuda.empty_cache()
    return emit(args, lines)


def main(argv=None):
    run(parse_args(argv))


if __name__ == '__main__':
    main()
