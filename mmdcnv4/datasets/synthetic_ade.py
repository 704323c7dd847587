"""A small synthetic dataset in ADE20K's on-disk format, for demos and tests.

Layout (as ``ADEChallengeData2016``, so mmseg's ADE20K pipelines read it unchanged)::

    OUT_DIR/images/{training,validation}/synth_XXXXXXXX.jpg        RGB images
    OUT_DIR/annotations/{training,validation}/synth_XXXXXXXX.png   8-bit label maps

The label maps follow ADE20K's index convention: 0 is "other"/unlabelled and is ignored, the classes are
1..K, and configs read them with ``reduce_zero_label=True`` (0 -> 255, k -> k - 1). Each image is a
textured ground (class 1) with a few shapes drawn on it: a disc, a box, a triangle and a ring (classes
2..5), each with its own texture (stripes, checks, dots, plain) and a colour drawn so widely that the
classes' colour ranges overlap, plus sometimes an unlabelled blob (index 0). The content is a pure
function of (seed, split, index): the same arguments give the same files.

Command line::

    python -m mmdcnv4.datasets.synthetic_ade OUT_DIR [--num-train 200] [--num-val 40] [--size 96] [--seed 0]
"""
import argparse
import json
import os
import os.path as osp

import cv2
import numpy as np

# Class k + 1 of the label maps is CLASSES[k] (index 0 is "other", ignored).
CLASSES = ('ground', 'disc', 'box', 'triangle', 'ring')
PALETTE = [[120, 120, 70], [220, 20, 60], [0, 102, 204], [250, 170, 30], [153, 51, 255]]
SPLITS = {'training': 0, 'validation': 1}
META_FILE = 'synthetic_ade.json'

# Mean RGB colour of each class (index 0 = the unlabelled blob) and its texture.
_COLOURS = np.array([[128, 128, 128], [96, 140, 72], [200, 50, 50], [50, 90, 200], [220, 200, 40],
                     [170, 60, 200]], np.float32)
_TEXTURES = ('noise', 'noise', 'stripes', 'checker', 'dots', 'plain')


def _texture(kind, rng, h, w):
    """A (h, w) modulation in [-1, 1] with a random phase/period, so no two images share one exactly."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 'stripes':
        period, angle = rng.uniform(6, 10), rng.uniform(0, np.pi)
        t = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == 'checker':
        cell = int(rng.integers(4, 8))
        t = (((xx // cell) + (yy // cell)) % 2) * 2 - 1
    elif kind == 'dots':
        period = rng.uniform(5, 8)
        t = np.cos(2 * np.pi * xx / period) * np.cos(2 * np.pi * yy / period)
    elif kind == 'noise':
        coarse = rng.uniform(-1, 1, (max(h // 8, 1), max(w // 8, 1))).astype(np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    else:
        t = np.zeros((h, w), np.float32)
    return t.astype(np.float32)


def _shape_mask(label, rng, h, w):
    """A uint8 mask of one shape of class ``label`` at a random place and size."""
    mask = np.zeros((h, w), np.uint8)
    s = min(h, w)
    cx, cy = int(rng.integers(s // 8, w - s // 8)), int(rng.integers(s // 8, h - s // 8))
    r = int(rng.integers(s // 8, s // 4))
    if label == 2:  # disc
        cv2.circle(mask, (cx, cy), r, 1, -1)
    elif label == 3:  # box
        dx, dy = int(rng.integers(s // 8, s // 4)), int(rng.integers(s // 8, s // 4))
        cv2.rectangle(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 1, -1)
    elif label == 4:  # triangle
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([cx + 1.3 * r * np.cos(angles), cy + 1.3 * r * np.sin(angles)], 1)
        cv2.fillPoly(mask, [pts.round().astype(np.int32)], 1)
    elif label == 5:  # ring
        cv2.circle(mask, (cx, cy), r + 2, 1, max(r // 2, 3))
    else:  # 0: an unlabelled ellipse
        axes = (int(rng.integers(s // 12, s // 6)), int(rng.integers(s // 12, s // 6)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


def make_sample(seed, split, index, size=96):
    """Returns ``(image, label)``: an (H, W, 3) uint8 RGB image and an (H, W) uint8 ADE20K label map."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    label = np.ones((h, w), np.uint8)  # ground everywhere
    # 2-4 shapes of random classes, drawn in random order (later ones occlude earlier ones), and
    # sometimes an unlabelled blob.
    shapes = list(rng.choice([2, 3, 4, 5], size=int(rng.integers(2, 5))))
    if rng.random() < 0.5:
        shapes.insert(int(rng.integers(0, len(shapes) + 1)), 0)
    for cls in shapes:
        label[_shape_mask(int(cls), rng, h, w)] = cls

    image = np.empty((h, w, 3), np.float32)
    for cls in range(len(_COLOURS)):
        where = label == cls
        if not where.any():
            continue
        colour = _COLOURS[cls] + rng.uniform(-70, 70, 3)  # wide: colour ranges of the classes overlap
        tex = _texture(_TEXTURES[cls], rng, h, w)[where]
        amp = 35.0 if _TEXTURES[cls] != 'noise' else 25.0
        image[where] = colour + amp * tex[:, None]
    image += rng.normal(0, 6, image.shape)  # sensor noise
    return np.clip(image, 0, 255).astype(np.uint8), label


def _meta(num_train, num_val, size, seed):
    return dict(format='ADE20K', classes=list(CLASSES), palette=PALETTE, num_train=num_train,
                num_val=num_val, size=size, seed=seed)


def is_complete(out_dir, num_train=200, num_val=40, size=96, seed=0):
    """True when ``out_dir`` holds a finished dataset made with these arguments."""
    try:
        with open(osp.join(out_dir, META_FILE)) as f:
            return json.load(f) == json.loads(json.dumps(_meta(num_train, num_val, size, seed)))
    except (OSError, ValueError):
        return False


def generate(out_dir, num_train=200, num_val=40, size=96, seed=0):
    """Writes the dataset under ``out_dir`` (reused as is when already complete). Returns ``out_dir``."""
    if is_complete(out_dir, num_train, num_val, size, seed):
        return out_dir
    for split, count in (('training', num_train), ('validation', num_val)):
        img_dir = osp.join(out_dir, 'images', split)
        ann_dir = osp.join(out_dir, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        for i in range(count):
            image, label = make_sample(seed, split, i, size)
            name = f'synth_{i:08d}'
            cv2.imwrite(osp.join(img_dir, name + '.jpg'), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(osp.join(ann_dir, name + '.png'), label)
    # Written last: its presence marks a complete dataset.
    with open(osp.join(out_dir, META_FILE), 'w') as f:
        json.dump(_meta(num_train, num_val, size, seed), f, indent=1)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write a small synthetic dataset in ADE20K format.')
    parser.add_argument('out_dir', help='where to write images/ and annotations/')
    parser.add_argument('--num-train', type=int, default=200)
    parser.add_argument('--num-val', type=int, default=40)
    parser.add_argument('--size', type=int, default=96, help='image side in pixels')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    generate(args.out_dir, args.num_train, args.num_val, args.size, args.seed)
    print(f'synthetic ADE20K: {args.num_train} training + {args.num_val} validation images of '
          f'{args.size}x{args.size}, {len(CLASSES)} classes {CLASSES}, in {args.out_dir}')


if __name__ == '__main__':
    main()
