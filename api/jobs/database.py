"""The job store: one row per job, in SQLite (default) or PostgreSQL (by URL), via SQLAlchemy 2.

Invariant: every change of a job's status is one conditional UPDATE (`WHERE status = ...`), so
two workers, a worker and the reaper, or a worker and a cancel never both win. A worker owns a
running job only while `worker_id` is its id; every write it makes checks that.

Every time the store writes or compares (created, started, lease expiry, finished, worker
heartbeats) is the database server's clock (`store_now`), never the calling machine's: a worker
whose clock runs behind cannot hand out leases that are already expired, and a reaper whose
clock runs ahead cannot take live jobs away.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from api.jobs.migrate import upgrade_to_head
from api.jobs.tables import jobs, workers
from compressor.vocabulary import (
    CANCELLED,
    FAILED,
    FINISHED_STATUSES,
    JOB_STATUSES,
    QUEUED,
    REPORTING,
    RUNNING,
    SUCCEEDED,
    ErrorCode,
)

LOSS_POINTS = 100  # at most this many [step, loss] points are kept per job


def store_now(dialect: str) -> sa.ColumnElement[float]:
    """Return a SQL expression for the database server's time now, in Unix seconds."""
    if dialect == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float)
    if dialect == "postgresql":
        return sa.literal_column(
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)", sa.Float
        )
    raise ValueError(f"unsupported job store database {dialect!r}: use SQLite or PostgreSQL")


@dataclass(frozen=True)
class JobRecord:
    """One job as the store holds it."""

    seq: int
    id: str
    owner: str
    status: str
    stage: str | None
    progress: float
    config: dict[str, Any]
    data_format: str | None
    error: dict[str, str] | None
    report: dict[str, Any] | None
    artifacts: list[dict[str, Any]]
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    attempts: int
    worker_id: str | None
    lease_expires_at: float | None
    cancel_requested: bool
    retry_reason: str | None
    loss_curve: list[list[float]]
    stage_times: dict[str, float]  # when each stage of this run was first reported (store clock)
    model_name: str | None  # the uploaded model file's name, as the client sent it
    resumed: str | None = None  # where this run resumed, what it reused (None: from the start)

    @property
    def is_finished(self) -> bool:
        """Return True once the job reached succeeded, failed or cancelled."""
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class ReapedJob:
    """A running job whose lease expired, and what the reaper made of it."""

    id: str
    status: str  # queued (retried), failed (out of attempts) or cancelled (cancel requested)
    reason: str


@dataclass(frozen=True)
class WorkerRecord:
    """A job worker process, as its heartbeats left it."""

    id: str
    host: str
    pid: int
    started_at: float
    last_seen_at: float


# Built once: `get` is the hottest query (every poll of a job).
_SELECT_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"))
_SELECT_OWNED = _SELECT_BY_ID.where(jobs.c.owner == sa.bindparam("owner"))


def _record(row: sa.Row) -> JobRecord:
    values = dict(row._mapping)
    values["artifacts"] = values["artifacts"] or []
    values["cancel_requested"] = bool(values["cancel_requested"])
    values["loss_curve"] = values["loss_curve"] or []
    values["stage_times"] = values["stage_times"] or {}
    return JobRecord(**values)


def create_store_engine(url: str) -> tuple[sa.Engine, sa.Engine]:
    """Return (reader, writer) engines sharing one pool; the writer starts write transactions.

    SQLite runs in WAL mode with a busy timeout, in driver autocommit, and the writer begins
    with BEGIN IMMEDIATE, so a transaction never fails midway upgrading a read lock.
    """
    if not url.startswith("sqlite"):
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        return engine, engine
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        # Reads run in driver autocommit: one SELECT is atomic, and skipping BEGIN saves a trip.
        begin = connection.get_execution_options().get("sqlite_begin")
        if begin:
            connection.exec_driver_sql(begin)

    return engine, engine.execution_options(sqlite_begin="BEGIN IMMEDIATE")


