"""Changing the champion by hand (``fraudd models promote|rollback``).

Its own module, apart from ``retrain.py``: an operator rolling back during an incident waits for
no training library (lightgbm and scikit-learn take seconds to import); only the deployment table
and the model file's check are needed.
"""

from __future__ import annotations

from pathlib import Path

import psycopg

from fraudd.schema import connect
from fraudd.scoring import deployment
from fraudd.scoring.deployment import DeploymentError
from fraudd.scoring.features import FEATURE_NAMES
from fraudd.scoring.model import FraudModel, ModelError


def load_deployable(path: Path) -> FraudModel:
    """The model at ``path``, or a ``DeploymentError`` saying why it cannot be deployed."""
    try:
        return FraudModel.load(path, FEATURE_NAMES)
    except ModelError as exc:
        raise DeploymentError(str(exc)) from None


def change_champion(postgres_url: str, pg_schema: str, version: str, action: str, actor: str, reason: str) -> int:
    """``fraudd models promote|rollback VERSION``: make a registered model the champion, audited;
    a rollback only to a model that decided before. Returns the deployment's new generation."""
    try:
        with connect(postgres_url, pg_schema, connect_timeout=5, autocommit=True) as conn:
            model = deployment.registered(conn, version)
            if model is None:
                raise DeploymentError(f"model {version} is not registered (`fraudd retrain` registers the models it trains)")
            if action == "rollback" and not deployment.was_champion(conn, version):
                raise DeploymentError(f"model {version} never decided here: promote it instead of rolling back to it")
            load_deployable(model.path)
            deployed = deployment.current(conn)
            shadow = None if deployed is None or deployed.shadow is None else deployed.shadow.version
            return deployment.deploy(conn, version, None if shadow == version else shadow, action, actor, reason)
    except psycopg.Error as exc:
        raise DeploymentError(f"--postgres-url / POSTGRES_URL: {' '.join(str(exc).split())}") from None
