"""Augmentation ops: eager == tf.data, stateless determinism, shapes, dtypes, ranges, crop scale."""

from tests import testing  # noqa: F401  # First: splits the CPU before TensorFlow starts.

# isort: split

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tf_instdisc import augment
from tf_instdisc import config as config_lib

SIZE = 16
_CFG = config_lib.AugmentConfig()

# Every op as image (uint8 [H, W, C]) x seed [2] -> image; ops documented on [0, 1] floats get them.
OPS = {
    "to_unit_float": lambda image, seed: augment.to_unit_float(image),
    "random_resized_crop": lambda image, seed: augment.random_resized_crop(
        augment.to_unit_float(image), seed, size=SIZE, scale=(0.2, 1.0)),
    "color_jitter": lambda image, seed: augment.color_jitter(augment.to_unit_float(image), seed, strength=0.4),
    "random_grayscale": lambda image, seed: augment.random_grayscale(augment.to_unit_float(image), seed, prob=0.5),
    "random_flip": lambda image, seed: augment.random_flip(augment.to_unit_float(image), seed),
    "gaussian_blur": lambda image, seed: augment.gaussian_blur(augment.to_unit_float(image), seed, prob=1.0),
    "random_erasing": lambda image, seed: augment.random_erasing(augment.to_unit_float(image), seed, prob=1.0),
    "augment_for_train": lambda image, seed: augment.augment_for_train(image, seed, _CFG, size=SIZE),
    "preprocess_for_eval": lambda image, seed: augment.preprocess_for_eval(image, size=SIZE, crop_fraction=0.875),
}
# Ops that must give different outputs for different seeds (on RGB images; grayscale is identity on one channel).
RANDOM_OPS = ("random_resized_crop", "color_jitter", "random_grayscale", "random_flip", "gaussian_blur",
              "random_erasing", "augment_for_train")
IMAGE_SHAPES = {"square_rgb": (24, 24, 3), "square_gray": (24, 24, 1), "wide_rgb": (20, 32, 3),
                "tall_gray": (40, 18, 1)}


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _op_shape_cases():
  # One square single-channel and one non-square RGB image per op keeps the file fast; ShapeAndRangeTest has all.
  for op in OPS:
    for shape_name in ("square_gray", "wide_rgb"):
      yield {"testcase_name": f"{op}_{shape_name}", "op": op, "shape": IMAGE_SHAPES[shape_name]}


def _map_once(function, *tensors):
  """Runs `function` inside tf.data.Dataset.map (graph mode) on one element and returns the result."""
  dataset = tf.data.Dataset.from_tensors(tuple(tf.constant(t) for t in tensors)).map(function)
  return next(iter(dataset))


class EagerAndDatasetTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*_op_shape_cases())
  def test_dataset_map_matches_eager(self, op, shape):
    image, seed = _image(shape), np.array([3, 17], np.int64)
    eager = OPS[op](tf.constant(image), tf.constant(seed))
    mapped = _map_once(OPS[op], image, seed)
    self.assertEqual(eager.dtype, tf.float32)
    self.assertEqual(mapped.dtype, tf.float32)
    self.assertAllClose(mapped, eager, rtol=1e-5, atol=1e-4)

  @parameterized.named_parameters(*_op_shape_cases())
  def test_same_seed_same_output(self, op, shape):
    image, seed = tf.constant(_image(shape)), tf.constant([5, 9], tf.int64)
    self.assertAllEqual(OPS[op](image, seed), OPS[op](image, seed))

  @parameterized.parameters(*RANDOM_OPS)
  def test_different_seeds_different_outputs(self, op):
    image = tf.constant(_image((24, 24, 3)))
    outputs = [OPS[op](image, tf.constant([seed, 0], tf.int64)).numpy() for seed in range(8)]
    self.assertFalse(all(np.array_equal(outputs[0], other) for other in outputs[1:]))

  @parameterized.parameters("augment_for_train", "preprocess_for_eval")
  def test_unknown_spatial_shape_in_dataset(self, op):
    # Decoded images have unknown H and W inside tf.data; the channel count is known (data.py ensures it).
    image = _image((20, 28, 3))
    dataset = tf.data.Dataset.from_generator(
        lambda: iter([image]), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    mapped = next(iter(dataset.map(lambda x: OPS[op](x, tf.constant([1, 2], tf.int64)))))
    self.assertAllClose(mapped, OPS[op](tf.constant(image), tf.constant([1, 2], tf.int64)), rtol=1e-5, atol=1e-4)


class ShapeAndRangeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": name, "shape": shape} for name, shape in IMAGE_SHAPES.items())
  def test_augment_for_train(self, shape):
    for seed in range(4):
      output = augment.augment_for_train(tf.constant(_image(shape, seed)), tf.constant([seed, 1], tf.int64), _CFG,
                                         size=SIZE)
      self.assertEqual(output.shape, (SIZE, SIZE, shape[-1]))
      self.assertEqual(output.dtype, tf.float32)
      self.assertAllInRange(output, 0.0, 255.0)

  @parameterized.product(value=(0, 255), channels=(1, 3))
  def test_augment_for_train_saturated_images_stay_in_range(self, value, channels):
    image = tf.fill([24, 24, channels], tf.constant(value, tf.uint8))
    for seed in range(4):
      output = augment.augment_for_train(image, tf.constant([seed, 2], tf.int64), _CFG, size=SIZE)
      self.assertAllInRange(output, 0.0, 255.0)

  def test_augment_for_train_uses_pixel_scale(self):
    # A [0, 255] output, not [0, 1]: a bright image must stay bright whatever the augmentation.
    image = tf.fill([24, 24, 3], tf.constant(200, tf.uint8))
    no_jitter = config_lib.AugmentConfig(color_jitter=0.0, grayscale_prob=0.0)
    output = augment.augment_for_train(image, tf.constant([0, 0], tf.int64), no_jitter, size=SIZE)
    self.assertAllClose(output, tf.fill([SIZE, SIZE, 3], 200.0), atol=1e-3)

  @parameterized.product(shape=tuple(IMAGE_SHAPES.values()), crop_fraction=(0.875, 1.0))
  def test_preprocess_for_eval(self, shape, crop_fraction):
    output = augment.preprocess_for_eval(tf.constant(_image(shape)), size=SIZE, crop_fraction=crop_fraction)
    self.assertEqual(output.shape, (SIZE, SIZE, shape[-1]))
    self.assertEqual(output.dtype, tf.float32)
    self.assertAllInRange(output, 0.0, 255.0)

  @parameterized.parameters(1, 3)
  def test_intermediate_ops_stay_in_unit_range(self, channels):
    image = augment.to_unit_float(tf.constant(_image((24, 24, channels))))
    seed = tf.constant([4, 4], tf.int64)
    self.assertAllInRange(augment.random_resized_crop(image, seed, size=SIZE, scale=(0.2, 1.0)), 0.0, 1.0)
    self.assertAllInRange(augment.color_jitter(image, seed, strength=1.0), 0.0, 1.0)


class EvalPreprocessTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(1, 3)
  def test_identity_for_sized_image(self, channels):
    image = _image((SIZE, SIZE, channels))
    output = augment.preprocess_for_eval(tf.constant(image), size=SIZE, crop_fraction=1.0)
    self.assertAllEqual(output, image.astype(np.float32))

  def test_identity_inside_dataset(self):
    image = _image((SIZE, SIZE, 3))
    mapped = _map_once(lambda x: augment.preprocess_for_eval(x, size=SIZE, crop_fraction=1.0), image)
    self.assertAllEqual(mapped, image.astype(np.float32))

  @parameterized.parameters(((SIZE, SIZE, 1), 1.0), ((30, 20, 3), 0.875), ((12, 12, 3), 1.0))
  def test_batch_equals_one_by_one(self, shape, crop_fraction):
    # The export's serving signatures preprocess a whole batch at once; it must match the per-image pipeline.
    images = np.stack([_image(shape), 255 - _image(shape)])
    batched = augment.preprocess_for_eval(tf.constant(images), size=SIZE, crop_fraction=crop_fraction)
    for i, image in enumerate(images):
      self.assertAllClose(batched[i], augment.preprocess_for_eval(tf.constant(image), size=SIZE,
                                                                  crop_fraction=crop_fraction), atol=1e-4)

  @parameterized.named_parameters(
      # A white central square on black: the centre crop sees only white.
      {"testcase_name": "wide_full_height", "shape": (16, 32), "box": (0, 16, 8, 24), "crop_fraction": 1.0},
      {"testcase_name": "tall_full_width", "shape": (30, 10), "box": (10, 20, 0, 10), "crop_fraction": 1.0},
      {"testcase_name": "square_half", "shape": (32, 32), "box": (8, 24, 8, 24), "crop_fraction": 0.5},
  )
  def test_takes_the_central_square(self, shape, box, crop_fraction):
    image = np.zeros([*shape, 1], np.uint8)
    top, bottom, left, right = box
    image[top:bottom, left:right] = 255
    output = augment.preprocess_for_eval(tf.constant(image), size=8, crop_fraction=crop_fraction)
    self.assertAllClose(output, np.full([8, 8, 1], 255.0), atol=1e-3)


class GrayscaleTest(tf.test.TestCase):

  def test_prob_one_gives_equal_channels(self):
    image = augment.to_unit_float(tf.constant(_image((12, 10, 3))))
    for seed in range(4):
      output = augment.random_grayscale(image, tf.constant([seed, 0], tf.int64), prob=1.0).numpy()
      self.assertAllEqual(output[..., 0], output[..., 1])
      self.assertAllEqual(output[..., 0], output[..., 2])
      self.assertAllClose(output[..., :1], tf.image.rgb_to_grayscale(image))

  def test_prob_zero_is_identity(self):
    image = augment.to_unit_float(tf.constant(_image((12, 10, 3))))
    self.assertAllEqual(augment.random_grayscale(image, tf.constant([0, 0], tf.int64), prob=0.0), image)

  def test_one_channel_is_identity(self):
    image = augment.to_unit_float(tf.constant(_image((12, 10, 1))))
    self.assertAllEqual(augment.random_grayscale(image, tf.constant([0, 0], tf.int64), prob=1.0), image)


def _coordinate_ramp(height, width):
  """Channel 0 = x / (W - 1), channel 1 = y / (H - 1): a bilinear crop's channel ranges are its box's sides."""
  ramp = np.zeros([height, width, 3], np.float32)
  ramp[:, :, 0] = np.arange(width)[None, :] / (width - 1)
  ramp[:, :, 1] = np.arange(height)[:, None] / (height - 1)
  return ramp


class ResizedCropTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      {"testcase_name": "default", "scale": (0.2, 1.0)},
      {"testcase_name": "narrow", "scale": (0.25, 0.5)},
      {"testcase_name": "small", "scale": (0.08, 0.1)},
      {"testcase_name": "full", "scale": (1.0, 1.0)},
  )
  def test_crop_area_and_aspect_respected_roughly(self, scale):
    ramp = tf.constant(_coordinate_ramp(64, 64))
    areas, aspects = [], []
    for seed in range(16):
      crop = augment.random_resized_crop(ramp, tf.constant([seed, 7], tf.int64), size=SIZE, scale=scale).numpy()
      width = crop[..., 0].max() - crop[..., 0].min()
      height = crop[..., 1].max() - crop[..., 1].min()
      areas.append(width * height)
      aspects.append(width / height)
    self.assertAllInRange(areas, scale[0] - 0.05, scale[1] + 0.02)
    self.assertAllInRange(aspects, 3.0 / 4.0 - 0.08, 4.0 / 3.0 + 0.08)

  def test_crop_areas_spread_over_the_range(self):
    ramp = tf.constant(_coordinate_ramp(64, 64))
    areas = []
    for seed in range(32):
      crop = augment.random_resized_crop(ramp, tf.constant([seed, 3], tf.int64), size=SIZE, scale=(0.2, 1.0)).numpy()
      areas.append((crop[..., 0].max() - crop[..., 0].min()) * (crop[..., 1].max() - crop[..., 1].min()))
    self.assertLess(min(areas), 0.4)
    self.assertGreater(max(areas), 0.75)


