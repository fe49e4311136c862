"""The databases behind MLflow and Optuna, checked before any work: a URL that names a real,
reachable store, a SQLite file that is whole, and an MLflow store that records the place it is in.

MLflow records absolute paths: the experiment's artifact root and every run's and model's
artifact URI (file:///.../mlruns/artifacts/...). After `mv project moved` new runs would write into
a recreated old folder, and after `cp -a` into the original's; `relocate` rewrites the records.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path

from .errors import PipelineError
from .files import file_kind

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5  # a live database server answers in milliseconds; MLflow's own retries take 142 s
# MLflow's tracking URIs that are databases (mlflow.utils.uri's DATABASE_ENGINES); the rest
# (http(s), file, databricks) are left to MLflow and tracking.py.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# How each driver takes a connect timeout; libpq's and MySQL's name are the default.
TIMEOUT_ARG = {"pg8000": "timeout", "pyodbc": "timeout", "mysqlconnector": "connection_timeout"}
SQLITE_MAGIC = b"SQLite format 3\0"
QUICK_CHECK_MAX_BYTES = 2**28  # PRAGMA quick_check reads ~600 MB/s: under half a second up to here
MOVE_ASIDE = "move it aside and rerun to start a new store, or restore it from a backup"


def safe_url(url: str) -> str:
    """A database URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://...@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def check_tracking_uri(uri: str) -> None:
    """Fail in one line, before MLflow opens it, if a database tracking URI cannot hold runs: an
    empty or in-memory SQLite path, a SQLite file that is not whole, a server that does not answer;
    or a folder (`file:` or a bare path). http(s) and other URIs are left alone."""
    scheme = uri.partition(":")[0].split("+")[0].lower() if ":" in uri else ""
    if scheme in DATABASE_SCHEMES:
        check_database_url(uri, "MLflow tracking store", example="sqlite:///mlruns/mlflow.db")
    elif scheme == "file" or (not scheme and not uri.startswith("databricks")):
        raise PipelineError(f"MLflow tracking store {uri}: a folder, MLflow's file store, which "
                            "MLflow 3 no longer keeps runs in; set MLFLOW_TRACKING_URI to a database "
                            "such as sqlite:///mlruns/mlflow.db, or unset it for the project's own store")


def check_database_url(url: str, named: str, example: str = "sqlite:///sweeps/optuna.db",
                       connect_timeout_s: int = CONNECT_TIMEOUT_S, relative_to: Path | None = None) -> None:
    """The same checks for any SQLAlchemy URL (an Optuna storage, an MLflow store). `named` is how
    the user gave it ("--storage", "sweep.storage ="), `example` a URL to suggest. A relative
    SQLite path is taken from `relative_to` (study.storage_url's checkout), else from the current
    folder, as SQLAlchemy takes it."""
    import sqlalchemy

    shown = f"{named} {safe_url(url)}"
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError as err:
        raise PipelineError(f"{shown}: not a database URL ({err}); expected e.g. {example}") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_url(parsed, shown, example, relative_to or Path.cwd())
    else:
        _connect_once(parsed, shown, connect_timeout_s)


def _check_sqlite_url(url, shown: str, example: str, folder: Path) -> None:
    database = url.database or ""
    if database.startswith("file:"):  # a SQLite URI filename (?uri=true): file:path?mode=...
        database, _, options = database.removeprefix("file:").partition("?")
        if "mode=memory" in options:
            database = ":memory:"
    if not database:
        raise PipelineError(f"{shown}: names no database file (an unset variable in sqlite:///$DB?), "
                            f"so SQLite would keep it in a temporary file lost at exit; expected e.g. {example}")
    if database == ":memory:" or url.query.get("mode") == "memory":
        raise PipelineError(f"{shown}: an in-memory database, lost when the process ends with "
                            f"everything recorded in it; expected a file, e.g. {example}")
    check_sqlite_file(folder / database, shown, example)  # an absolute path stays itself


