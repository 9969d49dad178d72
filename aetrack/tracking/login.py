"""The login check `mlflow server --app-name basic-auth` runs, for `aetrack server --auth` and for the compose `mlflow`
image alike. That image has MLflow and nothing of aetrack but this module and its two package files
(docker/mlflow.Dockerfile copies them), so it imports Flask and MLflow only."""

from __future__ import annotations


def authenticate_request():
    """MLflow's basic-auth check, except that an Authorization header that is not Basic with a user name and a
    password (`Bearer x`, `Digest ...`) gets MLflow's 401 too: with the login cache on, MLflow's own function hashes
    the missing password and answers 500 with a traceback in the log. Runs inside `mlflow server`."""
    from flask import request
    from mlflow.server import auth

    credentials = request.authorization
    if credentials is not None and (credentials.type != "basic" or credentials.username is None
                                    or credentials.password is None):
        return auth.make_basic_auth_response()
    return auth.authenticate_request_basic_auth()
