"""Entry file of the logged reference classifier ("models from code"): MLflow runs this file to load it."""

import mlflow

from aetrack.serving.reference import ReferencePyfunc

mlflow.models.set_model(ReferencePyfunc())
