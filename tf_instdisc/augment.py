"""Per-example, stateless image augmentation as the official NPID code, and evaluation preprocessing.

Every op maps one image [H, W, C] (C = 1 or 3) and a seed [2] int to an image, runs eagerly and inside
`tf.data.Dataset.map`, and gives the same output for the same seed. Images are float32 in [0, 1] between ops;
`augment_for_train` and `preprocess_for_eval` return float32 pixels in [0, 255], the model's input contract.
"""

from __future__ import annotations

import tensorflow as tf

from tf_instdisc import config as config_lib

_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default.


def to_unit_float(image: tf.Tensor) -> tf.Tensor:
  """uint8 [0, 255] (or float in [0, 255]) -> float32 [0, 1]."""
  return tf.cast(image, tf.float32) / 255.0


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, *, size: int, scale: tuple[float, float]) -> tf.Tensor:
  """Crops a random box covering `scale` of the area with aspect ratio in [3/4, 4/3], resized to size x size.

  Args:
    image: [H, W, C] float32 in [0, 1], any H and W.
    seed: [2] int.
    size: output side.
    scale: (min, max) fraction of the image area.

  Returns:
    [size, size, C] float32.
  """
  begin, crop_size, boxes = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=_ASPECT_RATIO_RANGE, area_range=scale, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  del begin, crop_size
  crop = tf.image.crop_and_resize(image[None], boxes[0], box_indices=[0], crop_size=[size, size])
  return crop[0]


def color_jitter(image: tf.Tensor, seed: tf.Tensor, *, strength: float) -> tf.Tensor:
  """Brightness, contrast (and for RGB saturation and hue) jitter of the given strength, then clip to [0, 1].

  Factors follow torchvision's ColorJitter(s, s, s, min(s, 0.5)): brightness and contrast and saturation
  multiply by a factor in [1 - s, 1 + s]; hue shifts by up to s. The order is fixed (torchvision randomises it).

  Args:
    image: [H, W, C] float32 in [0, 1], C = 1 or 3.
    seed: [2] int.
    strength: s in [0, 1].

  Returns:
    [H, W, C] float32 in [0, 1].
  """
  if strength == 0.0:
    return image
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  low, high = max(0.0, 1.0 - strength), 1.0 + strength
  brightness = tf.random.stateless_uniform([], seeds[0], low, high)
  image = image * brightness
  image = tf.image.stateless_random_contrast(image, low, high, seed=seeds[1])
  if image.shape[-1] == 3:
    image = tf.image.stateless_random_saturation(tf.clip_by_value(image, 0.0, 1.0), low, high, seed=seeds[2])
    image = tf.image.stateless_random_hue(image, min(strength, 0.5), seed=seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0)


def random_grayscale(image: tf.Tensor, seed: tf.Tensor, *, prob: float) -> tf.Tensor:
  """With probability `prob`, replaces an RGB image by its luminance in all three channels; 1-channel: identity."""
  if image.shape[-1] != 3 or prob == 0.0:
    return image
  gray = tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])
  return tf.where(tf.random.stateless_uniform([], seed) < prob, gray, image)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Left-right flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


BLUR_WINDOW = 5  # The blur's kernel side; its padding needs images of at least BLUR_WINDOW // 2 px a side.


def gaussian_blur(image: tf.Tensor, seed: tf.Tensor, *, prob: float, window: int = BLUR_WINDOW,
                  sigma_range: tuple[float, float] = (0.1, 2.0)) -> tf.Tensor:
  """With probability `prob`, blurs with a Gaussian of sigma drawn from sigma_range (in pixels), window x window.

  Args:
    image: [H, W, C] float32 in [0, 1].
    seed: [2] int.
    prob: in [0, 1].
    window: odd side of the kernel; 5 suits 28-32 px images (a 2 px sigma is cut at 1 sigma).
    sigma_range: (min, max) standard deviation in pixels.

  Returns:
    [H, W, C] float32 in [0, 1].
  """
  if prob == 0.0:
    return image
  apply_seed, sigma_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  sigma = tf.random.stateless_uniform([], sigma_seed, *sigma_range)
  offsets = tf.range(window, dtype=tf.float32) - (window - 1) / 2
  kernel_1d = tf.exp(-0.5 * tf.square(offsets / sigma))
  kernel_1d /= tf.reduce_sum(kernel_1d)
  channels = image.shape[-1]
  # Separable: a depthwise column pass, then a row pass; "SYMMETRIC" padding keeps the borders' brightness.
  pad = (window - 1) // 2
  padded = tf.pad(image[None], [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="SYMMETRIC")
  columns = tf.tile(tf.reshape(kernel_1d, [window, 1, 1, 1]), [1, 1, channels, 1])
  rows = tf.tile(tf.reshape(kernel_1d, [1, window, 1, 1]), [1, 1, channels, 1])
  blurred = tf.nn.depthwise_conv2d(padded, columns, strides=[1, 1, 1, 1], padding="VALID")
  blurred = tf.nn.depthwise_conv2d(blurred, rows, strides=[1, 1, 1, 1], padding="VALID")[0]
  return tf.where(tf.random.stateless_uniform([], apply_seed) < prob, blurred, image)


def random_erasing(image: tf.Tensor, seed: tf.Tensor, *, prob: float, area_range: tuple[float, float] = (0.02, 0.25),
                   aspect_range: tuple[float, float] = (0.3, 3.3)) -> tf.Tensor:
  """With probability `prob`, sets a random rectangle to 0 (Zhong et al. 2020; torchvision RandomErasing's ranges).

  Args:
    image: [H, W, C] float32 in [0, 1].
    seed: [2] int.
    prob: in [0, 1].
    area_range: fraction of the image area erased.
    aspect_range: height / width of the rectangle, drawn log-uniformly.

  Returns:
    [H, W, C] float32 in [0, 1].
  """
  if prob == 0.0:
    return image
  draws = tf.random.stateless_uniform([5], seed)  # apply, area, aspect, top, left
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  area = (area_range[0] + draws[1] * (area_range[1] - area_range[0])) * height * width
  log_low, log_high = tf.math.log(aspect_range[0]), tf.math.log(aspect_range[1])
  aspect = tf.exp(log_low + draws[2] * (log_high - log_low))
  box_height = tf.minimum(tf.round(tf.sqrt(area * aspect)), height)
  box_width = tf.minimum(tf.round(tf.sqrt(area / aspect)), width)
  top = tf.floor(draws[3] * (height - box_height + 1))
  left = tf.floor(draws[4] * (width - box_width + 1))
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)  # [H, W]
  erase = inside[..., None] & (draws[0] < prob)
  return tf.where(erase, tf.zeros_like(image), image)


