"""Serving with `mlflow models serve`: the pyfunc generator and its request checks (generator), the guard in front of
MLflow's scoring app that the generator installs when the server loads it (guard), the reference classifier's pyfunc
(reference), and the entry files MLflow runs to load them; logging them is tracking's job. Also the child-process
handling that `aetrack serve` and `aetrack server` share (process)."""
