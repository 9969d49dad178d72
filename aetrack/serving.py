"""The MLflow pyfunc model that serves a trained aetrack model.

Logged as "models from code" (aetrack/pyfunc_model.py) with the package itself in
code_paths: loading it imports code and reads JSON and a weights-only state dict,
never unpickling arbitrary objects.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

from aetrack import modelio
from aetrack.samplers import LatentMixture, generate

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
MAX_SAMPLES = 1024

INPUT_SCHEMA = Schema([
    ColSpec("long", "n", required=False),
    ColSpec("long", "label", required=False),
])
OUTPUT_SCHEMA = Schema([
    ColSpec("long", "row"),
    ColSpec("long", "label", required=False),
    ColSpec("string", "image", required=False),
    ColSpec(Array("double"), "pixels", required=False),
])
PARAMS = ParamSchema([
    ParamSpec("seed", "long", 0),
    ParamSpec("temperature", "double", 1.0),
    ParamSpec("output", "string", "png"),
])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=PARAMS)
INPUT_EXAMPLE = pd.DataFrame({"n": [2]})


def encode_png(image: torch.Tensor) -> str:
    """(C, H, W) in [0, 1] -> base64 PNG ('L' for one channel, 'RGB' for three)."""
    from PIL import Image

    array = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class GeneratorModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.info, extra = modelio.load(context.artifacts["model"])
        self.sampler = LatentMixture.from_state(extra)

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        params = {**{p.name: p.default for p in PARAMS.params}, **(params or {})}
        generator = torch.Generator().manual_seed(int(params["seed"]))
        records = []
        for row, request in enumerate(model_input.to_dict("records")):
            n = int(request.get("n") or 1)
            label = request.get("label")
            labels = None if label is None or pd.isna(label) else torch.full((n,), int(label))
            images = generate(self.model, n, labels, generator, float(params["temperature"]), self.sampler)
            for i, image in enumerate(images):
                record = {"row": row, "label": None if labels is None else int(labels[i])}
                if params["output"] == "array":
                    record["pixels"] = image.flatten().tolist()
                else:
                    record["image"] = encode_png(image)
                records.append(record)
        return pd.DataFrame.from_records(records)


def log_model(model_dir: Path, registered_model_name: str | None = None):
    """Log a saved model directory as the run's pyfunc model (and register it when a name is given)."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_FILE),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(__file__).parent)],
        signature=SIGNATURE,
        input_example=INPUT_EXAMPLE,
        registered_model_name=registered_model_name,
        pip_requirements=_requirements(),
    )


def _requirements() -> list[str]:
    import importlib.metadata as md

    names = ["torch", "torchvision", "mlflow", "pandas", "numpy", "pillow", "scikit-learn"]
    return [f"{name}=={md.version(name)}" for name in names]
