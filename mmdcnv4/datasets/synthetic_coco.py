"""A small synthetic COCO-format instance-segmentation dataset, written to disk.

Each image is a noisy, low-contrast background with a few filled shapes on it: circles, squares and
triangles (the default classes), each class in its own colour (jittered a little). Every object has a
polygon mask (the exact polygon that was drawn), a box and an area, as in COCO's ``instances_*.json``.
Objects do not overlap, so every mask is the visible object. The output is deterministic for a given set
of arguments (the seed included): the same call writes byte-identical files.

Layout (what mmdet's ``CocoDataset`` and ``CocoMetric`` read)::

    OUT_DIR/
      annotations/instances_train.json   annotations/instances_val.json
      train/000000.jpg ...               val/000000.jpg ...
      meta.json                          the arguments it was generated with

Command line::

    python -m mmdcnv4.datasets.synthetic_coco OUT_DIR [--num-train 400] [--num-val 50] [--size 160]
"""
import argparse
import json
import math
import os
import os.path as osp

import cv2
import numpy as np

__all__ = ['CLASSES', 'PALETTE', 'generate_synthetic_coco', 'synthetic_coco_exists']

#: class names, in category-id order (ids start at 1, as in COCO)
CLASSES = ('circle', 'square', 'triangle')
#: RGB colour of each class
PALETTE = ((220, 40, 40), (40, 190, 60), (50, 80, 230))
_FORMAT_VERSION = 1


