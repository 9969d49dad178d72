"""Hyperparameter searches with Optuna, tracked in MLflow: the search-space language (space), the study's
storage (storage, the only module that touches Optuna's internals), one trial (objective), the worker and
its parent run (study), and what is logged and printed about a study, the champion included (report).

Only this package imports Optuna. `space` imports neither Optuna nor torch: the CLI reads it at start-up.
"""


from aetrack.config import UserError


class TuningError(UserError):
    """A search that cannot go on; str(err) is one line."""
