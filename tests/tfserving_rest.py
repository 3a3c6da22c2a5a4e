"""Test helper (not a test): TF Serving's REST predict API in row format, as its documentation specifies it.

No TF Serving binary installs here (docs/design.md), so the tests check that the JSON a client sends maps onto our
signatures the way the model server maps it (https://www.tensorflow.org/tfx/serving/api_rest, "Request format",
"Encoding binary values"):
  - {"signature_name": s, "instances": [...]}; with one input, an instance is the value itself or {name: value};
    with several, {name: value} objects; the batch is the list of instances stacked;
  - a binary (DT_STRING) value is written {"b64": "<base64>"};
  - the answer is {"predictions": [...]}, one entry per instance: the value itself when the signature has one
    output, else an object {output name: value}.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
import tensorflow as tf


def request_body(signature_name: str, instances: list[Any]) -> str:
  """A client's request JSON; bytes values become {"b64": ...}."""
  def encode(value):
    if isinstance(value, bytes):
      return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
      return {k: encode(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value

  return json.dumps({"signature_name": signature_name, "instances": [encode(i) for i in instances]})


def _decode_value(value: Any) -> Any:
  if isinstance(value, dict) and set(value) == {"b64"}:
    return base64.b64decode(value["b64"])
  return value


def predict(loaded, body: str) -> str:
  """What the model server would answer to `body` for the SavedModel `loaded` (tf.saved_model.load)."""
  request = json.loads(body)
  signature = loaded.signatures[request.get("signature_name", "serving_default")]
  input_specs = signature.structured_input_signature[1]  # {name: TensorSpec}
  columns: dict[str, list] = {name: [] for name in input_specs}
  for instance in request["instances"]:
    if not isinstance(instance, dict) or set(instance) - set(input_specs):
      if len(input_specs) != 1:
        raise ValueError("instances of a multi-input signature must be objects keyed by input name")
      instance = {next(iter(input_specs)): instance}
    for name in input_specs:
      columns[name].append(_decode_value(instance[name]))
  feeds = {}
  for name, spec in input_specs.items():
    dtype = object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype
    feeds[name] = tf.constant(np.array(columns[name], dtype=dtype), dtype=spec.dtype)
  outputs = {name: tensor.numpy() for name, tensor in signature(**feeds).items()}
  rows = []
  for i in range(len(request["instances"])):
    row = {name: value[i].tolist() for name, value in outputs.items()}
    rows.append(next(iter(row.values())) if len(row) == 1 else row)
  return json.dumps({"predictions": rows})