def _background(rng, height, width):
    """A low-contrast colour gradient plus blotches and pixel noise (float32 RGB in [0, 255])."""
    base = rng.uniform(70, 170, size=3)
    tilt = rng.uniform(-40, 40, size=(2, 3))
    yy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    img = base[None, None, :] + yy * tilt[0][None, None, :] + xx * tilt[1][None, None, :]
    # coarse blotches: a low-resolution noise field upsampled
    coarse = rng.normal(0, 18, size=(max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
    img = img + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    img = img + rng.normal(0, 10, size=(height, width, 3))
    return img.astype(np.float32)


def _shape_polygon(rng, cls_name, cx, cy, size):
    """Vertices (K, 2) as float (x, y) of one shape whose bounding box is about ``size`` wide."""
    r = size / 2.0
    if cls_name == 'circle':
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    if cls_name == 'square':
        angle = rng.uniform(-math.pi / 8, math.pi / 8)
        t = angle + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        rr = r * math.sqrt(2) / (abs(math.cos(angle)) + abs(math.sin(angle)))  # keep the box about size
        return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1)
    if cls_name == 'triangle':
        angle = -math.pi / 2 + rng.uniform(-math.pi / 10, math.pi / 10)
        t = angle + np.array([0, 2, 4]) * math.pi / 3
        return np.stack([cx + r * 1.1 * np.cos(t), cy + r * 1.1 * np.sin(t) + 0.2 * r], axis=1)
    raise ValueError(f'unknown shape class {cls_name!r}; known: {CLASSES}')


def _polygon_area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _draw_image(rng, height, width, min_objects, max_objects, min_size, max_size, classes, palette):
    img = _background(rng, height, width)
    objects = []
    boxes = []
    num = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(num):
        for _attempt in range(50):
            label = int(rng.integers(len(classes)))
            size = float(rng.uniform(min_size, max_size))
            margin = size / 2 + 1
            cx = float(rng.uniform(margin, width - margin))
            cy = float(rng.uniform(margin, height - margin))
            poly = _shape_polygon(rng, classes[label], cx, cy, size)
            poly[:, 0] = np.clip(poly[:, 0], 0, width - 1)
            poly[:, 1] = np.clip(poly[:, 1], 0, height - 1)
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            gap = 3
            if any(x0 - gap < bx1 and bx0 - gap < x1 and y0 - gap < by1 and by0 - gap < y1
                   for bx0, by0, bx1, by1 in boxes):
                continue
            boxes.append((x0, y0, x1, y1))
            objects.append((label, poly))
            break
    for label, poly in objects:
        colour = np.clip(np.asarray(palette[label], np.float32) + rng.uniform(-25, 25, size=3), 0, 255)
        mask = np.zeros((height, width), np.uint8)
        # fixed-point drawing (shift=4) keeps sub-pixel vertices, so the drawn shape matches the polygon
        cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        shading = rng.uniform(-12, 12)
        img[mask.astype(bool)] = colour + shading
    img = img + rng.normal(0, 6, size=img.shape)  # noise over the objects too
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, objects


def _write_split(out_dir, split, num_images, rng, args):
    img_dir = osp.join(out_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        img, objects = _draw_image(rng, args['height'], args['width'], args['min_objects'],
                                   args['max_objects'], args['min_size'], args['max_size'],
                                   args['classes'], args['palette'])
        file_name = f'{i:06d}.jpg'
        # cv2 writes BGR; the arrays above are RGB
        if not cv2.imwrite(osp.join(img_dir, file_name), img[:, :, ::-1],
                           [cv2.IMWRITE_JPEG_QUALITY, args['jpeg_quality']]):
            raise OSError(f'could not write {osp.join(img_dir, file_name)}')
        image_id = i + 1
        images.append(dict(id=image_id, file_name=file_name, height=args['height'], width=args['width']))
        for label, poly in objects:
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            annotations.append(dict(
                id=ann_id, image_id=image_id, category_id=label + 1,
                segmentation=[[round(float(v), 2) for v in poly.reshape(-1)]],
                area=round(_polygon_area(poly), 2),
                bbox=[round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                      round(float(y1 - y0), 2)],
                iscrowd=0))
            ann_id += 1
    categories = [dict(id=k + 1, name=name, supercategory='shape') for k, name in enumerate(args['classes'])]
    coco = dict(info=dict(description=f'mmdcnv4 synthetic shapes ({split})', version='1.0'),
                licenses=[], images=images, annotations=annotations, categories=categories)
    ann_dir = osp.join(out_dir, 'annotations')
    os.makedirs(ann_dir, exist_ok=True)
    with open(osp.join(ann_dir, f'instances_{split}.json'), 'w') as f:
        json.dump(coco, f)
    return len(images), len(annotations)


def _arguments(num_train, num_val, size, min_objects, max_objects, min_size, max_size, seed, jpeg_quality,
               classes):
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    classes = tuple(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f'unknown classes {unknown}; the generator draws {CLASSES}')
    palette = tuple(PALETTE[CLASSES.index(c)] for c in classes)
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f'need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}')
    if not 4 <= min_size <= max_size <= min(height, width) - 2:
        raise ValueError(f'need 4 <= min_size <= max_size <= image size - 2, got {min_size}, {max_size}')
    return dict(format_version=_FORMAT_VERSION, num_train=int(num_train), num_val=int(num_val),
                height=int(height), width=int(width), min_objects=int(min_objects),
                max_objects=int(max_objects), min_size=float(min_size), max_size=float(max_size),
                seed=int(seed), jpeg_quality=int(jpeg_quality), classes=list(classes),
                palette=[list(p) for p in palette])


def synthetic_coco_exists(out_dir, **kwargs):
    """Whether ``out_dir`` holds a complete dataset generated with these arguments (see generate)."""
    args = _arguments(**{**_DEFAULTS, **kwargs})
    try:
        with open(osp.join(out_dir, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if meta.get('arguments') != json.loads(json.dumps(args)):
        return False
    for split, num in (('train', args['num_train']), ('val', args['num_val'])):
        if not osp.isfile(osp.join(out_dir, 'annotations', f'instances_{split}.json')):
            return False
        if not all(osp.isfile(osp.join(out_dir, split, f'{i:06d}.jpg')) for i in range(num)):
            return False
    return True


_DEFAULTS = dict(num_train=400, num_val=50, size=160, min_objects=1, max_objects=3, min_size=28,
                 max_size=72, seed=0, jpeg_quality=95, classes=CLASSES)


def generate_synthetic_coco(out_dir, num_train=400, num_val=50, size=160, min_objects=1, max_objects=3,
                            min_size=28, max_size=72, seed=0, jpeg_quality=95, classes=CLASSES,
                            reuse=True):
    """Writes the dataset to ``out_dir`` and returns a dict describing it.

    Args:
        out_dir: target folder (created). Files of an earlier dataset with the same names are replaced;
            nothing else in the folder is touched.
        num_train, num_val: images per split.
        size: image size, an int (square) or (height, width).
        min_objects, max_objects: objects per image (fewer if they do not fit without overlapping).
        min_size, max_size: object size range in pixels (about the side of its bounding box).
        seed: the random seed; the output is a function of the arguments only.
        jpeg_quality: JPEG quality of the images.
        classes: a subset of ``CLASSES`` (category ids follow this order).
        reuse: if ``out_dir`` already holds a complete dataset made with the same arguments, keep it.

    Returns:
        dict with ``data_root``, ``classes``, ``palette``, ``num_train``/``num_val`` (images),
        ``train_instances``/``val_instances``, ``reused``, and the ann_file/img prefix of each split
        relative to ``data_root``.
    """
    args = _arguments(num_train, num_val, size, min_objects, max_objects, min_size, max_size, seed,
                      jpeg_quality, classes)
    kwargs = dict(num_train=num_train, num_val=num_val, size=size, min_objects=min_objects,
                  max_objects=max_objects, min_size=min_size, max_size=max_size, seed=seed,
                  jpeg_quality=jpeg_quality, classes=classes)
    info = dict(data_root=osp.abspath(out_dir), classes=tuple(args['classes']),
                palette=[tuple(p) for p in args['palette']], num_train=args['num_train'],
                num_val=args['num_val'], train_ann_file='annotations/instances_train.json',
                val_ann_file='annotations/instances_val.json', train_img_prefix='train/',
                val_img_prefix='val/')
    meta_file = osp.join(out_dir, 'meta.json')
    if reuse and synthetic_coco_exists(out_dir, **kwargs):
        with open(meta_file) as f:
            meta = json.load(f)
        info.update(meta['counts'], reused=True)
        return info
    os.makedirs(out_dir, exist_ok=True)
    if osp.exists(meta_file):
        os.remove(meta_file)  # an interrupted run must not look complete
    # one independent stream per split, so the val split does not depend on num_train
    seeds = np.random.SeedSequence(args['seed']).spawn(2)
    counts = {}
    for split, num, ss in (('train', args['num_train'], seeds[0]), ('val', args['num_val'], seeds[1])):
        _, n_inst = _write_split(out_dir, split, num, np.random.default_rng(ss), args)
        counts[f'{split}_instances'] = n_inst
    with open(meta_file, 'w') as f:
        json.dump(dict(arguments=args, counts=counts), f, indent=1)
    info.update(counts, reused=False)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write a small synthetic COCO-format instance '
                                     'segmentation dataset (shapes on noisy backgrounds).')
    parser.add_argument('out_dir', help='output folder (e.g. data/synthetic_coco)')
    parser.add_argument('--num-train', type=int, default=_DEFAULTS['num_train'])
    parser.add_argument('--num-val', type=int, default=_DEFAULTS['num_val'])
    parser.add_argument('--size', type=int, nargs='+', default=[_DEFAULTS['size']],
                        help='image size: one int (square) or HEIGHT WIDTH')
    parser.add_argument('--min-objects', type=int, default=_DEFAULTS['min_objects'])
    parser.add_argument('--max-objects', type=int, default=_DEFAULTS['max_objects'])
    parser.add_argument('--min-size', type=float, default=_DEFAULTS['min_size'])
    parser.add_argument('--max-size', type=float, default=_DEFAULTS['max_size'])
    parser.add_argument('--seed', type=int, default=_DEFAULTS['seed'])
    parser.add_argument('--classes', nargs='+', default=list(CLASSES), choices=CLASSES)
    parser.add_argument('--force', action='store_true', help='regenerate even if an identical set exists')
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error('--size takes one or two integers')
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    info = generate_synthetic_coco(args.out_dir, num_train=args.num_train, num_val=args.num_val, size=size,
                                   min_objects=args.min_objects, max_objects=args.max_objects,
                                   min_size=args.min_size, max_size=args.max_size, seed=args.seed,
                                   classes=args.classes, reuse=not args.force)
    verb = 'reused' if info['reused'] else 'wrote'
    print(f"{verb} {info['data_root']}: {info['num_train']} train images ({info['train_instances']} "
          f"instances), {info['num_val']} val images ({info['val_instances']} instances), classes "
          f"{', '.join(info['classes'])}")
    return info


if __name__ == '__main__':
    main()