class ExampleSeedTest(tf.test.TestCase):

  def test_deterministic_and_same_in_dataset(self):
    eager = augment.example_seed(3, tf.constant(41, tf.int64), tf.constant(2, tf.int64))
    mapped = _map_once(lambda i, e: augment.example_seed(3, i, e), np.int64(41), np.int64(2))
    self.assertEqual(eager.shape, (2,))
    self.assertAllEqual(eager, mapped)
    self.assertAllEqual(eager, augment.example_seed(3, tf.constant(41, tf.int64), tf.constant(2, tf.int64)))

  def test_depends_on_seed_instance_and_epoch(self):
    base = augment.example_seed(3, tf.constant(41), tf.constant(2)).numpy().tolist()
    others = [augment.example_seed(4, tf.constant(41), tf.constant(2)).numpy().tolist(),
              augment.example_seed(3, tf.constant(42), tf.constant(2)).numpy().tolist(),
              augment.example_seed(3, tf.constant(41), tf.constant(3)).numpy().tolist()]
    for other in others:
      self.assertNotEqual(other, base)
    self.assertLen({tuple(seed) for seed in others}, 3)


if __name__ == "__main__":
  tf.test.main()


class BlurAndErasingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(1, 3)
  def test_blur_keeps_a_constant_image_and_the_range(self, channels):
    flat = tf.fill([12, 12, channels], 0.6)
    self.assertAllClose(augment.gaussian_blur(flat, tf.constant([1, 2], tf.int64), prob=1.0), flat, atol=1e-6)
    noisy = augment.to_unit_float(_image((12, 12, channels)))
    blurred = augment.gaussian_blur(noisy, tf.constant([1, 2], tf.int64), prob=1.0).numpy()
    self.assertBetween(float(blurred.min()), 0.0, 1.0)
    self.assertLess(float(np.std(blurred)), float(np.std(noisy.numpy())))  # Smoother than the noise it blurs.

  def test_blur_matches_numpy_separable_gaussian(self):
    image = augment.to_unit_float(_image((9, 9, 1), seed=3))
    seed = tf.constant([4, 5], tf.int64)
    blurred = augment.gaussian_blur(image, seed, prob=1.0).numpy()[..., 0]
    # The same sigma draw as the op: the second of two split seeds.
    sigma = float(tf.random.stateless_uniform([], tf.random.experimental.stateless_split(seed, num=2)[1], 0.1, 2.0))
    weights = np.exp(-0.5 * (np.arange(5) - 2.0) ** 2 / sigma**2)
    weights /= weights.sum()
    padded = np.pad(image.numpy()[..., 0], 2, mode="symmetric")
    expected = np.zeros((9, 9))
    for row in range(9):
      for col in range(9):
        expected[row, col] = sum(weights[i] * weights[j] * padded[row + i, col + j]
                                 for i in range(5) for j in range(5))
    self.assertAllClose(blurred, expected, atol=1e-5)

  def test_erasing_zeroes_one_rectangle_of_the_area_range(self):
    image = tf.ones([28, 28, 1])
    areas = []
    for seed in range(30):
      erased = augment.random_erasing(image, tf.constant([seed, 1], tf.int64), prob=1.0).numpy()[..., 0]
      rows, cols = np.nonzero(erased == 0.0)
      box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
      self.assertEqual(box, len(rows))  # The zeros fill one rectangle.
      areas.append(len(rows) / 784)
    self.assertBetween(min(areas), 0.005, 0.25)
    self.assertLessEqual(max(areas), 0.3)  # 25% of the area, rounded to whole pixels.

  @parameterized.parameters("gaussian_blur", "random_erasing")
  def test_probability_zero_is_identity(self, op):
    image = augment.to_unit_float(_image((12, 12, 3)))
    self.assertAllEqual(getattr(augment, op)(image, tf.constant([1, 2], tf.int64), prob=0.0), image)

  def test_one_view_augmentation_unchanged_by_the_new_ops_when_off(self):
    # View 0's seed and the crop/jitter/flip draws do not depend on the blur and erasing settings.
    image, seed = tf.constant(_image((28, 28, 1))), augment.example_seed(0, tf.constant(7), tf.constant(2))
    self.assertAllEqual(seed, augment.example_seed(0, tf.constant(7), tf.constant(2), view=0))
    self.assertNotAllEqual(seed, augment.example_seed(0, tf.constant(7), tf.constant(2), view=1))
    plain = augment.augment_for_train(image, seed, _CFG, size=SIZE)
    erased = augment.augment_for_train(image, seed, config_lib.AugmentConfig(erasing_prob=1.0), size=SIZE)
    changed = plain.numpy() != erased.numpy()
    self.assertTrue(np.any(changed))
    self.assertAllEqual(erased.numpy()[~changed], plain.numpy()[~changed])
    self.assertTrue(np.all(erased.numpy()[changed] == 0.0))