def example_seed(seed: int, instance_id: tf.Tensor, epoch: tf.Tensor, view: int = 0) -> tf.Tensor:
  """The [2] int64 seed of one example's augmentation in one epoch: a function of (seed, instance_id, epoch, view).

  View 0 has the seed it had before views existed, so one-view runs keep their exact augmentations.
  """
  base = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  seed_of_example = tf.random.experimental.stateless_fold_in(base, tf.cast(instance_id, tf.int64))
  return seed_of_example if view == 0 else tf.random.experimental.stateless_fold_in(seed_of_example, view)


def augment_for_train(image: tf.Tensor, seed: tf.Tensor, cfg: config_lib.AugmentConfig, *, size: int) -> tf.Tensor:
  """The full training augmentation: resized crop, colour jitter, grayscale, flip, then blur and erasing (when on).

  Args:
    image: [H, W, C] uint8 (or float in [0, 255]).
    seed: [2] int, see `example_seed`.
    cfg: the augmentation section.
    size: output side.

  Returns:
    [size, size, C] float32 in [0, 255].
  """
  crop_seed, jitter_seed, gray_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=4))
  image = random_resized_crop(to_unit_float(image), crop_seed, size=size,
                              scale=(cfg.crop_scale_min, cfg.crop_scale_max))
  image = color_jitter(image, jitter_seed, strength=cfg.color_jitter)
  image = random_grayscale(image, gray_seed, prob=cfg.grayscale_prob)
  if cfg.horizontal_flip:
    image = random_flip(image, flip_seed)
  # Seeds of their own, derived from the flip's: adding these ops leaves the crop, jitter and flip draws unchanged.
  blur_seed, erasing_seed = tf.unstack(tf.random.experimental.stateless_split(flip_seed, num=2))
  image = gaussian_blur(image, blur_seed, prob=cfg.blur_prob)
  image = random_erasing(image, erasing_seed, prob=cfg.erasing_prob)
  return image * 255.0


def preprocess_for_eval(image: tf.Tensor, *, size: int, crop_fraction: float) -> tf.Tensor:
  """Deterministic evaluation view: the central square of side crop_fraction * min(H, W), resized to size.

  An image that already is size x size with crop_fraction 1 passes through unchanged. A batch [B, H, W, C] of
  same-sized images is processed as one (the exported serving signatures do this).

  Args:
    image: [H, W, C] or [B, H, W, C] uint8 (or float in [0, 255]).
    size: output side.
    crop_fraction: in (0, 1]; 0.875 is the usual ImageNet centre crop.

  Returns:
    [size, size, C] (or [B, size, size, C]) float32 in [0, 255].
  """
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  height, width = shape[-3], shape[-2]
  side = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * crop_fraction, tf.int32)
  top, left = (height - side) // 2, (width - side) // 2
  crop = image[..., top:top + side, left:left + side, :]
  resized = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
  same = tf.logical_and(tf.equal(side, size), tf.logical_and(tf.equal(height, size), tf.equal(width, size)))
  # resize_with_crop_or_pad is the identity when `same` holds; unlike ensure_shape it also traces when the static
  # input shape differs from size x size (a fixed 28 x 28 image evaluated at --image_size=32).
  return tf.cond(same, lambda: tf.image.resize_with_crop_or_pad(image, size, size), lambda: resized)
