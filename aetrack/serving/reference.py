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

PYFUNC_FILE = Path(__file__).with_name("reference_model.py")
ARTIFACT = "reference"
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(Array("double"), "pixels")]), outputs=Schema([ColSpec("long", "label")]))


class ReferencePyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        folder = Path(context.artifacts[ARTIFACT])
        self.net = load_folder(folder)
        self.shape = modelio.read_meta(folder)["shape"]

    def predict(self, context, model_input, params=None):
        import pandas as pd

        x = torch.tensor(np.stack(model_input["pixels"].to_list()), dtype=torch.float32).view(-1, *self.shape)
        return pd.DataFrame({"label": Classifier(self.net).predict(x).numpy()})
