"""plots: each figure is a readable PNG written atomically (nothing left at the tmp path); bad input raises."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
from absl.testing import absltest

from tf_instdisc import plots

TAB10_BLUE = (0x1F / 255, 0x77 / 255, 0xB4 / 255)  # tab10's first colour: class 0 in the map.


def _read(path: str) -> np.ndarray:
  from matplotlib import image

  return image.imread(path)


def _records(num_epochs: int, *, offset: float = 0.0) -> list[dict]:
  return [{"epoch": e, "loss": 8.0 - 0.3 * e + offset, "knn_top1": 0.4 + 0.03 * e if e % 2 else None}
          for e in range(1, num_epochs + 1)]


class PlotsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def assertIsPng(self, path: str) -> np.ndarray:
    self.assertTrue(os.path.exists(path), path)
    self.assertFalse(os.path.exists(path + plots.TMP_SUFFIX))
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    pixels = _read(path)
    self.assertEqual(pixels.ndim, 3)
    self.assertGreater(pixels.shape[0], 100)
    self.assertGreater(pixels.shape[1], 100)
    self.assertGreater(len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)), 10)  # Not a blank canvas.
    self.assertEqual(os.listdir(os.path.dirname(path)), [os.path.basename(path)])
    return pixels

  def _map_points(self, num_classes: int = 3, per_class: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = 10.0 * rng.normal(size=[num_classes, 2])
    return centres[labels] + rng.normal(size=[len(labels), 2]), labels

  def test_embedding_map_writes_a_png_into_a_new_directory(self):
    points, labels = self._map_points()
    output = os.path.join(self.dir, "nested", "map.png")
    plots.embedding_map(points, labels, output, class_names=["cat", "dog", "ship"], title="t-SNE")
    pixels = self.assertIsPng(output)
    rgb = pixels[..., :3]
    near_blue = np.all(np.abs(rgb - np.array(TAB10_BLUE)) < 0.05, axis=-1)  # Class 0's markers and legend entry.
    self.assertGreater(int(near_blue.sum()), 20)

  def test_embedding_map_without_names_and_with_many_classes(self):
    points, labels = self._map_points(num_classes=25, per_class=8)
    plots.embedding_map(points, labels, os.path.join(self.dir, "many.png"))
    self.assertIsPng(os.path.join(self.dir, "many.png"))

  def test_embedding_map_overwrites_an_existing_file(self):
    points, labels = self._map_points()
    output = os.path.join(self.dir, "map.png")
    with open(output, "w") as f:
      f.write("not a png")
    plots.embedding_map(points, labels, output)
    self.assertIsPng(output)

  def test_embedding_map_rejects_bad_input(self):
    points, labels = self._map_points()
    output = os.path.join(self.dir, "map.png")
    cases = [
        ((np.zeros([0, 2]), np.zeros([0], np.int64)), {}, "no points"),
        ((points, labels[:-1]), {}, r"labels must be \[N\] = \[150\]"),
        ((points[:, :1], labels), {}, r"points must be \[N, 2\]"),
        ((points, labels.astype(np.float32)), {}, "integer"),
        ((np.where(points > 0, np.nan, points), labels), {}, "NaN"),
        ((points, labels), {"class_names": ["cat", "dog"]}, "class_names has 2 names"),
    ]
    for args, kwargs, message in cases:
      with self.subTest(message), self.assertRaisesRegex(ValueError, message):
        plots.embedding_map(*args, output, **kwargs)
    self.assertEqual(os.listdir(self.dir), [])

  def test_ablation_curve_with_the_papers_series(self):
    output = os.path.join(self.dir, "ablation.png")
    ours = {"kNN": [70.0, 75.0, None, 80.0], "linear": [72.0, 76.0, 79.0, 81.0]}
    plots.ablation_curve(output, xs=[32, 64, 128, 256], ours=ours,
                         paper={"kNN (ImageNet)": [34.0, 38.0, 41.0, None]}, xlabel="embedding dimension",
                         log_x=True, x_ticklabels=["32", "64", "128", "256"], title="embedding dimension")
    self.assertIsPng(output)

  def test_ablation_curve_ours_alone(self):
    output = os.path.join(self.dir, "ablation.png")
    plots.ablation_curve(output, xs=[0.03, 0.07, 0.1], ours={"kNN": [60.0, None, 58.0]}, xlabel="temperature")
    self.assertIsPng(output)

  def test_ablation_curve_rejects_bad_input(self):
    output = os.path.join(self.dir, "ablation.png")
    cases = [
        ({"xs": [], "ours": {"kNN": []}}, "xs is empty"),
        ({"xs": [1, 2], "ours": {}}, "ours has no series"),
        ({"xs": [1, 2], "ours": {"kNN": [1.0]}}, r"ours\['kNN'\] has 1 values but xs has 2"),
        ({"xs": [1, 2], "ours": {"kNN": [1.0, 2.0]}, "paper": {"kNN": [1.0, 2.0, 3.0]}}, r"paper\['kNN'\] has 3"),
        ({"xs": [1, 2], "ours": {"kNN": [1.0, 2.0]}, "x_ticklabels": ["a"]}, "x_ticklabels has 1 labels"),
        ({"xs": [1, 2], "ours": {"kNN": [None, None]}}, "nothing to plot"),
        ({"xs": [0, 2], "ours": {"kNN": [1.0, 2.0]}, "log_x": True}, "positive"),
    ]
    for kwargs, message in cases:
      with self.subTest(message), self.assertRaisesRegex(ValueError, message):
        plots.ablation_curve(output, xlabel="x", **kwargs)
    self.assertEqual(os.listdir(self.dir), [])

  def test_training_curves_one_line_per_run(self):
    output = os.path.join(self.dir, "curves.png")
    runs = {"tau 0.07": _records(10), "tau 0.1": _records(6, offset=0.5), "no knn": [{"epoch": 1, "loss": 9.0}]}
    plots.training_curves(runs, output, title="temperature")
    pixels = self.assertIsPng(output)
    self.assertGreater(pixels.shape[1], pixels.shape[0])  # Two panels side by side.

  def test_training_curves_rejects_bad_input(self):
    output = os.path.join(self.dir, "curves.png")
    for runs, message in [({}, "no runs"), ({"a": []}, "run 'a' has no records"),
                          ({"a": [{"epoch": 1, "loss": 2.0}, {"loss": 1.0}]}, "run 'a' record 1 has no 'epoch'")]:
      with self.subTest(message), self.assertRaisesRegex(ValueError, message):
        plots.training_curves(runs, output)
    self.assertEqual(os.listdir(self.dir), [])

  def _drawn(self, function, *args, **kwargs) -> list:
    """Calls a plots function with saving replaced by a capture; returns the figure's axes (the figure is closed)."""
    captured = []

    def capture(fig, output):
      captured.append(fig)
      original_save(fig, output)

    original_save = plots._save
    with mock.patch.object(plots, "_save", capture):
      function(*args, **kwargs)
    self.assertLen(captured, 1)
    return captured[0].axes

  def test_ablation_curve_draws_ours_solid_and_the_paper_dashed_skipping_none(self):
    (ax,) = self._drawn(plots.ablation_curve, os.path.join(self.dir, "a.png"), xs=[1, 2, 3, 4],
                        ours={"kNN": [50.0, None, 60.0, 65.0], "linear": [55.0, 58.0, 61.0, 66.0]},
                        paper={"kNN (ImageNet)": [30.0, 35.0, None, None], "paper linear": [None, 40.0, 45.0, 50.0]},
                        xlabel="x", x_ticklabels=["a", "b", "c", "d"])
    lines = {line.get_label(): line for line in ax.get_lines()}
    self.assertEqual(list(lines), ["kNN", "linear", "paper kNN (ImageNet)", "paper linear"])
    self.assertEqual([lines[name].get_linestyle() for name in lines], ["-", "-", "--", "--"])
    np.testing.assert_array_equal(lines["kNN"].get_xdata(), [1, 3, 4])
    np.testing.assert_array_equal(lines["kNN"].get_ydata(), [50.0, 60.0, 65.0])
    np.testing.assert_array_equal(lines["paper kNN (ImageNet)"].get_xdata(), [1, 2])
    self.assertEqual(lines["kNN"].get_color(), lines["paper kNN (ImageNet)"].get_color())
    self.assertEqual([label.get_text() for label in ax.get_xticklabels()], ["a", "b", "c", "d"])
    self.assertEqual([text.get_text() for text in ax.get_legend().get_texts()], list(lines))

  def test_training_curves_plot_loss_and_knn_percent_per_run(self):
    loss_ax, knn_ax = self._drawn(plots.training_curves, {"a": _records(4), "b": _records(3, offset=1.0)},
                                  os.path.join(self.dir, "c.png"))
    self.assertEqual([line.get_label() for line in loss_ax.get_lines()], ["a", "b"])
    self.assertEqual([line.get_label() for line in knn_ax.get_lines()], ["a", "b"])
    np.testing.assert_allclose(loss_ax.get_lines()[1].get_ydata(), [8.7, 8.4, 8.1])
    knn_a = knn_ax.get_lines()[0]
    np.testing.assert_array_equal(knn_a.get_xdata(), [1, 3])  # Epochs 2 and 4 have knn_top1 None.
    np.testing.assert_allclose(knn_a.get_ydata(), [43.0, 49.0])
    self.assertIn("%", knn_ax.get_ylabel())

  def test_training_curves_against_wall_minutes_with_a_baseline(self):
    records = [{"epoch": e, "loss": 9.0 - e, "knn_top1": 0.5 + 0.1 * e, "time": {"wall_seconds": 90.0 * e}}
               for e in (1, 2, 3)]
    loss_ax, knn_ax = self._drawn(plots.training_curves, {"a": records}, os.path.join(self.dir, "w.png"),
                                  x="minutes", baselines={"pixels": 0.8})
    np.testing.assert_allclose(knn_ax.get_lines()[0].get_xdata(), [1.5, 3.0, 4.5])
    np.testing.assert_allclose(knn_ax.get_lines()[0].get_ydata(), [60.0, 70.0, 80.0])
    pixels = knn_ax.get_lines()[1]
    self.assertEqual(pixels.get_label(), "pixels")
    np.testing.assert_allclose(pixels.get_ydata(), [80.0, 80.0])
    self.assertEqual(pixels.get_linestyle(), "--")
    self.assertIn("minutes", loss_ax.get_xlabel())

  def test_training_curves_against_minutes_need_wall_times(self):
    with self.assertRaisesRegex(ValueError, "record 0 has no 'minutes'"):
      plots.training_curves({"a": [{"epoch": 1, "loss": 2.0}]}, os.path.join(self.dir, "w.png"), x="minutes")
    with self.assertRaisesRegex(ValueError, "x must be one of epoch, minutes"):
      plots.training_curves({"a": _records(2)}, os.path.join(self.dir, "w.png"), x="steps")

  def test_embedding_map_has_class_names_and_no_ticks(self):
    points, labels = self._map_points()
    (ax,) = self._drawn(plots.embedding_map, points, labels[::-1].copy(), os.path.join(self.dir, "m.png"),
                        class_names=["cat", "dog", "ship", "unused"])
    self.assertEqual([text.get_text() for text in ax.get_legend().get_texts()], ["cat", "dog", "ship"])
    self.assertEqual(list(ax.get_xticks()), [])
    self.assertEqual(list(ax.get_yticks()), [])
    self.assertEqual(sum(len(collection.get_offsets()) for collection in ax.collections), len(points))

  def test_a_failed_save_leaves_nothing_behind(self):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import figure
    from matplotlib import pyplot as plt

    def half_write_then_fail(fig, path, **kwargs):
      with open(path, "wb") as f:
        f.write(b"\x89PNG partial")
      raise OSError("disk full")

    output = os.path.join(self.dir, "curves.png")
    open_before = plt.get_fignums()
    with mock.patch.object(figure.Figure, "savefig", half_write_then_fail):
      with self.assertRaisesRegex(OSError, "disk full"):
        plots.training_curves({"a": _records(3)}, output)
    self.assertEqual(os.listdir(self.dir), [])
    self.assertEqual(plt.get_fignums(), open_before)  # The figure was closed anyway.


if __name__ == "__main__":
  absltest.main()
