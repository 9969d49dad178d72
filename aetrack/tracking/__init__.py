"""MLflow around everything else: a training run (run), tag keys (tags), models as artifacts (artifacts), the
reference classifiers (reference), evaluation logged to a run (evaluate), compare reports (compare), the model
registry (registry), the lesson's studies (studies), their verdicts computed from a study's record (verdicts) and
the team's MLflow server as `aetrack server` starts it (server). Only this package, serving, tuning and the CLI
import MLflow."""
