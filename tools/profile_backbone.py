"""Where a backbone's inference time goes on the GPU: the torch profiler's CUDA kernels, heaviest first.

    python tools/profile_backbone.py [--arch b] [--batch-size 256] [--img-size 224] [--fp16] [--tf32]
                                     [--rows 25] [--out FILE]

Same settings as ``tools/benchmark_backbone.py`` (channels_last, cuDNN autotuning, inference_mode, fp16 =
autocast): a few warm-up batches, then ``--iters`` profiled ones. The table lists each CUDA kernel's total
time and share of the profiled GPU time, which shows which layers to work on.
"""
import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--arch', default='b', help='FlashInternImage size: t, s, b or l')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--fp16', action='store_true', help='autocast to fp16')
    parser.add_argument('--tf32', action='store_true', help='allow TF32 matmuls and convolutions')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--rows', type=int, default=25, help='kernels to list')
    parser.add_argument('--out', help='also write the table to this file')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    if not torch.cuda.is_available():
        sys.exit('profile_backbone.py needs a CUDA GPU.')
    from mmdcnv4.models import FlashInternImageCls
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True
    model = FlashInternImageCls(arch=args.arch).cuda().eval().to(memory_format=torch.channels_last)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device='cuda')
    images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast('cuda', dtype=torch.float16, enabled=args.fp16)

    def step():
        with torch.inference_mode(), autocast:
            model(images)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events)
    lines = [f'FlashInternImage-{args.arch.upper()}, batch {args.batch_size}, {args.img_size}x{args.img_size}, '
             f'{"fp16 autocast" if args.fp16 else "fp32"}, TF32 {"on" if args.tf32 else "off"}: '
             f'{total / args.iters / 1e3:.2f} ms of kernels per batch',
             '', '| kernel | calls per batch | ms per batch | share |', '|---|---|---|---|']
    for e in events[:args.rows]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + '...'
        lines.append(f'| {name} | {e.count / args.iters:.0f} | {e.device_time_total / args.iters / 1e3:.3f} | '
                     f'{100 * e.device_time_total / total:.1f}% |')
    text = '\n'.join(lines)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
