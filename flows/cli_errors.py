"""How a ``pogdiff`` command fails: expected failures (bad input, a store that is missing,
unreachable, misconfigured or lacks its driver, a name or version that does not exist) are one line
on stderr, credentials masked, exit 2; anything else is a bug, said in one line with exit 1 and its
traceback behind ``--debug`` (or ``POGDIFF_DEBUG=1``).

Third-party INFO logs (MLflow's, alembic's, HTTP clients') stay off the terminal unless
``--verbose``; Prefect's flow and task logs are the pipeline's own progress and stay on, without
tracebacks unless ``--debug``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback

from storage.links import redact_text, redact_uri

EXIT_EXPECTED = 2  # the user can fix it: the message says what and where
EXIT_BUG = 1

# database and object-store drivers a store URI may need, and the package that provides each
DRIVERS = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pymysql": "PyMySQL", "MySQLdb": "mysqlclient",
           "pyodbc": "pyodbc", "boto3": "boto3", "botocore": "boto3", "google": "google-cloud-storage",
           "azure": "azure-storage-blob", "s3fs": "s3fs", "gcsfs": "gcsfs", "adlfs": "adlfs"}
QUIET_LOGGERS = ("mlflow", "alembic", "httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer", "lancedb",
                 "sqlalchemy", "distributed", "asyncio", "prefect.server", "uvicorn", "docket")


def debug_requested(flag: bool) -> bool:
    return flag or os.environ.get("POGDIFF_DEBUG", "").strip().lower() in ("1", "true", "yes")


def _text(err: BaseException) -> str:
    text = getattr(err, "message", None) or str(err) or type(err).__name__
    return redact_text(" ".join(str(text).split()))


def _mlflow_denied(text: str) -> str:
    """What a 403 of MLflow's basic-auth app refused, and the permission that request needs (MLflow's
    levels: READ reads, EDIT changes, MANAGE also deletes and grants), from the endpoint it names."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"account {user!r}" if user else "this account"
    endpoint = re.search(r"endpoint \S*?/mlflow/(\S+?)(?:\?\S*)? failed", text)
    if endpoint is None:
        return f"denied {who} permission ({text[:200]}); an MLflow admin grants it"
    action = endpoint.group(1)
    verb = action.rsplit("/", 1)[-1]
    needs = "MANAGE" if "delete" in verb else "READ" if verb.startswith(("get", "search", "list")) else "EDIT"
    on = ("the registered model" if action.startswith(("registered-models", "model-versions"))
          else "the experiment" if action.startswith(("experiments", "runs", "logged-models")) else "the resource")
    return f"denied {who} the permission for {action}: it needs {needs} on {on}; an MLflow admin grants it"


def _mlflow_message(err: BaseException, tracking_uri: str | None) -> str:
    text = _text(err)
    # the server as storage/mlflow/connection.py names it: its credentials removed, not masked
    store = redact_uri(tracking_uri, mask=False) if tracking_uri else "the MLflow tracking store"
    if "API request to" in text and ("Max retries exceeded" in text or "Connection refused" in text or "timed out" in text):
        return f"MLflow tracking server {store} is unreachable (set POGDIFF_MLFLOW_TRACKING_URI, or start the server)"
    if re.search(r"\b401\b", text) or "Unauthorized" in text or "UNAUTHENTICATED" in text:
        return f"MLflow tracking server {store} refused the credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
    if "PERMISSION_DENIED" in text or re.search(r"\b403\b", text):
        return f"MLflow tracking server {store} {_mlflow_denied(text)}"
    return f"MLflow ({store}): {text[:300]}"


