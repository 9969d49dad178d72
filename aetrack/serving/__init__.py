"""Serving with `mlflow models serve`: the pyfunc generator and its request checks (generator), the reference
classifier's pyfunc (reference), and the entry files MLflow runs to load them. Logging them is tracking's job."""