def check_sqlite_file(path: Path, shown: str, example: str = "sqlite:///sweeps/optuna.db") -> None:
    """A SQLite file that does not exist yet (its owner creates it) or is a whole database; a
    FIFO, a folder, another kind of file, one cut short or overwritten: one line with the fix.
    Read only, and never opened if it is not a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise PipelineError(f"{shown}: {path}: {err.strerror}; expected a SQLite file, e.g. {example}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PipelineError(f"{shown}: {path} is {file_kind(st.st_mode)}, not a SQLite database file; "
                            f"point it at a file, e.g. {example}")
    if st.st_size and (damage := sqlite_damage(path, st.st_size)):
        raise PipelineError(f"{shown}: {path} is not a whole SQLite database ({damage}); {MOVE_ASIDE}")


def sqlite_damage(path: Path, size: int) -> str | None:
    """What is wrong with a non-empty SQLite file (an empty one is a new database), or None."""
    with open(path, "rb") as file:
        header = file.read(100)
    if not header.startswith(SQLITE_MAGIC):
        return "no SQLite header: overwritten, or another kind of file"
    if len(header) < 100:
        return "cut short inside its header"
    page_bytes = int.from_bytes(header[16:18], "big")
    page_bytes = 65_536 if page_bytes == 1 else page_bytes
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count holds when its "valid-for" number equals the change counter (SQLite
    # 3.7+ writes both); with a -wal file beside it the file may lag behind its WAL.
    in_step = header[92:96] == header[24:28]
    if in_step and not Path(f"{path}-wal").exists() and pages * page_bytes > size:
        return f"cut short: {size:,} of the {pages * page_bytes:,} bytes its header records"
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # page 1 and the schema
            if size <= QUICK_CHECK_MAX_BYTES:
                result = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if result != "ok":
                    return "damaged: " + " ".join(result.split())
    except sqlite3.OperationalError:  # locked by a live writer, or not readable: not damage
        return None
    except sqlite3.DatabaseError as err:  # "file is not a database", "database disk image is malformed"
        return str(err)
    return None


def _connect_once(url, shown: str, timeout_s: int) -> None:
    """One connection with a short timeout: a server that is down, or a wrong host, port, user
    or database, is named in seconds, not after MLflow's retries or Optuna's first query."""
    import sqlalchemy

    driver = url.get_driver_name()
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                          connect_args={TIMEOUT_ARG.get(driver, "connect_timeout"): timeout_s})
    except ImportError as err:
        fix = ("install it with pip install -e '.[cluster]'" if url.get_backend_name() == "postgresql"
               else "install it, or name an installed one in the URL (e.g. mysql+pymysql://)")
        raise PipelineError(f"{shown}: its database driver is missing ({err}); {fix}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as err:
        reason = " ".join(str(err.orig or err).split())[:300]
        if "timeout" in reason.lower():
            reason += f" after {timeout_s} s"
        raise PipelineError(f"{shown}: cannot connect ({reason}); start the database server, or "
                            "fix the URL's host, port, user or database") from None
    finally:
        engine.dispose()


def _local_path(location: str | None) -> Path | None:
    """The folder an artifact location names, if it is on this file system."""
    if not location:
        return None
    if location.startswith("file:"):
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    return Path(location) if location.startswith("/") else None


def _same_place(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # symlinks and bind mounts: another name for the same folder
    except OSError:
        return a == b.resolve()


def stale_artifact_roots(db_path: Path, artifacts_dir: Path) -> list[str]:
    """The artifact roots the store records for its experiments, as recorded, that are another
    `artifacts` folder than `artifacts_dir`: where the store was made. [] for a new store."""
    try:
        if not Path(db_path).is_file() or Path(db_path).stat().st_size == 0:
            return []
        with closing(sqlite3.connect(f"{Path(db_path).resolve().as_uri()}?mode=ro", uri=True, timeout=10)) as conn:
            locations = [row[0] for row in conn.execute("SELECT artifact_location FROM experiments")]
    except sqlite3.Error:  # no experiments table yet (or a damaged file: check_sqlite_file says so)
        return []
    stale = []
    for location in locations:
        # The project's experiments: tracking.use_experiment puts their root beside the store.
        if (path := _local_path(location)) is not None and path.name == artifacts_dir.name \
                and not _same_place(path, artifacts_dir) and location not in stale:
            stale.append(location)
    return stale


def check_store_location(db_path: Path, artifacts_dir: Path) -> None:
    """One line if the SQLite store at `db_path` records its artifacts somewhere else than
    `artifacts_dir`, the folder beside it: it was made there, and the project moved or was copied."""
    if stale := stale_artifact_roots(db_path, artifacts_dir):
        made_in = _local_path(stale[0]).parent
        raise PipelineError(
            f"{db_path}: this MLflow store was made in {made_in} and records its artifacts there "
            f"({stale[0]}), not in {artifacts_dir} beside it (the project was moved or copied); run "
            "`python -m mnist_vae relocate` in the project to rewrite its records, then rerun")


def _text_columns(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(table, column) of every text column of the store: MLflow 3.17 keeps paths in
    experiments.artifact_location, runs.artifact_uri, logged_models.artifact_location and
    model_versions.storage_location (and source, for a version made from a path); all are
    rewritten, and whatever table a later MLflow adds."""
    found = []
    tables = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    for table in tables:
        for _, column, kind, *_ in conn.execute(f'PRAGMA table_info("{table}")'):
            if not kind or any(word in kind.upper() for word in ("CHAR", "TEXT", "CLOB")):
                found.append((table, column))
    return found


def relocate(mlruns_dir: Path) -> int:
    """Rewrite every path the store in `mlruns_dir` records under the folder it was made in, to
    `mlruns_dir` itself, in one transaction; the number of values rewritten (0: nothing to do)."""
    mlruns_dir = Path(mlruns_dir).resolve()
    db_path, artifacts_dir = mlruns_dir / "mlflow.db", mlruns_dir / "artifacts"
    shown = f"MLflow store {db_path}"
    if not db_path.is_file():
        raise PipelineError(f"{db_path}: no MLflow store here; run relocate in the project whose mlruns/ was moved")
    check_sqlite_file(db_path, shown)
    prefixes = []  # (old, new): each root as a file URI (as recorded) and as a plain path
    for location in stale_artifact_roots(db_path, artifacts_dir):
        old_uri = location.rstrip("/").removesuffix("/" + artifacts_dir.name)
        prefixes += [(old_uri, mlruns_dir.as_uri()), (str(_local_path(old_uri)), str(mlruns_dir))]
    total = 0
    with closing(sqlite3.connect(db_path, timeout=30, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")  # all or nothing, and no writer in between
        try:
            for table, column in _text_columns(conn):
                for old, new in prefixes:
                    # Whole path components only (substr, not LIKE: '_' is a wildcard there).
                    changed = conn.execute(
                        f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                        f'WHERE "{column}" = ? OR substr("{column}", 1, ?) = ?',
                        (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
                    if changed:
                        log.info("%s.%s: %d value(s) %s -> %s", table, column, changed, old, new)
                        total += changed
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return total
