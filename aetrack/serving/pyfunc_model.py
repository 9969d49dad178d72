"""Entry file of the logged pyfunc model ("models from code"): MLflow runs this file to
load the model, so nothing is unpickled."""

import mlflow

from aetrack.serving.generator import GeneratorModel

mlflow.models.set_model(GeneratorModel())
