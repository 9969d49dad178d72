"""The reference classifier as a pyfunc model: each row's `pixels` (C*H*W values in [0, 1]) -> its `label`.
Logged as "models from code" with aetrack/serving/reference_model.py as its entry file: nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, Schema

from aetrack import modelio
from aetrack.evaluation.reference import Classifier, load_folder
from aetrack.serving import guard
from aetrack.serving.generator import MAX_IMAGES, ServingError, numbers, request_rows

PYFUNC_FILE = Path(__file__).with_name("reference_model.py")
ARTIFACT = "reference"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(Array("double"), "pixels")]), outputs=Schema([ColSpec("long", "label")]))


class ReferencePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        guard.install(max_rows=MAX_IMAGES)  # inside `mlflow models serve` only: the generator's limits and one-line errors
        folder = Path(context.artifacts[ARTIFACT])
        self.net = load_folder(folder)
        self.shape = modelio.read_meta(folder)["shape"]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        size = int(np.prod(self.shape))
        rows = []
        for i, row in enumerate(request_rows(model_input)):
            pixels = numbers(row.get("pixels"), f"row {i}: pixels")
            if pixels.size != size:
                raise ServingError(f"row {i}: pixels: expected {size} values ({'x'.join(map(str, self.shape))}), got {pixels.size}")
            if pixels.min() < 0 or pixels.max() > 1:
                raise ServingError(f"row {i}: pixels: values must lie in [0, 1]")
            rows.append(pixels.reshape(self.shape))
        x = torch.from_numpy(np.stack(rows))
        return pd.DataFrame({"label": Classifier(self.net).predict(x).numpy()})