class JobDatabase:
    """The job store: the rows of jobs (and of live workers) in SQLite or PostgreSQL.

    Create, read, claim, update and finish jobs; shared by the API and every worker.
    """

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self._reader, self._writer = create_store_engine(url)
        self._now = store_now(self._writer.dialect.name)
        if migrate:
            upgrade_to_head(self._writer)

    def close(self) -> None:
        """Close every pooled connection."""
        self._reader.dispose()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self._reader.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def now(self) -> float:
        """Return the database server's time (Unix seconds): the clock every lease is read on."""
        with self._reader.connect() as conn:
            return float(conn.execute(sa.select(self._now)).scalar_one())

    # -- the API's side ----------------------------------------------------------------------

    def create(
        self, job_id: str, owner: str, config: dict[str, Any], data_format: str | None,
        model_name: str | None = None,
    ) -> JobRecord:
        """Insert a new `queued` job and return it."""
        now = self._now
        values = {
            "id": job_id, "owner": owner, "status": QUEUED, "stage": None, "progress": 0.0,
            "config": config, "data_format": data_format, "created_at": now, "updated_at": now,
            "attempts": 0, "cancel_requested": False,
            "model_name": model_name[:255] if model_name else None,
        }
        with self._writer.begin() as conn:
            conn.execute(jobs.insert().values(**values))
        job = self.get(job_id)
        assert job is not None
        return job

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """Return the job, or None if it does not exist or `owner` is given and differs."""
        with self._reader.connect() as conn:
            if owner is None:
                row = conn.execute(_SELECT_BY_ID, {"id": job_id}).first()
            else:
                row = conn.execute(_SELECT_OWNED, {"id": job_id, "owner": owner}).first()
        return _record(row) if row is not None else None

    def list_jobs(
        self, owner: str, *, status: str | None = None, limit: int = 50, before_seq: int | None = None
    ) -> list[JobRecord]:
        """Return up to `limit` of `owner`'s jobs, newest first, submitted before `before_seq`."""
        query = sa.select(jobs).where(jobs.c.owner == owner)
        if status is not None:
            query = query.where(jobs.c.status == status)
        if before_seq is not None:
            query = query.where(jobs.c.seq < before_seq)
        query = query.order_by(jobs.c.seq.desc()).limit(limit)
        with self._reader.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def count_in_flight(self, owner: str) -> int:
        """Return how many of `owner`'s jobs are queued or running."""
        query = sa.select(sa.func.count()).where(
            jobs.c.owner == owner, jobs.c.status.in_((QUEUED, RUNNING))
        )
        with self._reader.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def count_by_status(self) -> dict[str, int]:
        """Return the number of jobs in each status (every status present, zeros included)."""
        query = sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
        counts = dict.fromkeys(JOB_STATUSES, 0)
        with self._reader.connect() as conn:
            counts.update({status: int(n) for status, n in conn.execute(query)})
        return counts

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Cancel a queued job now, flag a running one; return the job as it is afterwards.

        A finished job is returned unchanged (the caller answers 409); None if it is gone.
        """
        now = self._now
        with self._writer.begin() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                .values(
                    status=CANCELLED, finished_at=now, updated_at=now, cancel_requested=True,
                    error={
                        "code": ErrorCode.CANCELLED,
                        "message": "cancelled by its owner before it ran",
                    },
                )
            )
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == RUNNING)
                .values(cancel_requested=True, updated_at=now)
            )
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Delete the job's row; return False if there was none."""
        with self._writer.begin() as conn:
            return conn.execute(jobs.delete().where(jobs.c.id == job_id)).rowcount == 1

    # -- a worker's side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str, lease_s: float) -> JobRecord | None:
        """Move a queued job to running for `worker_id`; None if it is not queued any more."""
        now = self._now
        with self._writer.begin() as conn:
            claimed = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                .values(
                    status=RUNNING, worker_id=worker_id, started_at=now, updated_at=now,
                    lease_expires_at=now + lease_s, attempts=jobs.c.attempts + 1,
                    stage=None, progress=0.0, loss_curve=None, stage_times=None,
                    resumed=None,
                )
            ).rowcount
        return self.get(job_id) if claimed == 1 else None

    @staticmethod
    def _owned(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(
            jobs.c.id == job_id, jobs.c.status == RUNNING, jobs.c.worker_id == worker_id
        )

    def _update_own(self, job_id: str, worker_id: str, **values: Any) -> bool:
        values.setdefault("updated_at", self._now)
        with self._writer.begin() as conn:
            return (
                conn.execute(jobs.update().where(self._owned(job_id, worker_id)).values(**values))
                .rowcount
                == 1
            )

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the running job's lease; False if `worker_id` no longer owns it."""
        return self._update_own(job_id, worker_id, lease_expires_at=self._now + lease_s)

    def update_progress(
        self,
        job_id: str,
        worker_id: str,
        stage: str,
        progress: float,
        loss_curve: list[list[float]] | None = None,
        resumed: str | None = None,
    ) -> bool:
        """Record the running job's stage, overall progress and (if given) its recent loss points
        and where it resumed (`resumed`, replacing what was stored).

        `loss_curve` replaces the stored points: [[step, loss], ...], at most LOSS_POINTS.
        The first report of a stage records its start in `stage_times`, on the store's clock.
        False if the job is not ours.
        """
        values: dict[str, Any] = {"stage": stage, "progress": progress}
        if loss_curve is not None:
            if len(loss_curve) > LOSS_POINTS:
                raise ValueError(f"at most {LOSS_POINTS} loss points, got {len(loss_curve)}")
            values["loss_curve"] = loss_curve
        if resumed is not None:
            values["resumed"] = resumed
        owned = self._owned(job_id, worker_id)
        with self._writer.begin() as conn:
            row = conn.execute(sa.select(jobs.c.stage_times, self._now).where(owned)).first()
            if row is None:
                return False
            times, now = row[0] or {}, float(row[1])
            if stage not in times:
                values["stage_times"] = {**times, stage: now}
            conn.execute(jobs.update().where(owned).values(updated_at=now, **values))
        return True

    def is_cancel_requested(self, job_id: str) -> bool:
        """Return True if the job's owner asked to cancel it, or the job was deleted."""
        with self._reader.connect() as conn:
            flag = conn.execute(
                sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)
            ).scalar_one_or_none()
        return flag is None or bool(flag)

    def finish(
        self,
        job_id: str,
        worker_id: str,
        status: str,
        *,
        error: dict[str, str] | None = None,
        report: dict[str, Any] | None = None,
        artifacts: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Move our running job to a finished status; False if it is not ours any more."""
        assert status in FINISHED_STATUSES, status
        now = self._now
        values: dict[str, Any] = {
            "status": status, "error": error, "report": report, "artifacts": artifacts or [],
            "finished_at": now, "lease_expires_at": None,
        }
        if status == SUCCEEDED:  # every stage ran; progress events may have been throttled
            values["progress"], values["stage"] = 1.0, REPORTING
        return self._update_own(job_id, worker_id, **values)

    def release(
        self, job_id: str, worker_id: str, reason: str, requeue: Callable[[str], None]
    ) -> bool:
        """Give our running job back to the queue (this worker is shutting down).

        The attempt is not counted: the job did not fail, its worker was asked to stop.
        `requeue(job_id)` runs before the change commits, as in `reap_expired`.
        """
        now = self._now
        with self._writer.begin() as conn:
            released = conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.status == RUNNING, jobs.c.worker_id == worker_id)
                .values(
                    status=QUEUED, worker_id=None, lease_expires_at=None, stage=None,
                    progress=0.0, attempts=jobs.c.attempts - 1, retry_reason=reason,
                    updated_at=now,
                )
            ).rowcount
            if released == 1:
                requeue(job_id)
        return released == 1

    def reap_expired(self, max_attempts: int, requeue: Callable[[str], None]) -> list[ReapedJob]:
        """Settle running jobs whose lease expired (their worker died or hung).

        Each is re-queued while it has attempts left (`requeue(job_id)` is called before the
        change commits, so a failing queue leaves the job to the next round), failed with code
        `worker_lost` after `max_attempts`, or cancelled if its owner asked for that. Expiry is
        judged on the store's clock.
        """
        now = self._now
        expired = sa.and_(jobs.c.status == RUNNING, jobs.c.lease_expires_at < now)
        with self._reader.connect() as conn:
            candidates = conn.execute(
                sa.select(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested).where(expired)
            ).all()
        reaped = []
        for job_id, attempts, cancel_requested in candidates:
            outcome = self._settle_expired(
                job_id, attempts, bool(cancel_requested), max_attempts, requeue, expired, now
            )
            if outcome is not None:
                reaped.append(outcome)
        return reaped

    def _settle_expired(
        self,
        job_id: str,
        attempts: int,
        cancel_requested: bool,
        max_attempts: int,
        requeue: Callable[[str], None],
        expired: sa.ColumnElement[bool],
        now: sa.ColumnElement[float],
    ) -> ReapedJob | None:
        lost = (
            f"the worker running attempt {attempts} of {max_attempts} stopped renewing its lease "
            "(it crashed, was killed, or lost the store)"
        )
        if cancel_requested:
            status, reason = CANCELLED, f"{lost}; the job was being cancelled, so it stays cancelled"
            values = {"error": {"code": ErrorCode.CANCELLED, "message": reason}, "finished_at": now}
        elif attempts < max_attempts:
            status, reason = QUEUED, f"{lost}; re-queued for attempt {attempts + 1}"
            values = {"retry_reason": reason, "stage": None, "progress": 0.0}
        else:
            status = FAILED
            reason = (
                f"{lost}; no attempts left. Check the workers' logs (a crash or out-of-memory "
                "kill is likely), then submit the job again"
            )
            values = {"error": {"code": ErrorCode.WORKER_LOST, "message": reason}, "finished_at": now}
        values.update(status=status, worker_id=None, lease_expires_at=None, updated_at=now)
        with self._writer.begin() as conn:
            changed = conn.execute(
                jobs.update().where(jobs.c.id == job_id, expired).values(**values)
            ).rowcount
            if changed != 1:
                return None
            if status == QUEUED:
                requeue(job_id)  # inside the transaction: a queue error rolls the change back
        return ReapedJob(job_id, status, reason)

    def requeue_lost(
        self,
        older_than_s: float,
        pending: Callable[[], set[str]],
        requeue: Callable[[str], None],
    ) -> list[str]:
        """Re-enqueue queued jobs that have no message in the queue; return their ids.

        A worker killed between taking a job's message and claiming it leaves the job `queued`
        with no message: nothing would ever run it. A job queued (or last re-enqueued) more than
        `older_than_s` ago whose id is not among `pending()` (the ids waiting in the queue) gets
        a new message; `requeue(job_id)` runs before the change commits. A message taken at the
        very moment of the check may yield a duplicate, which is harmless: the second claim of a
        job finds it no longer queued and drops the message.
        """
        now = self._now
        stale = sa.and_(jobs.c.status == QUEUED, jobs.c.updated_at < now - older_than_s)
        with self._reader.connect() as conn:
            candidates = [row[0] for row in conn.execute(sa.select(jobs.c.id).where(stale))]
        if not candidates:
            return []
        waiting = pending()
        requeued = []
        reason = (
            f"re-enqueued: queued for over {older_than_s:g} s with no message in the queue (a "
            "worker probably died between taking it and starting it)"
        )
        for job_id in candidates:
            if job_id in waiting:
                continue
            with self._writer.begin() as conn:
                changed = conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, stale)
                    .values(updated_at=now, retry_reason=reason)
                ).rowcount
                if changed == 1:
                    requeue(job_id)  # inside the transaction: a queue error rolls it back
                    requeued.append(job_id)
        return requeued

    # -- worker heartbeats -------------------------------------------------------------------

    def beat_worker(self, worker_id: str) -> None:
        """Record that the worker process `worker_id` (this process) is alive, now."""
        now = self._now
        with self._writer.begin() as conn:
            renewed = conn.execute(
                workers.update().where(workers.c.id == worker_id).values(last_seen_at=now)
            ).rowcount
            if renewed == 0:
                conn.execute(
                    workers.insert().values(
                        id=worker_id, host=socket.gethostname()[:255], pid=os.getpid(),
                        started_at=now, last_seen_at=now,
                    )
                )

    def remove_worker(self, worker_id: str) -> None:
        """Forget the worker `worker_id` (it stopped cleanly)."""
        with self._writer.begin() as conn:
            conn.execute(workers.delete().where(workers.c.id == worker_id))

    def live_workers(self, within_s: float) -> list[WorkerRecord]:
        """Return the workers that sent a heartbeat in the last `within_s` seconds."""
        query = (
            sa.select(workers)
            .where(workers.c.last_seen_at >= self._now - within_s)
            .order_by(workers.c.started_at, workers.c.id)
        )
        with self._reader.connect() as conn:
            return [WorkerRecord(**row._mapping) for row in conn.execute(query)]

    def prune_workers(self, older_than_s: float) -> int:
        """Delete the rows of workers silent for `older_than_s` seconds; return how many."""
        with self._writer.begin() as conn:
            return conn.execute(
                workers.delete().where(workers.c.last_seen_at < self._now - older_than_s)
            ).rowcount

    def job_ids(self) -> Iterable[str]:
        """Return every job id (for maintenance and tests)."""
        with self._reader.connect() as conn:
            return [row[0] for row in conn.execute(sa.select(jobs.c.id))]
