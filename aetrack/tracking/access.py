"""Who may do what on a tracking server with logins (`aetrack server --auth`): asked of the server before any work,
so that a refusal is one line that names the user, the resource and the permission missing, instead of MLflow's
403 after a whole training.

The server answers with the same rule it enforces: MLflow's `GET /api/3.0/mlflow/users/permissions/get`, which a
user may ask about themselves. A server without logins has no such endpoint, and nothing is checked."""

from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException

from aetrack.config import UserError

PERMISSION_OF_USER = "/api/3.0/mlflow/users/permissions/get"
# MLflow's permissions that allow a change (`Permission.can_update`): creating runs in an experiment, versions and
# aliases of a registered model.
CAN_UPDATE = ("EDIT", "MANAGE")
GUIDE = "docs/reliability.md, 'A team on one server'"


class Refused(UserError):
    """The server would refuse this work to this user; one line naming user, resource and permission."""


def login() -> str | None:
    """The user MLflow logs in as at an http(s) tracking server (basic auth: MLFLOW_TRACKING_USERNAME or
    ~/.mlflow/credentials), or None."""
    from mlflow.utils.credentials import get_default_host_creds

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    return get_default_host_creds(uri).username or None


def permission(user: str, resource_type: str, resource_id: str) -> str | None:
    """The user's effective permission on one resource (READ, USE, EDIT, MANAGE, NO_PERMISSIONS, DENY), or None where
    the server has no logins."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    credentials = get_default_host_creds(mlflow.get_tracking_uri())
    answer = http_request(credentials, PERMISSION_OF_USER, "GET",
                          params={"username": user, "resource_type": resource_type, "resource_id": resource_id})
    if answer.status_code == 404:
        return None  # no auth app: everyone may do everything
    if answer.status_code == 401:
        raise Refused(f"user {user!r}: the tracking server {mlflow.get_tracking_uri()} refused the login (check "
                      "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)")
    if answer.status_code != 200:
        return None  # an older server without this endpoint: MLflow's own refusal will have to do
    return answer.json().get("permission")


def require(user: str, resource_type: str, resource_id: str, shown: str, action: str, instead: str) -> None:
    """Refused unless `user` holds EDIT or MANAGE on the resource."""
    held = permission(user, resource_type, resource_id)
    if held is not None and held not in CAN_UPDATE:
        raise Refused(f"user {user!r} may not {action} {shown}: that needs EDIT, and {user} has {held}; ask its owner "
                      f"or the admin to grant EDIT ({GUIDE}), or {instead}")


def check_training(experiment: str | None, registered_model: str | None) -> None:
    """Before training: may the logged-in user create runs in `experiment` (None: a resumed run's, not checked) and
    versions of `registered_model` (None: nothing is registered)? What does not exist yet is the user's to create."""
    user = login()
    if user is None:
        return
    client = mlflow.MlflowClient()
    try:
        found = None if experiment is None else client.get_experiment_by_name(experiment)
    except MlflowException as err:
        raise refusal(user, f"experiment {experiment!r}", "read", err) from None
    if found is not None:
        require(user, "experiment", found.experiment_id, f"experiment {experiment!r}", "create runs in",
                f"train in an experiment of your own: --experiment {user}-{experiment}")
    if registered_model is not None and exists(client, registered_model):
        require(user, "registered_model", registered_model, f"registered model {registered_model!r}",
                "register versions of", f"register under a name of your own: --registered-model {user}-{registered_model}")


def check_model(name: str, action: str = "set aliases of") -> None:
    """Before changing registered model `name` (promote): may the logged-in user?"""
    user = login()
    if user is not None:
        require(user, "registered_model", name, f"registered model {name!r}", action,
                "promote a model of your own")


def exists(client, name: str) -> bool:
    try:
        client.get_registered_model(name)
        return True
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise refusal(login() or "?", f"registered model {name!r}", "read", err) from None


def refusal(user: str, shown: str, action: str, err: MlflowException) -> Exception:
    if err.get_http_status_code() == 403 or "403" in str(err):
        return Refused(f"user {user!r} may not {action} {shown}: that needs READ; ask the admin to grant it ({GUIDE})")
    return err
