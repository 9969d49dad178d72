"""The reference classifier as served: good rows get labels, bad rows a one-line 400, never a 500."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from aetrack import data as datasets
from aetrack.evaluation import reference
from aetrack.tracking import reference as registered_reference


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('reference')}/reference.db"
    mlflow.set_tracking_uri(uri)
    digits = datasets.load("digits")
    classifier = reference.train_classifier(digits.train_x, digits.train_y, digits.shape, 10, "digits", epochs=3)
    classifier.test_accuracy = classifier.accuracy(digits.test_x, digits.test_y)
    version = registered_reference.register(classifier, digits, mlflow.MlflowClient())
    model = mlflow.pyfunc.load_model(f"models:/{registered_reference.registered_name('digits')}/{version}")
    return model, digits


@pytest.mark.slow
def test_good_rows_get_the_classifiers_labels(served):
    model, digits = served
    rows = pd.DataFrame({"pixels": [x.flatten().tolist() for x in digits.test_x[:20].float()]})
    labels = model.predict(rows)["label"].to_numpy()
    assert (labels == digits.test_y[:20].numpy()).mean() > 0.6


@pytest.mark.slow
@pytest.mark.parametrize("pixels, message", [
    ([[0.0] * 64, [0.0] * 10], "expected 64 values"),
    ([[[0.0], [0.0, 0.0]]], None),  # MLflow's schema check refuses it first (400; the guard makes it one line)
    ([[float("nan")] * 64], "NaN or infinity"),
    ([[2.0] * 64], "in [0, 1]"),
    ([["a"] * 64], None),
])
def test_bad_rows_are_one_line_400s(served, pixels, message):
    model, _ = served
    with pytest.raises(MlflowException) as caught:
        model.predict(pd.DataFrame({"pixels": pixels}))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    if message:
        assert message in caught.value.message and "\n" not in caught.value.message
