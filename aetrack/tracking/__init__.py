"""MLflow around everything else, in three rooms. Here, the run's lifecycle: a training run (run), its recovery after a
stop (recovery, lifecycle), models as artifacts (artifacts, pictures), tag keys and metric names (tags,
metric_names), run descriptions (describe), the model registry (registry), the reference classifiers (reference),
logins (access, and login: the check the server itself runs) and the team's MLflow server as `aetrack server` starts
it (server, store). In reports/: the compare report, its figures and a study's verdicts. In workflows/: evaluating a
run, and the lesson's studies with the workers that share them. Only this package, serving, tuning and the CLI
import MLflow."""