def explain(err: BaseException, tracking_uri: str | None = None) -> str | None:
    """The one line for an expected failure (without ``error: ``), or ``None`` for a bug."""
    from pogdiff.config import ConfigError
    from storage.errors import RunNotFound
    from storage.items import SourceError

    # a KeyError or IndexError is a lookup inside the code, not a name the user gave: a bug
    if isinstance(err, (SourceError, ConfigError, RunNotFound)) or (isinstance(err, LookupError) and not isinstance(err, (KeyError, IndexError))):
        return _text(err)
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.split(".")[0] in DRIVERS:
        module = err.name.split(".")[0]
        store = f" for {redact_uri(tracking_uri)}" if tracking_uri and module in ("psycopg2", "psycopg", "pymysql", "MySQLdb", "pyodbc") else ""
        return f"the store driver {module!r} is not installed{store}: pip install {DRIVERS[module]}"
    module = type(err).__module__
    if module.startswith("mlflow"):
        return _mlflow_message(err, tracking_uri)
    if module.startswith("sqlalchemy"):
        store = redact_uri(tracking_uri) if tracking_uri else "the database"
        if type(err).__name__ == "NoSuchModuleError":
            return f"{store} is not a database URI SQLAlchemy knows (check POGDIFF_MLFLOW_TRACKING_URI)"
        original = getattr(err, "orig", None)
        return f"cannot open the database {store}: {_text(original) if original else _text(err)[:200]}"
    response = getattr(err, "response", None)
    if module.startswith("prefect") and isinstance(getattr(response, "status_code", None), int):
        # PrefectHTTPStatusError: the Prefect API answered, but not with what was asked
        url = err.request.url  # the API's address from host and port: never its userinfo
        port = f":{url.port}" if url.port else ""
        base = url.path.split("/api/", 1)[0] + "/api" if "/api/" in url.path else ""
        api = f"{url.scheme}://{url.host}{port}{base}"
        if response.status_code in (401, 403):
            return f"Prefect server {api} refused the credentials (PREFECT_API_AUTH_STRING, or PREFECT_API_KEY for Prefect Cloud)"
        return f"Prefect server {api} answered {response.status_code} {response.reason_phrase} to {err.request.method} {url.path}"
    if module.startswith(("botocore", "boto3")):  # the object store (S3, MinIO) refused or did not answer
        from storage.location import s3_endpoint

        endpoint = s3_endpoint() or "AWS S3"
        return f"object store {redact_uri(endpoint, mask=False)}: {_text(err)[:300]}"
    if module.startswith("httpx") and os.environ.get("PREFECT_API_URL"):  # Prefect's client is the one speaking httpx
        return f"Prefect server {redact_uri(os.environ['PREFECT_API_URL'], mask=False)} is unreachable: {_text(err)[:200]}"
    if module.startswith(("requests", "urllib3", "httpx")):
        return f"cannot reach a store: {_text(err)[:300]}"
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)):
        return f"{err.strerror}: {err.filename}" if err.filename is not None and err.strerror else _text(err)
    if isinstance(err, ConnectionError):
        return _text(err)
    return None


def report(err: BaseException, debug: bool, tracking_uri: str | None = None) -> int:
    """Print ``err`` as its one line (and, with ``debug``, the traceback first); the exit status."""
    if debug:
        traceback.print_exception(err)
    line = explain(err, tracking_uri)
    if line is not None:
        print(f"error: {line}", file=sys.stderr)
        return EXIT_EXPECTED
    hint = "" if debug else "; rerun with --debug (or POGDIFF_DEBUG=1) for the traceback"
    print(f"error: unexpected {type(err).__name__}: {_text(err)[:300]} (a bug in pogdiff{hint})", file=sys.stderr)
    return EXIT_BUG


def quiet_stores(verbose: bool) -> None:
    """Keep third-party INFO logs off the terminal (``verbose``: leave them). MLflow configures its
    own loggers from MLFLOW_LOGGING_LEVEL when it is imported, so that is set too."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _NoTraceback(logging.Filter):
    """Drop a record's traceback: the command prints the failure itself, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        if isinstance(record.msg, str) and "Traceback (most recent call last)" in record.msg:
            record.msg = re.split(r"\n?Traceback \(most recent call last\)", record.msg, maxsplit=1)[0]
        return True


def quiet_prefect() -> None:
    """Prefect's console handlers log a failing task or flow with its traceback; unless debugging
    (``debug_requested``) they keep the one-line messages. Call after Prefect is imported (it sets
    its handlers up then)."""
    if debug_requested(False):
        return
    for logger in (logging.getLogger(n) for n in ("prefect", "prefect.flow_runs", "prefect.task_runs", "")):
        for handler in logger.handlers:
            if not any(isinstance(f, _NoTraceback) for f in handler.filters):
                handler.addFilter(_NoTraceback())
