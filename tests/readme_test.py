"""The README's notebook example, run verbatim: own encoder, own data, fit, predict, export, search."""

from __future__ import annotations

import os

from tests import testing

import numpy as np
import tensorflow as tf

class ReadmeExampleTest(tf.test.TestCase):

  def test_notebook_example_runs_verbatim(self):
    code = testing.notebook_example()
    self.assertIn("tf_instdisc.InstanceDiscrimination.from_recipe(", code)
    self.assertIn("tf_instdisc.training_dataset(", code)
    self.assertLessEqual(len(code.strip().splitlines()), 14)  # "About ten lines".
    cwd = os.getcwd()
    os.chdir(self.create_tempdir().full_path)
    try:
      scope: dict = {}
      exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own code.
      self.assertTrue(os.path.exists(os.path.join("my_export", "manifest.json")))
    finally:
      os.chdir(cwd)
    embeddings = scope["embeddings"]
    self.assertEqual(embeddings.shape, (8, 128))
    self.assertAllClose(np.linalg.norm(embeddings, axis=1), np.ones(8), atol=1e-5)
    self.assertEqual(int(scope["model"].step.numpy()), 2 * (512 // 128))
    neighbours = scope["neighbours"]
    self.assertEqual(neighbours.ids.shape, (4, 5))
    # The export searches the collection of all 512 images exactly (index="none"): the best cosine scores.
    collection = scope["model"].predict(scope["images"], verbose=0)
    best = np.sort(embeddings[:4] @ collection.T, axis=1)[:, ::-1][:, :5]
    self.assertAllClose(neighbours.scores, best, atol=1e-4)


if __name__ == "__main__":
  tf.test.main()
